"""Shared fixtures: the bundled weights, phantom cases on disk, and running process.py as a real process."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = Path(os.environ.get("CBCTSEG_TEST_WEIGHTS", REPO / "weights"))
TRAINERS = REPO / "cbctseg" / "training" / "nnunet_trainers"
# nnU-Net resolves our trainer class by name (oracle predictor, training); it reads this at import time.
os.environ.setdefault("nnUNet_extTrainer", str(TRAINERS))
for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
    os.environ.setdefault(var, "/tmp/nnunet_unused")

sys.path.insert(0, str(REPO))
from cbctseg.training.phantom import PhantomSpec, make_phantom

# a non-identity direction: axes permuted and flipped, as a scanner may store them
OBLIQUE = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def write_phantom(path: Path, **kw) -> tuple[sitk.Image, sitk.Image]:
    """Write a phantom image (and return image and label) at path."""
    image, label = make_phantom(PhantomSpec(**kw))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return image, label


def start_process(*args: str) -> subprocess.Popen:
    """Start python process.py ARGS in a fresh process, as grand-challenge would (the test weights by default)."""
    if "--weights" not in args and (not args or args[0] not in ("train", "phantom", "evaluate", "cutoffs")):
        args = (*args, "--weights", str(WEIGHTS))
    return subprocess.Popen([sys.executable, str(REPO / "process.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)


def finish_process(proc: subprocess.Popen, timeout: float = 900) -> subprocess.CompletedProcess:
    """Wait for a process from start_process; its exit code and output."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def finish_processes(procs: dict, timeout: float = 900) -> dict:
    """Wait for every process of {key: process from start_process}; {key: its result}. Those still running
    when one fails to finish are killed."""
    try:
        return {key: finish_process(proc, timeout) for key, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def run_process(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """python process.py ARGS in a fresh process, as grand-challenge would start it (the test weights by default)."""
    return finish_process(start_process(*args), timeout)


@contextlib.contextmanager
def process_in_background(*args: str, timeout: float = 900) -> Iterator[Callable[[], subprocess.CompletedProcess]]:
    """process.py ARGS running while the block computes something else (a reference); call the yielded function
    for its result. Killed if the block ends without waiting for it."""
    proc = start_process(*args)
    try:
        yield lambda: finish_process(proc, timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def weights() -> Path:
    if not (WEIGHTS / "plans.json").is_file():
        pytest.fail(f"bundled weights missing in {WEIGHTS}")
    return WEIGHTS
