"""Host memory of the CPU path grows with a case by about its fp16 logit sums, not by copies of them.

Each run is `process.py` in a fresh process; its peak resident set size is the kernel's (`wait4`). What a
run costs regardless of the case (interpreter, torch, the model, the network's passes) is measured on a
small case with the same windows' shape and subtracted, so the difference is what the case's volume costs:
the sums (43 classes x fp16 x voxels) and the temporaries the engine makes beside them, which go by chunks
of CHUNK_BYTES. Averaging the whole volume's sums at once used to make two float32 copies of them (5.4 GB
for an 8x512x512 case, whose sums also covered the padding to the patch's 48 slices).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cbctseg.predictor import CHUNK_BYTES
from conftest import REPO, WEIGHTS, write_phantom

CLASSES = 43


def run_peak(tmp_path, name: str, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> int:
    """Peak resident set size of process.py segmenting a phantom of shape (one fold, one pass per window)."""
    write_phantom(tmp_path / name / "in" / "case.mha", shape=shape, spacing=spacing, seed=2)
    args = ["--input", str(tmp_path / name / "in"), "--output", str(tmp_path / name / "out"), "--weights",
            str(WEIGHTS), "--device", "cpu", "--folds", "0", "--no-mirroring", "--step-size", "1",
            "--time-budget", "0"]
    with open(tmp_path / f"{name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "process.py"), *args], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the largest of all children's
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    assert (tmp_path / name / "out" / "images" / "oral-pharyngeal-segmentation" / "case.mha").is_file()
    return usage.ru_maxrss * 1024


@pytest.mark.parametrize("spacing, path", [((1.0, 1.0, 1.0), "streamed"), ((1.0, 1.0, 1.25), "whole volume, resampled")])
def test_a_wide_case_costs_little_more_than_its_fp16_sums(tmp_path, weights, spacing, path):
    small = run_peak(tmp_path, "small", (8, 96, 96), spacing)
    big = run_peak(tmp_path, "big", (8, 384, 384), spacing)
    z = 10 if spacing[2] != 1.0 else 8  # slices at the network's 1 mm
    sums = CLASSES * 2 * z * (384 * 384 - 96 * 96)
    growth = big - small
    print(f"{path}: peak RSS {small / 1e9:.2f} GB (8x96x96) -> {big / 1e9:.2f} GB (8x384x384): "
          f"{growth / 1e6:.0f} MB for {sums / 1e6:.0f} MB of fp16 sums")
    # the sums and a few chunks' temporaries (adding, averaging, argmax, resampling back), never a copy of the sums
    assert growth < sums + 3 * CHUNK_BYTES
