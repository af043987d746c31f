"""Shared fixtures: the bundled weights, phantom cases on disk, and running process.py as a real process.

Parallel streams: run_tests.sh may start several pytest processes on the same selection, with
CBCTSEG_TEST_CLAIMS naming a folder they share. Each stream walks the test modules in the same order (the
longest first) and runs a module only if it is the first to claim it there, so every module runs once, in one
process, with its module fixtures. Modules of one group in SHARED (which share a session fixture that is costly
to make) are claimed together, so the fixture is made once.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import SimpleITK as sitk

CLAIMS = os.environ.get("CBCTSEG_TEST_CLAIMS")
# modules that take longest alone: started first, so that no stream is left with a long one at the end
# (test_container.py with its image checks, as CI runs them)
LONGEST_FIRST = ("test_container.py", "test_aot_package.py", "test_training.py", "test_triton.py",
                 "test_logit_overflow.py", "test_oracle.py", "test_memory_bounds.py", "test_budget.py",
                 "test_model_verification.py", "test_hardening_io.py", "test_ensemble.py", "test_inputs.py")
# modules that share a session fixture (the AOT package), run by one stream: {module: group}
SHARED = {"test_container.py": "aot_package", "test_aot_package.py": "aot_package"}

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


def default_threads_env() -> dict[str, str]:
    """The environment without a thread limit the test streams set (run_tests.sh): torch's default threads, as a
    user's run has them. oneDNN chooses its layouts by its thread count, and with them the memory a convolution
    holds: memory measurements run this way."""
    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


def write_phantom(path: Path, **kw) -> tuple[sitk.Image, sitk.Image]:
    """Write a phantom image (and return image and label) at path."""
    image, label = make_phantom(PhantomSpec(**kw))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return image, label


def start_process(*args: str) -> subprocess.Popen:
    """Start python process.py ARGS in a fresh process, as grand-challenge would (the test weights by default)."""
    if "--weights" not in args and (not args or args[0] not in ("train", "phantom", "evaluate", "cutoffs", "ensemble")):
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


ENGINE_IMPORTED = """
import sys
from cbctseg.cli import main
code = main(sys.argv[1:])
print(code, sorted(m for m in ("torch", "nnunetv2") if m in sys.modules))
"""


def run_noting_the_engine(*args: str) -> tuple[str, subprocess.CompletedProcess]:
    """process.py's command line ARGS in a fresh process, and what it printed last: its exit code and which of
    torch and nnunetv2 it imported ("2 []": exit code 2, neither imported)."""
    r = subprocess.run([sys.executable, "-c", ENGINE_IMPORTED, *args], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    lines = r.stdout.splitlines()
    return (lines[-1] if lines else ""), r


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


@pytest.fixture(scope="session")
def aot_packaged(tmp_path_factory, weights) -> Path:
    """A copy of the bundled weights with a CPU AOT package built by `process.py compile --aot` (a minute of
    compiling: made once for the modules of SHARED's group aot_package; copy it before changing it)."""
    folder = tmp_path_factory.mktemp("aot") / "weights"
    shutil.copytree(weights, folder, ignore=shutil.ignore_patterns("compile_cache"))
    r = run_process("compile", "--aot", "--weights", str(folder), "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "AOT package built" in r.stdout
    return folder


def pytest_collection_modifyitems(config, items):
    """With parallel streams: the modules in the order the streams take them (each module's tests in order)."""
    if not CLAIMS:
        return
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    modules = list(dict.fromkeys(item.path for item in items))
    # a group's modules together, where its first ranked module is
    group_rank = {}
    for name, r in sorted(rank.items(), key=lambda kv: kv[1]):
        group_rank.setdefault(SHARED.get(name, name), r)
    order = {path: (group_rank.get(SHARED.get(path.name, path.name), len(rank)), rank.get(path.name, len(rank)), i)
             for i, path in enumerate(modules)}
    items.sort(key=lambda item: order[item.path])


_claimed: dict[str, bool] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """With parallel streams: run the item if this stream claims (or claimed) its module, else pass it by."""
    if not CLAIMS:
        return None
    unit = SHARED.get(item.path.name) or str(item.path.relative_to(REPO)).replace(os.sep, "__")
    if unit not in _claimed:
        try:
            os.close(os.open(Path(CLAIMS) / (unit + ".claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            _claimed[unit] = True
        except FileExistsError:
            _claimed[unit] = False
    return None if _claimed[unit] else True
