"""An ensemble of two models with different plans against nnU-Net's own: nnUNetPredictor per model with its
probabilities saved, then nnunetv2's ensembling (test/ensemble_reference.py). The second model is the demo
weights under a coarser configuration, so that it resamples and the first does not. Ours runs from an ensemble
folder packed by `process.py ensemble`, with no flags, as in the container. Also: the budget across models,
on a fake clock, and models whose labels differ."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cbctseg.inference.ensemble import LoadedModel
from cbctseg.inference.schedule import Budget
from cbctseg.io import gc_io
from cbctseg.model.layout import MODEL_DIR_ENV
from cbctseg.model.loading import load_model
from cbctseg.networks.backend import BackendSlot, LocalBackend
from cbctseg.options import CaseOptions
from cbctseg.case import predict_case
from conftest import REPO, run_process, write_phantom
from ensemble_reference import ENSEMBLE_CASE, make_second_configuration, nnunet_reference

CPU = torch.device("cpu")
OUT = "images/oral-pharyngeal-segmentation"


def structures(labels: np.ndarray) -> list[int]:
    return sorted(int(v) for v in np.unique(labels) if v)


@pytest.fixture(scope="module")
def coarse(tmp_path_factory, weights):
    return make_second_configuration(weights, tmp_path_factory.mktemp("models") / "coarse", spacing_factor=1.5)


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory, weights, coarse):
    """Our one-pass ensemble and nnU-Net's reference, computed at the same time. Ours as the container runs it:
    `process.py ensemble` packs both models, the folder stands where grand-challenge unpacks a model tarball,
    and `process.py` runs with no flags."""
    root = tmp_path_factory.mktemp("ensemble")
    image, _ = write_phantom(root / "in" / "case.mha", **ENSEMBLE_CASE)
    built = root / "model"
    r = run_process("ensemble", "--out", str(built), "--member", str(weights), "--member", str(coarse))
    assert r.returncode == 0, r.stderr[-2000:]
    ref: dict = {}
    thread = threading.Thread(target=lambda: ref.update(ref=nnunet_reference(
        image, [weights, coarse], (0, 1), root / "ref", preprocessed_shapes=True)))
    thread.start()
    r = subprocess.run([sys.executable, str(REPO / "process.py"), "--input", str(root / "in"), "--output",
                        str(root / "out"), "--report", str(root / "report.json")], capture_output=True, text=True,
                       env={**os.environ, MODEL_DIR_ENV: str(built)}, cwd=REPO, timeout=900)
    thread.join()
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ensemble of 2 models" in r.stderr
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "out" / OUT / "case.mha")))
    return image, ours, ref["ref"], json.loads((root / "report.json").read_text())[0]


def test_ensemble_agrees_with_nnunet_predictor_and_ensembling(ensemble_run):
    image, ours, ref, report = ensemble_run
    assert ours.shape == ref.labels.shape == sitk.GetArrayFromImage(image).shape
    agreement = float((ours == ref.labels).mean())
    decided = ref.margin >= 0.01
    wrong_decided = int((ours[decided] != ref.labels[decided]).sum())
    print(f"voxel agreement with nnU-Net's ensemble: {agreement:.6f}; {wrong_decided} differing voxels where "
          f"nnU-Net's top-two margin >= 0.01; margin < 0.01 on {float((~decided).mean()):.6f} of the voxels")
    assert agreement >= 0.999
    assert wrong_decided == 0
    # both models ran, all their work, each in its own configuration; the one on the input grid last, its
    # bands finishing the label map with the coarse model's
    models = report["prediction"]["models"]
    assert [(m["model"]["configuration"], m["listed"]) for m in models] == [
        ("3d_fullres_torchres_tiny_coarse", 2), ("3d_fullres_torchres_tiny", 1)]
    assert all(m["status"] == "done" and not m["prediction"]["skipped"] for m in models)
    assert report["prediction"]["items_done"] == report["prediction"]["items_planned"] == 2 * 8 + 1 * 8  # windows x (2 folds x 4 flips)


def test_the_reference_is_a_meaningful_oracle(ensemble_run):
    """The coarse model resamples and the other does not, both segment, and neither alone gives the ensemble."""
    image, _, ref, report = ensemble_run
    shape = sitk.GetArrayFromImage(image).shape
    assert ref.preprocessed_shapes[0] == shape
    assert ref.preprocessed_shapes[1] == tuple(round(s / 1.5) for s in shape)
    # in the order the models ran: the coarse one first
    assert report["network_input_shape"] == [list(s) for s in reversed(ref.preprocessed_shapes)]
    for labels in (ref.labels, *ref.model_labels):
        assert len(structures(labels)) >= 2 and float((labels > 0).mean()) >= 0.01
    decided = ref.margin >= 0.01
    # where nnU-Net's ensemble is decided, neither model alone decides it everywhere: one model is not enough
    assert all(bool((m[decided] != ref.labels[decided]).any()) for m in ref.model_labels)


def test_models_that_label_differently_are_refused_before_any_case(tmp_path, weights, coarse):
    other = tmp_path / "other"
    shutil.copytree(coarse, other)
    dataset = json.loads((other / "dataset.json").read_text())
    swap = {"Left Maxillary Sinus": "Right Maxillary Sinus", "Right Maxillary Sinus": "Left Maxillary Sinus"}
    dataset["labels"] = {swap.get(k, k): v for k, v in dataset["labels"].items()}
    (other / "dataset.json").write_text(json.dumps(dataset))
    write_phantom(tmp_path / "in" / "case.mha", shape=(16, 32, 32), seed=1)
    r = run_process("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--weights", str(weights),
                    "--weights", str(other))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "label differently" in r.stderr and str(other) in r.stderr
    assert not (tmp_path / "out" / OUT).exists() or not any((tmp_path / "out" / OUT).iterdir())
    assert "label differently" in (tmp_path / "out" / "results.json").read_text()


class Ticking(torch.nn.Module):
    """A network whose every forward call moves a fake clock by `seconds` per window."""

    def __init__(self, net, clock, seconds):
        super().__init__()
        self.net, self.clock, self.seconds, self.windows = net, clock, seconds, 0

    def forward(self, x):
        self.clock.t += self.seconds * x.shape[0]
        self.windows += x.shape[0]
        return self.net(x)


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _ticking(folder, clock, seconds):
    model = load_model(folder, device=CPU)
    nets = [Ticking(n, clock, seconds) for n in model.networks]
    return LoadedModel(model, BackendSlot(LocalBackend(nets, CPU, {"kind": "fake clock"}))), nets


@pytest.mark.parametrize("budget_s, expect", [(10.0, "first cut"), (6.0, "second skipped")])
def test_budget_spans_the_models(tmp_path, weights, coarse, budget_s, expect):
    """On a fake clock, 1 s per window. The coarse model runs first (1 window x 2 folds x 4 flips: 8 s), then
    the model on the input grid (2 windows x 8: 16 s), whose bands finish the label map; about 4.4 s are kept
    for finalizing. The first model's optional work stops where the second's first pass would no longer fit
    after it; with no time for that pass, the second is skipped and named in the report. Every outcome is a
    complete label map. (With time for all, all runs: the oracle test.)"""
    write_phantom(tmp_path / "in" / "case.mha", **ENSEMBLE_CASE)
    case = gc_io.Case("case.mha", tmp_path / "in" / "case.mha", tmp_path / "out" / "case.mha")
    clock = FakeClock()
    listed_first, first_nets = _ticking(weights, clock, 1.0)
    listed_second, _ = _ticking(coarse, clock, 1.0)
    report = predict_case(case, [listed_first, listed_second], CPU, CaseOptions(progress=False),
                          Budget(clock.t + budget_s, clock=clock))
    pred = report["prediction"]
    print(json.dumps({k: v for k, v in pred.items() if k != "models"}))
    one, two = pred["models"]
    assert (one["listed"], two["listed"]) == (2, 1)
    assert one["status"] == "done" and one["prediction"]["items_done"] >= 1  # its first pass
    if expect == "first cut":
        # the model run first stopped early enough that the second's first pass still ran
        assert 1 < one["prediction"]["items_done"] < 8 and one["prediction"]["skipped"]
        assert two["status"] == "done" and two["prediction"]["items_done"] >= 2
        assert all("time budget" in s for s in pred["skipped"])
    else:
        assert two["status"] == "skipped" and "time budget" in two["reason"]
        assert sum(n.windows for n in first_nets) == 0
        assert any(s.startswith("model 1") and "not run" in s for s in pred["skipped"])
    assert clock.t <= 1000.0 + budget_s
    assert sitk.ReadImage(str(case.output_path)).GetSize() == sitk.ReadImage(str(case.path)).GetSize()
