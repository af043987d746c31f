"""Never the wrong model: a model is verified before any case runs.

The layout of an unpacked model tarball is recognised or refused with what was found; every fold the model
declares is present; checkpoints match the sha256 of its checksums.json (checked before anything is unpickled);
dataset.json's labels are resources/labels.json's; the demo weights say so at build time, in the log and in
the report. Each failure is a clear message and exit code 2 before the first case.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from cbctseg.model.loading import ModelError, load_model, seal_model
from cbctseg.model.layout import MODEL_DIR_ENV, default_model_folder
from cbctseg.model.manifest import MANIFEST, build_manifest, check_labels, write_manifest
from conftest import REPO, run_noting_the_engine, write_phantom

OUT_DIR = "images/oral-pharyngeal-segmentation"
CONFIG = "3d_fullres_torchres_tiny"
NNUNET_RESULTS = f"Dataset119_ToothFairy2/nnUNetTrainer_onlyMirror01_custom__nnUNetResEncUNetLPlans_torchres__{CONFIG}"


def model_copy(weights: Path, dest: Path, demo: bool = False) -> Path:
    """The bundled weights as another model folder, with its own manifest (not the demo unless asked)."""
    shutil.copytree(weights, dest, ignore=shutil.ignore_patterns("compile_cache"))
    write_manifest(dest, build_manifest(dest, ["0", "1"], demo=demo))
    return dest


def unpack_tarball(src: Path, arcname: str, dest: Path) -> Path:
    """Pack src as `tar czf model.tar.gz <arcname>` would, then unpack it as grand-challenge does at /opt/ml/model."""
    tarball = dest.parent / f"{dest.name}.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(src, arcname=arcname)
    dest.mkdir(parents=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return dest


def run(*args: str, model_dir: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """process.py ARGS in a fresh process, with the tarball place at model_dir (no --weights added)."""
    env = dict(os.environ)
    env.pop(MODEL_DIR_ENV, None)
    if model_dir is not None:
        env[MODEL_DIR_ENV] = str(model_dir)
    return subprocess.run([sys.executable, str(REPO / "process.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


@pytest.fixture
def model_dir(monkeypatch, tmp_path) -> Path:
    """Where the tests unpack tarballs, in place of /opt/ml/model."""
    d = tmp_path / "opt-ml-model"
    monkeypatch.setenv(MODEL_DIR_ENV, str(d))
    return d


@pytest.fixture(scope="module")
def small_case(tmp_path_factory) -> Path:
    inp = tmp_path_factory.mktemp("in")
    write_phantom(inp / "a.mha", shape=(32, 48, 48), seed=3)
    return inp


# 1. the layout of a model tarball

@pytest.mark.parametrize("arcname", [".", "mymodel", NNUNET_RESULTS])
def test_tarball_layouts_are_recognised(weights, tmp_path, model_dir, arcname):
    src = model_copy(weights, tmp_path / "src")
    (src / "fold_0" / "checkpoint_best.pth").write_bytes(b"")  # nnU-Net leaves more beside the final checkpoint
    unpack_tarball(src, arcname, model_dir)
    folder = default_model_folder(REPO / "weights")
    assert folder == model_dir / arcname  # "." is the root itself
    model = load_model(folder)
    assert model.folds == ["0", "1"] and not model.demo  # the tarball's model, not the bundled demo


def test_an_empty_or_absent_model_place_means_the_bundled_weights(weights, model_dir):
    assert default_model_folder(weights) == weights  # absent
    model_dir.mkdir()
    assert default_model_folder(weights) == weights  # empty
    (model_dir / ".DS_Store").write_bytes(b"\0")  # debris of packing on a Mac
    (model_dir / "__MACOSX").mkdir()
    assert default_model_folder(weights) == weights


def test_a_tarball_with_two_models_or_none_is_refused_with_what_was_found(weights, tmp_path, model_dir):
    model_copy(weights, model_dir / "model_a")
    model_copy(weights, model_dir / "model_b")
    with pytest.raises(ModelError, match=r"holds 2 models \(model_a/, model_b/\)"):
        load_model(default_model_folder(weights))
    shutil.rmtree(model_dir)
    (model_dir / "stuff").mkdir(parents=True)
    (model_dir / "stuff" / "model.pth").write_bytes(b"weights of some kind")
    (model_dir / "README.txt").write_text("my model")
    with pytest.raises(ModelError, match=r"holds no model: found README\.txt, stuff/, stuff/model\.pth\. Expected"):
        load_model(default_model_folder(weights))


def test_an_explicit_folder_that_holds_the_model_one_level_down_names_it(weights, tmp_path):
    model_copy(weights, tmp_path / "outer" / "mymodel")
    with pytest.raises(ModelError, match=r"not a model folder: it holds one in .*outer/mymodel; pass that folder"):
        load_model(tmp_path / "outer")


def test_process_refuses_an_unrecognisable_tarball_instead_of_running_the_demo(tmp_path, small_case):
    model_dir = tmp_path / "opt-ml-model"
    (model_dir / "mymodel").mkdir(parents=True)
    (model_dir / "mymodel" / "final_model.pt").write_bytes(b"not nnU-Net")
    r = run("--input", str(small_case), "--output", str(tmp_path / "out"), "--device", "cpu", model_dir=model_dir)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "holds no model: found mymodel/, mymodel/final_model.pt" in r.stderr
    assert "Traceback" not in r.stderr and "DEMO" not in r.stderr
    assert not list(tmp_path.glob(f"out/{OUT_DIR}/*"))


def test_process_runs_the_model_of_a_tarball_packed_one_folder_deep(weights, tmp_path, small_case):
    src = model_copy(weights, tmp_path / "src")
    model_dir = unpack_tarball(src, "mymodel", tmp_path / "opt-ml-model")
    r = run("--input", str(small_case), "--output", str(tmp_path / "out"), "--device", "cpu", "--report",
            str(tmp_path / "report.json"), model_dir=model_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())[0]
    assert report["status"] == "ok"
    assert report["model"] == {"folder": str(model_dir / "mymodel"), "folds": ["0", "1"], "configuration": CONFIG,
                               "demo": False}
    assert "DEMO" not in r.stderr
    assert (tmp_path / "out" / OUT_DIR / "a.mha").is_file()


# 2. every fold the model declares

def test_a_missing_declared_fold_is_refused_and_explicit_folds_still_work(weights, tmp_path, caplog):
    folder = model_copy(weights, tmp_path / "m")
    shutil.rmtree(folder / "fold_1")
    with pytest.raises(ModelError, match=r"missing fold_1/checkpoint_final\.pth; the model declares folds 0, 1"):
        load_model(folder)
    model = load_model(folder, ["0"])  # --folds 0: fold 0 only, as asked
    assert model.folds == ["0"] and len(model.networks) == 1
    with pytest.raises(ModelError, match=r"fold 2 is not one of its folds \(0, 1"):
        load_model(folder, ["2"])
    # a checkpoint the manifest does not declare is not used, and the log says so
    shutil.copytree(folder / "fold_0", folder / "fold_3")
    with caplog.at_level(logging.WARNING, logger="cbctseg.model.loading"):
        model = load_model(folder, ["0"])
    assert model.folds == ["0"] and "fold(s) 3 have checkpoints but checksums.json does not declare them" in caplog.text


# 3. checksums recorded when the weights were assembled

def flip_bytes(path: Path, n: int = 200) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


class _Marker:
    """Unpickling this creates a folder: what a swapped checkpoint could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_checkpoint_with_flipped_bytes_is_refused(weights, tmp_path):
    folder = model_copy(weights, tmp_path / "m")
    flip_bytes(folder / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(ModelError, match=r"fold_0/checkpoint_final\.pth does not match checksums\.json"):
        load_model(folder)


def test_a_swapped_checkpoint_is_never_unpickled(weights, tmp_path):
    folder = model_copy(weights, tmp_path / "m")
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Marker(str(marker)), protocol=2)
    path = folder / "fold_1" / "checkpoint_final.pth"
    path.write_bytes(payload + b"\0" * (path.stat().st_size - len(payload)))  # same size: only the hash tells
    with pytest.raises(ModelError, match=r"fold_1/checkpoint_final\.pth does not match checksums\.json"):
        load_model(folder)
    assert not marker.exists()
    with pytest.raises(Exception):  # the payload is live: loaded without the check, it runs
        torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_model_without_manifest_is_refused_until_sealed(weights, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(weights, folder)
    (folder / MANIFEST).unlink()
    with pytest.raises(ModelError, match=rf"has no checksums\.json .* `process\.py seal --weights {folder}`"):
        load_model(folder)
    r = run("seal", "--weights", str(folder))
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["folds"] == ["0", "1"] and manifest["demo"] is False and manifest["configuration"] == CONFIG
    assert set(manifest["files"]) == {"plans.json", "dataset.json", "fold_0/checkpoint_final.pth",
                                      "fold_1/checkpoint_final.pth"}
    assert load_model(folder).folds == ["0", "1"]
    (folder / MANIFEST).write_text(json.dumps({"format": 1, "folds": ["0", "../1"], "files": {}}))
    with pytest.raises(ModelError, match=r"checksums\.json: not a model manifest .* `process\.py seal --weights"):
        load_model(folder)


def test_seal_finds_the_model_in_nnunet_results_and_refuses_a_broken_one(weights, tmp_path):
    results = tmp_path / "nnUNet_results"
    folder = results / NNUNET_RESULTS
    shutil.copytree(weights, folder, ignore=shutil.ignore_patterns(MANIFEST))
    folder_2, manifest = seal_model(results, ["0"])
    assert folder_2 == folder and manifest.folds == ["0"] and (folder / MANIFEST).is_file()
    (folder / MANIFEST).unlink()
    (folder / "fold_1" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    r = run("seal", "--weights", str(folder))
    assert r.returncode == 2 and "fold_1" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not (folder / MANIFEST).exists()


def test_a_damaged_model_stops_predict_before_any_case(weights, tmp_path, small_case):
    folder = model_copy(weights, tmp_path / "m")
    flip_bytes(folder / "fold_1" / "checkpoint_final.pth")
    r = run("--input", str(small_case), "--output", str(tmp_path / "out"), "--weights", str(folder), "--device", "cpu")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "fold_1/checkpoint_final.pth does not match checksums.json" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob(f"out/{OUT_DIR}/*"))


def test_a_damaged_model_stops_predict_before_the_engine_is_imported(weights, tmp_path, small_case):
    """predict checks the models with no torch: a bad one fails in a fraction of a second, not after the
    seconds torch and nnU-Net take to import."""
    folder = model_copy(weights, tmp_path / "m")
    flip_bytes(folder / "fold_0" / "checkpoint_final.pth")
    for model in (folder, tmp_path / "nowhere"):
        said, r = run_noting_the_engine("--input", str(small_case), "--output", str(tmp_path / "out"), "--weights",
                                        str(model))
        assert said == "2 []", (r.stdout[-500:], r.stderr[-3000:])
        assert "cannot load the model" in r.stderr


@pytest.mark.parametrize("command", ["cohort", "compile", "export-triton"])
def test_other_commands_that_load_a_model_verify_it(weights, tmp_path, small_case, command):
    folder = model_copy(weights, tmp_path / "m")
    flip_bytes(folder / "fold_0" / "checkpoint_final.pth")
    args = {"cohort": ["--input", str(small_case), "--output", str(tmp_path / "out"), "--device", "cpu"],
            "compile": ["--aot", "--device", "cpu"], "export-triton": ["--out", str(tmp_path / "repo")]}[command]
    r = run(command, "--weights", str(folder), *args)
    assert r.returncode != 0 and "does not match checksums.json" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not (folder / "compile_cache").exists() and not (tmp_path / "repo").exists()


# 4. labels and label kind

def _dataset(weights: Path) -> dict:
    return json.loads((weights / "dataset.json").read_text())


def test_other_label_names_are_refused_naming_the_first_mismatch(weights, tmp_path):
    folder = model_copy(weights, tmp_path / "m")
    d = _dataset(folder)
    labels = d["labels"]
    labels["Upper Jawbone"], labels["Left Inferior Alveolar Canal"] = 3, 2  # two structures swapped
    (folder / "dataset.json").write_text(json.dumps(d))
    write_manifest(folder, build_manifest(folder, ["0", "1"]))  # sealed as it is: the checksums match
    with pytest.raises(ModelError, match=r"label 2 is 'Left Inferior Alveolar Canal', resources/labels\.json "
                                         r"names it 'Upper Jawbone'"):
        load_model(folder)
    r = run("seal", "--weights", str(folder))  # and it cannot be sealed either
    assert r.returncode == 2 and "names it 'Upper Jawbone'" in r.stderr


def test_label_kinds_and_counts(weights):
    base = _dataset(weights)
    check_labels(base, "dataset.json")  # the bundled weights' labels
    spaced = json.loads(json.dumps(base))
    spaced["labels"] = {n.upper() + " " if n != "background" else n: v for n, v in base["labels"].items()}
    check_labels(spaced, "dataset.json")  # names compared without regard to case and spacing
    regions = json.loads(json.dumps(base))
    regions["labels"]["Lower Jawbone"] = [1, 2]
    with pytest.raises(ModelError, match=r"label 'Lower Jawbone' is a region \[1, 2\]"):
        check_labels(regions, "dataset.json")
    ordered = json.loads(json.dumps(base))
    ordered["regions_class_order"] = list(range(1, 43))
    with pytest.raises(ModelError, match="region-based model"):
        check_labels(ordered, "dataset.json")
    fewer = json.loads(json.dumps(base))
    del fewer["labels"]["Lower Right Third Molar (Wisdom Tooth)"]
    with pytest.raises(ModelError, match=r"no label 42 \('Lower Right Third Molar \(Wisdom Tooth\)'"):
        check_labels(fewer, "dataset.json")
    more = json.loads(json.dumps(base))
    more["labels"]["Tongue"] = 43
    with pytest.raises(ModelError, match=r"label 43 \('Tongue'\) is not in resources/labels\.json"):
        check_labels(more, "dataset.json")
    ignore = json.loads(json.dumps(base))
    ignore["labels"]["ignore"] = 43  # nnU-Net's ignore label is no structure
    check_labels(ignore, "dataset.json")


# 5. the demo says so

def test_demo_weights_warn_in_the_log_and_others_do_not(weights, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="cbctseg.model.loading"):
        assert load_model(weights).describe()["demo"] is True  # what every case report carries
    assert "holds DEMO weights" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cbctseg.model.loading"):
        assert not load_model(model_copy(weights, tmp_path / "m")).demo
    assert "DEMO" not in caplog.text


def test_the_image_build_check_verifies_the_weights_and_shouts_demo(weights, tmp_path):
    check = [sys.executable, "-m", "cbctseg.model.manifest"]
    r = subprocess.run([*check, str(weights)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "WARNING: model folder" in r.stderr and "holds DEMO weights" in r.stderr, r.stderr
    folder = model_copy(weights, tmp_path / "m")
    r = subprocess.run([*check, str(folder)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "DEMO" not in r.stderr, r.stderr
    flip_bytes(folder / "fold_0" / "checkpoint_final.pth")
    r = subprocess.run([*check, str(folder)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "does not match checksums.json" in r.stderr, r.stderr
