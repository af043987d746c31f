"""Shared fixtures: the bundled weights, phantom cases on disk, and running process.py as a real process."""
from __future__ import annotations

import os
import subprocess
import sys
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


def run_process(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """python process.py ARGS in a fresh process, as grand-challenge would start it (the test weights by default)."""
    if "--weights" not in args and (not args or args[0] not in ("train", "phantom", "evaluate", "cutoffs", "ensemble")):
        args = (*args, "--weights", str(WEIGHTS))
    return subprocess.run([sys.executable, str(REPO / "process.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="session")
def weights() -> Path:
    if not (WEIGHTS / "plans.json").is_file():
        pytest.fail(f"bundled weights missing in {WEIGHTS}")
    return WEIGHTS
