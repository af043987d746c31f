"""The training command end to end on the CPU: raw phantom dataset -> weights/ -> process.py -> a valid output."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cbctseg.training.phantom import write_raw_dataset
from conftest import REPO, run_process, write_phantom

# one process for fingerprint, preprocessing and export, augmentation in the training process: nnU-Net spawns
# each helper process afresh (torch and nnU-Net imported again), which costs more than these 2-case steps
TINY = ["--configuration", "3d_fullres_torchres_tiny", "--device", "cpu", "--da-workers", "0", "--processes", "1"]
MODEL_DIR = "nnUNet_results_model{m}/Dataset119_ToothFairy2/nnUNetTrainer_onlyMirror01_custom__" \
            "nnUNetResEncUNetLPlans_torchres__3d_fullres_torchres_tiny/fold_all"


def train_cmd(raw: Path, work: Path, weights: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "process.py"), "train", "--raw", str(raw), "--work", str(work),
            "--weights", str(weights), *TINY, *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run of both models on a 2-case phantom dataset."""
    root = tmp_path_factory.mktemp("train")
    raw, work, weights = root / "raw", root / "work", root / "weights"
    write_raw_dataset(raw, 2, shape=(48, 64, 64))
    t0 = time.monotonic()
    r = subprocess.run(train_cmd(raw, work, weights, "--epochs", "1", "--iterations", "1"), capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-5000:]
    return raw, work, weights, time.monotonic() - t0, r


def test_training_produces_weights_that_process_py_uses(trained, tmp_path):
    raw, work, weights, seconds, r = trained
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["trainer"] == "nnUNetTrainer_onlyMirror01_custom" and summary["models"] == [1, 2]
    for name in ("plans.json", "dataset.json", "provenance.json", "checksums.json", "fold_0/checkpoint_final.pth",
                 "fold_1/checkpoint_final.pth"):
        assert (weights / name).is_file(), name
    # the manifest process.py verifies: both folds, the files as assembled (the run below loads them)
    manifest = json.loads((weights / "checksums.json").read_text())
    assert manifest["folds"] == ["0", "1"] and manifest["demo"] is False
    assert manifest["configuration"] == "3d_fullres_torchres_tiny"
    prov = json.loads((weights / "provenance.json").read_text())
    assert prov["configuration"] == "3d_fullres_torchres_tiny" and prov["epochs"] == 1 and prov["nnunetv2"] == "2.8.1"
    ckpt = torch.load(weights / "fold_1" / "checkpoint_final.pth", weights_only=False)
    assert "optimizer_state" not in ckpt and tuple(ckpt["inference_allowed_mirroring_axes"]) == (0, 1)
    # the two models are two trainings, not one copied
    ckpt0 = torch.load(weights / "fold_0" / "checkpoint_final.pth", weights_only=False)
    k = next(iter(ckpt0["network_weights"]))
    assert not torch.equal(ckpt0["network_weights"][k], ckpt["network_weights"][k])
    # fold 'all' skips nnU-Net's final validation, which would only predict the training cases again
    for m in (1, 2):
        assert (work / MODEL_DIR.format(m=m) / "checkpoint_final.pth").is_file()
        assert not (work / MODEL_DIR.format(m=m) / "validation").exists()
    # labels were converted to contiguous values
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "nnUNet_raw/Dataset119_ToothFairy2/labelsTr/"
                                                    "ToothFairy2F_001.mha")))
    assert set(np.unique(lab).tolist()) == set(range(43))

    image, _ = write_phantom(tmp_path / "in" / "x.mha", shape=(40, 60, 70), seed=9)
    p = run_process("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--weights", str(weights),
                    "--no-mirroring")
    assert p.returncode == 0, p.stderr
    out = sitk.ReadImage(str(tmp_path / "out/images/oral-pharyngeal-segmentation/x.mha"))
    assert out.GetSize() == image.GetSize() and out.GetPixelID() == sitk.sitkUInt8


def test_rerun_after_finish_redoes_nothing(trained):
    raw, work, weights, _, _ = trained
    finals = sorted(work.glob("nnUNet_results_model*/**/checkpoint_final.pth"))
    before = {p: p.stat().st_mtime_ns for p in finals}
    r = subprocess.run(train_cmd(raw, work, weights, "--epochs", "1", "--iterations", "1"), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "running nnUNetv2" not in r.stderr
    for step in ("convert", "fingerprint", "plans", "preprocess", "train model 1", "train model 2"):
        assert f"{step}:" in r.stderr and "skipped" in r.stderr
    # no nnU-Net command ran and no checkpoint was written again (what it did not do, not how long it took)
    assert {p: p.stat().st_mtime_ns for p in finals} == before


def test_interrupted_training_resumes_from_latest_checkpoint(trained, tmp_path):
    raw, work, _, _, _ = trained
    # reuse the converted, planned and preprocessed dataset; results in a folder of their own, so nothing is final
    # yet; two epochs: the run is stopped after the first one's checkpoint and resumed for the second
    work2 = tmp_path / "work"
    work2.mkdir()
    for sub in ("nnUNet_raw", "nnUNet_preprocessed"):
        os.symlink(work / sub, work2 / sub)
    cmd = train_cmd(raw, work2, tmp_path / "weights", "--models", "1", "--epochs", "2", "--iterations", "1",
                    "--save-every", "1")
    latest = work2 / MODEL_DIR.format(m=1) / "checkpoint_latest.pth"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 600
    saved = None
    while saved is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:  # a file torch.save is still writing does not load yet
            saved = torch.load(latest, weights_only=False)["current_epoch"]
        except Exception:  # noqa: BLE001 - any error of a half-written file: look again
            pass
    assert saved is not None, "no complete checkpoint_latest.pth appeared"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    epoch = torch.load(latest, weights_only=False)["current_epoch"]
    assert epoch == 1
    assert not (latest.parent / "checkpoint_final.pth").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from checkpoint_latest.pth" in r.stderr
    assert torch.load(latest.parent / "checkpoint_final.pth", weights_only=False)["current_epoch"] == 2
    logs = sorted(latest.parent.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime)
    resumed = logs[-1].read_text()
    # nnU-Net logs "<time>: Epoch N " per epoch: the resumed run starts at the saved epoch, not at 0
    assert re.search(rf": Epoch {epoch}\s*$", resumed, re.M) and not re.search(r": Epoch 0\s*$", resumed, re.M)


def test_missing_or_malformed_dataset_gives_a_clear_error(tmp_path):
    raw = tmp_path / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    r = subprocess.run(train_cmd(raw, tmp_path / "w", tmp_path / "weights"), capture_output=True, text=True)
    assert r.returncode != 0 and "missing folder labelsTr" in r.stderr
    write_raw_dataset(raw, 2, shape=(32, 48, 48))
    bad = raw / "labelsTr" / "ToothFairy2F_002.mha"
    lab = sitk.ReadImage(str(bad))
    arr = sitk.GetArrayFromImage(lab)
    arr[0, 0, :3] = (19, 50, 50)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(lab)
    sitk.WriteImage(out, str(bad))
    r = subprocess.run(train_cmd(raw, tmp_path / "w", tmp_path / "weights"), capture_output=True, text=True)
    assert r.returncode != 0
    assert "ToothFairy2F_002.mha" in r.stderr and "unknown label values [19, 50]" in r.stderr
    assert not (tmp_path / "w" / "nnUNet_raw" / "Dataset119_ToothFairy2" / "dataset.json").exists()
