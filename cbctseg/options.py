"""How each case is segmented: the per-case options of the predict and cohort commands, typed and checked once."""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

ACCUMULATIONS = ("auto", "device", "cpu", "streamed", "streamed-cpu")
COMPILE_MODES = ("auto", "on", "off")
TRITON_URL = os.environ.get("CBCTSEG_TRITON_URL", "127.0.0.1:8001")


@dataclass(frozen=True)
class CaseOptions:
    """Options that decide how one case runs (the model, device and budget come separately).

    step_size: sliding-window step as a fraction of the patch, in (0, 1].
    accumulate: where the logit sums live (auto, device, cpu, streamed; predictor.Accumulation).
    compile: torch.compile the networks: auto (when it pays), on, off.
    in_flight: batches sent ahead to a Triton server (1: none).
    pictures: folder for a PNG of each case's result, or None.
    """

    step_size: float = 0.5
    mirroring: bool = True
    accumulate: str = "auto"
    batch_size: int = 1
    compile: str = "auto"
    in_flight: int = 1
    progress: bool = False
    pictures: Path | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.step_size, (int, float)) and 0 < self.step_size <= 1):  # also refuses nan
            raise ValueError(f"step size {self.step_size!r} must be a fraction of the patch in (0, 1]")
        if self.accumulate not in ACCUMULATIONS:
            raise ValueError(f"accumulate {self.accumulate!r} must be one of {', '.join(ACCUMULATIONS)}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile {self.compile!r} must be one of {', '.join(COMPILE_MODES)}")
        for name in ("batch_size", "in_flight"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} {getattr(self, name)!r} must be a positive integer")

    @classmethod
    def from_args(cls, args: argparse.Namespace, progress: bool) -> CaseOptions:
        """The options of a parsed predict or cohort command line (options it lacks keep their defaults)."""
        backend = getattr(args, "backend", "local")
        return cls(step_size=args.step_size, mirroring=not args.no_mirroring, accumulate=args.accumulate,
                   batch_size=args.batch_size, compile=getattr(args, "compile", "auto"),
                   in_flight=getattr(args, "triton_in_flight", 1) if backend == "triton" else 1,
                   progress=progress, pictures=getattr(args, "pictures", None))


# argparse types: a bad value stops the command line with argparse's usage message

def step_size(value: str) -> float:
    """A sliding-window step in (0, 1]."""
    try:
        step = float(value)
    except ValueError:
        step = math.nan
    if not 0 < step <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"step size {value!r} must be a fraction of the patch in (0, 1]")
    return step


def positive_int(value: str) -> int:
    """An integer of at least 1."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return n


def gigabytes(value: str) -> float:
    """A positive, finite number of GB."""
    try:
        gb = float(value)
    except ValueError:
        gb = math.nan
    if not 0 < gb < math.inf:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of GB")
    return gb


def add_device_arguments(p: argparse.ArgumentParser, device_help: str) -> None:
    """--device and --gpu-memory-gb, for `predict` and `cohort`."""
    p.add_argument("--device", default="auto", help=device_help)
    p.add_argument("--gpu-memory-gb", type=gigabytes, default=None,
                   help="use at most this many GB (1e9 bytes) of the GPU, as on a GPU of that size: to share a "
                        "GPU between runs, or to see on a large GPU what a small one does (default: all of it)")


def gpu_limit_error(args: argparse.Namespace) -> str | None:
    """What is wrong with asking for a GPU memory limit on a run sent to the CPU, or None."""
    if args.gpu_memory_gb is not None and args.device == "cpu":
        return "--gpu-memory-gb limits a GPU's memory, but --device cpu runs on the CPU"
    return None


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    """--backend and the Triton options, for `predict` and `cohort`. Here rather than beside the Triton backend,
    which imports torch: a command line that argparse refuses is answered at once."""
    p.add_argument("--backend", choices=["local", "triton"], default="local",
                   help="where the networks run: here (default) or on a Triton server (see export-triton)")
    p.add_argument("--triton-url", default=TRITON_URL,
                   help="Triton gRPC host:port (default $CBCTSEG_TRITON_URL or 127.0.0.1:8001)")
    p.add_argument("--triton-timeout", type=float, default=120.0, help="seconds per request before it is retried")
    p.add_argument("--triton-retries", type=int, default=3, help="retries of a failed request, with backoff")
    p.add_argument("--triton-in-flight", type=int, default=4,
                   help="batches of windows on the server at once, per case (its dynamic batcher merges them)")
