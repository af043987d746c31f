"""Per-case options: bad values are refused where they enter (command line or code), never run."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cbctseg.cli import build_parser
from cbctseg.networks.device import free_memory, limit_memory
from cbctseg.options import CaseOptions
from conftest import REPO, run_noting_the_engine


@pytest.mark.parametrize("command", ["predict", "cohort"])
@pytest.mark.parametrize("option, value", [("--step-size", "0"), ("--step-size", "nan"), ("--step-size", "1.5"),
                                           ("--batch-size", "0"), ("--batch-size", "two"),
                                           ("--gpu-memory-gb", "0"), ("--gpu-memory-gb", "-4"),
                                           ("--gpu-memory-gb", "nan"), ("--gpu-memory-gb", "inf")])
def test_the_command_line_refuses_bad_case_options(command, option, value, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--input", "in", "--output", "out", option, value])
    assert e.value.code == 2
    assert option in capsys.readouterr().err


def test_predict_and_cohort_give_the_same_options_for_the_same_flags():
    flags = ["--input", "in", "--output", "out", "--step-size", "0.25", "--no-mirroring", "--batch-size", "3",
             "--accumulate", "cpu"]
    predict = CaseOptions.from_args(build_parser().parse_args(["predict", *flags]), progress=False)
    cohort = CaseOptions.from_args(build_parser().parse_args(["cohort", *flags]), progress=False)
    assert predict == cohort == CaseOptions(step_size=0.25, mirroring=False, batch_size=3, accumulate="cpu")


@pytest.mark.parametrize("bad", [{"step_size": 0.0}, {"step_size": float("nan")}, {"batch_size": 0},
                                 {"accumulate": "gpu"}, {"compile": "yes"}, {"in_flight": 0}])
def test_options_made_in_code_are_checked_too(bad):
    with pytest.raises(ValueError):
        CaseOptions(**bad)


def test_a_gpu_memory_limit_on_a_cpu_run_is_refused_before_the_engine(tmp_path):
    """--device cpu with --gpu-memory-gb contradicts itself: predict says so before importing torch, and
    cohort before loading a model; neither writes a label map."""
    out = tmp_path / "out"
    said, r = run_noting_the_engine("--input", str(REPO / "test" / "input"), "--output", str(out), "--device", "cpu",
                                    "--gpu-memory-gb", "8")
    assert said == "2 []", (r.stdout[-500:], r.stderr[-3000:])
    assert "--gpu-memory-gb limits a GPU's memory, but --device cpu runs on the CPU" in r.stderr
    r = subprocess.run([sys.executable, "process.py", "cohort", "--input", str(REPO / "test" / "input"),
                        "--output", str(tmp_path / "cohort"), "--device", "cpu", "--gpu-memory-gb", "8"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2 and "--gpu-memory-gb limits a GPU's memory" in r.stderr, r.stderr[-3000:]
    assert not list(out.rglob("*.mha")) and not list((tmp_path / "cohort").rglob("*.mha"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_memory_limit_bounds_what_the_engine_sees_and_may_allocate():
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    with pytest.raises(ValueError, match="more than the GPU's"):
        limit_memory(device, total / 1e9 + 1)
    limit_memory(device, 2.0)
    try:
        assert free_memory(device) <= 2e9 - torch.cuda.memory_reserved(device)
        held = torch.empty(int(1e9), dtype=torch.uint8, device=device)
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int(1.5e9), dtype=torch.uint8, device=device)
        del held
    finally:
        limit_memory(device, None)
    assert free_memory(device) > 2e9 or total < 3e9
