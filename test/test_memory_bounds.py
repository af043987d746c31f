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

from cbctseg.inference.stitching import CHUNK_BYTES
from conftest import REPO, WEIGHTS, default_threads_env, write_phantom

CLASSES = 43


def start_run(tmp_path, name: str, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
    """Start process.py segmenting a phantom of shape (one fold, one pass per window); see peak()."""
    write_phantom(tmp_path / name / "in" / "case.mha", shape=shape, spacing=spacing, seed=2)
    args = ["--input", str(tmp_path / name / "in"), "--output", str(tmp_path / name / "out"), "--weights",
            str(WEIGHTS), "--device", "cpu", "--folds", "0", "--no-mirroring", "--step-size", "1",
            "--time-budget", "0"]
    with open(tmp_path / f"{name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "process.py"), *args], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=log, env=default_threads_env())
    return tmp_path, name, proc


def peak(run) -> int:
    """Peak resident set size of a process from start_run (the kernel's count for that process alone)."""
    tmp_path, name, proc = run
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the largest of all children's
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    assert (tmp_path / name / "out" / "images" / "oral-pharyngeal-segmentation" / "case.mha").is_file()
    return usage.ru_maxrss * 1024


@pytest.mark.parametrize("spacing, path", [((1.0, 1.0, 1.0), "streamed"),
                                           ((1.0, 1.0, 1.25), "whole volume, resampled")])
def test_a_wide_case_costs_little_more_than_its_fp16_sums(tmp_path, weights, spacing, path):
    # the two runs at once: each process's peak is its own
    runs = [start_run(tmp_path, "small", (8, 96, 96), spacing), start_run(tmp_path, "big", (8, 384, 384), spacing)]
    try:
        small, big = (peak(r) for r in runs)
    finally:
        for _, _, proc in runs:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
    z = 10 if spacing[2] != 1.0 else 8  # slices at the network's 1 mm
    sums = CLASSES * 2 * z * (384 * 384 - 96 * 96)
    growth = big - small
    print(f"{path}: peak RSS {small / 1e9:.2f} GB (8x96x96) -> {big / 1e9:.2f} GB (8x384x384): "
          f"{growth / 1e6:.0f} MB for {sums / 1e6:.0f} MB of fp16 sums")
    # the sums and a few chunks' temporaries (adding, averaging, argmax, resampling back), never a copy of the sums
    assert growth < sums + 3 * CHUNK_BYTES


SEG_LAYER_PEAK = """
import sys, torch
from pathlib import Path
from cbctseg.model.loading import load_model

def rss(field):
    return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines()
                if l.startswith(field + ":"))

seg = load_model(Path(sys.argv[1])).networks[0].decoder.seg_layers[-1]
x = torch.randn((1, seg.in_channels, 96, 192, 192))
run = seg if sys.argv[2] == "engine" else (lambda t: seg._conv_forward(t, seg.weight, seg.bias))
before = rss("VmRSS")
with torch.inference_mode():
    y = run(x)
    # a pointwise convolution of a corner of the input is the corner of its output
    ref = seg._conv_forward(x[..., :16, :16, :16], seg.weight, seg.bias)
    err = float((y[..., :16, :16, :16] - ref).abs().max() / ref.abs().max())
print(rss("VmHWM") - before, y.numel() * y.element_size(), y.is_contiguous(), err)
"""


@pytest.mark.parametrize("how", ["engine", "convolution"])
def test_the_segmentation_layer_holds_its_output_once_on_the_cpu(weights, how):
    """The 43-channel output of a window is the forward pass's largest tensor (2.8 GB for a 160x320x320 window
    in fp32); oneDNN's convolution writes it in its blocked layout and converts it, holding it about twice."""
    r = subprocess.run([sys.executable, "-c", SEG_LAYER_PEAK, str(WEIGHTS), how], capture_output=True, text=True,
                       cwd=REPO, timeout=300, env=default_threads_env())
    assert r.returncode == 0, r.stderr[-3000:]
    growth, output, contiguous, err = r.stdout.split()
    growth, output = int(growth), int(output)
    assert float(err) < 1e-5  # the convolution's answer, to fp32 rounding
    print(f"{how}: peak {growth / 1e6:.0f} MB above the input for a {output / 1e6:.0f} MB output")
    if how == "engine":
        assert contiguous == "True" and growth < 1.25 * output
    else:  # what the engine avoids (the measurement's own check: it can tell the two apart)
        assert growth > 1.5 * output
