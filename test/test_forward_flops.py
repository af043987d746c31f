"""The benchmark's flop count: what a pass time is divided by to give the arithmetic rate it reports."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import forward_flops  # noqa: E402


def test_the_count_is_the_convolutions_multiply_adds_and_every_flop_is_in_a_stage():
    r = forward_flops.count("3d_fullres_torchres_tiny")  # patch 48x72x72, 8 features at full resolution
    voxels = 48 * 72 * 72
    by_stage = r["tflop_by_stage"]
    assert by_stage["encoder.stem"] == forward_flops._sig(2 * voxels * 1 * 8 * 27 / 1e12)  # 3x3x3, 1 -> 8 channels
    classes = 43  # 1x1x1, 8 features -> the ToothFairy2 dataset's 43 classes
    assert by_stage["decoder.seg_layers.2"] == forward_flops._sig(2 * voxels * 8 * classes / 1e12)
    assert abs(r["tflop_in_stages"] - r["tflop_per_pass"]) <= 1e-3 * r["tflop_per_pass"]
    assert forward_flops.achieved_tflops(r["tflop_per_pass"], 0.5) == forward_flops._sig(r["tflop_per_pass"] / 0.5)
