"""Cohort mode with the local backend: several cases in flight in threads on one shared model."""
from __future__ import annotations

import json

import torch

from cbctseg.io import gc_io
from cbctseg.cohort import run_cohort
from cbctseg.options import CaseOptions
from cbctseg.model.loading import load_model
from cbctseg.inference.ensemble import LoadedModel
from cbctseg.networks.backend import BackendSlot
from cbctseg.resources import label_map
from conftest import run_process, write_phantom


def test_threads_share_one_compile_decision(tmp_path, weights):
    """Several workers on one model: every case runs the networks as decided once (the backend slot's lock makes
    the first case's decision and the others wait for it), wrapped once; the model itself is left as loaded."""
    for i in range(4):
        write_phantom(tmp_path / "in" / f"c{i}.mha", shape=(16, 48, 48), seed=i)
    cases = gc_io.find_cases(tmp_path / "in", tmp_path / "out")
    model = load_model(weights, device=torch.device("cpu"), expected_classes=label_map().num_classes)
    originals = list(model.networks)
    args = CaseOptions(mirroring=False)
    slot = BackendSlot()
    reports = run_cohort(cases, [LoadedModel(model, slot)], torch.device("cpu"), args, workers=4, progress=False)
    assert [r["status"] for r in reports] == ["ok"] * 4, reports
    assert all(r["compile"] is slot.chosen.describe() for r in reports)
    # wrapped once to run lean, around the loaded networks themselves (not around another thread's wrapper)
    assert all(type(n).__name__ == "LeanUNet" and n.net is o for n, o in zip(slot.chosen.networks, originals))
    assert list(model.networks) == originals


def test_cohort_command_writes_label_maps_and_a_summary(tmp_path):
    for i in range(2):
        write_phantom(tmp_path / "in" / f"c{i}.mha", shape=(16, 48, 48), seed=i)
    out = tmp_path / "out"
    r = run_process("cohort", "--input", str(tmp_path / "in"), "--output", str(out), "--workers", "2",
                    "--device", "cpu", "--no-mirroring")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "cohort_summary.json").read_text())
    assert (summary["ok"], summary["failed"]) == (2, 0)
    assert sorted(p.name for p in (out / "images" / "oral-pharyngeal-segmentation").glob("*.mha")) == \
        ["c0.mha", "c1.mha"]
