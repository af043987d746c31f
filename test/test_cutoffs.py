"""Per-class volume cutoffs from cross-validation predictions, as the winner chose them."""
from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk

from cbctseg.training.cutoffs import ClassOutcome, best_cutoff, find_cutoffs, write_cutoffs
from conftest import REPO, run_process


def test_cutoff_removes_spurious_small_predictions_but_keeps_true_ones():
    diag = 535.0
    outcomes = [
        ClassOutcome(volume=12, dice_kept=0.0, hd95_kept=diag, dice_removed=1.0, hd95_removed=0.0),  # spurious
        ClassOutcome(volume=30, dice_kept=0.0, hd95_kept=diag, dice_removed=1.0, hd95_removed=0.0),  # spurious
        ClassOutcome(volume=400, dice_kept=0.9, hd95_kept=2.0, dice_removed=0.0, hd95_removed=diag),  # true
    ]
    assert best_cutoff(outcomes) == 31
    # a small true structure in a larger volume: removing it with the 30-voxel spurious one helps the mean
    # Dice (cutoff 31) but hurts the mean HD95 more than it gains (cutoff 13): the smaller one is kept
    outcomes.append(ClassOutcome(volume=20, dice_kept=0.8, hd95_kept=1.0, dice_removed=0.0, hd95_removed=600.0))
    assert best_cutoff(outcomes) == 13
    assert best_cutoff([ClassOutcome(50, 0.9, 1.0, 0.0, diag)]) == 0


def test_cutoffs_command_writes_the_file_inference_reads(tmp_path):
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir(), truth.mkdir()
    for i in range(3):
        t = np.zeros((20, 30, 30), np.uint8)
        t[2:10, 5:15, 5:15] = 1  # FDI 1, found
        p = t.copy()
        p[15:17, 20:22, 20:22] = 19  # contiguous 19 = FDI 21, 8 spurious voxels, absent from the truth
        sitk.WriteImage(sitk.GetImageFromArray(p), str(pred / f"c{i}.mha"))
        sitk.WriteImage(sitk.GetImageFromArray(t), str(truth / f"c{i}.mha"))
    found, n = find_cutoffs([pred], truth)
    assert n == 3 and found[21] == 9 and found[1] == 0
    out = tmp_path / "cutoffs.json"
    r = run_process("cutoffs", "--pred", str(pred), "--truth", str(truth), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["cutoffs"] == {"21": 9}
    assert json.loads((REPO / "resources" / "cutoffs.json").read_text())["cutoffs"] == {}  # untouched
