"""torch.compile for the networks, only when it pays, with torch's portable compile cache kept beside the weights.

Compiling costs a warm-up (about 45 s cold, 17 s with the cache loaded, on an H100) and halves the time of
a forward pass (0.131 s -> 0.065 s for the ToothFairy2 network on an H100). It pays when the case has
enough window forwards to win that time back, and never on the CPU. An AOT package (cbctseg.networks.aot_package) beside the
weights skips the warm-up altogether, and is used on any device it was built for.

    python process.py compile [--weights DIR] [--device cuda]         # compile, warm up, save the cache
    python process.py compile --aot [--weights DIR] [--device cuda]   # build an AOT package
(or python -m cbctseg.networks.compile_cache with the same arguments)
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from cbctseg.networks import aot_package, lean_forward
from cbctseg.networks.backend import LocalBackend
from cbctseg.networks.device import device_tag, plans_tag, slug
from cbctseg.networks.precision import autocast, input_dtype

log = logging.getLogger(__name__)

CACHE_DIR = aot_package.CACHE_DIR  # the portable cache and the AOT packages share the folder


@dataclass(frozen=True)
class Costs:
    """Seconds per forward pass and warm-up costs; defaults: the ToothFairy2 network as measured on an H100."""

    eager_s: float = 0.131
    compiled_s: float = 0.065
    cold_compile_s: float = 45.0
    cached_compile_s: float = 17.0  # 7.8 s loading the cache + 9.3 s first pass


def cache_path(weights_dir: Path, device: torch.device) -> Path:
    """Where this GPU and torch build's cache lives: <weights>/compile_cache/<gpu>-torch<ver>-<plans>.bin.

    The plans' hash is in the name because the compiled graph depends on the architecture and patch size.
    """
    name = f"{device_tag(device, cpu_isa=False)}-torch{slug(torch.__version__)}-{plans_tag(weights_dir)}.bin"
    return Path(weights_dir) / CACHE_DIR / name


_LOADED: set[Path] = set()  # caches this process has loaded: loading one again would only cost time


def load_cache(weights_dir: Path, device: torch.device) -> bool:
    """Hot-load the cache for this GPU when there is one; False when absent or unreadable (then compiling is cold)."""
    path = cache_path(weights_dir, device)
    if path in _LOADED:
        return True
    if not path.is_file():
        return False
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as e:  # a cache from another build must not stop prediction
        log.warning("compile cache %s not loaded: %s", path, e)
        return False
    log.info("compile cache %s loaded (%s)", path, info)
    if info is not None:
        _LOADED.add(path)
    return info is not None


def save_cache(weights_dir: Path, device: torch.device) -> Path:
    """Write what this process compiled to cache_path (atomically); call after a compiled warm-up."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise RuntimeError("nothing was compiled in this process: run a compiled forward pass first")
    path = cache_path(weights_dir, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(saved[0])
    os.replace(tmp, path)
    return path


def decide(device_type: str, expected_forwards: int, budget_s: float | None, cache_available: bool,
           eager_s_per_forward: float | None = None, costs: Costs = Costs()) -> dict:
    """Whether compiling pays for this case (a pure function).

    Compile when it finishes all forwards sooner than eager (forwards x saving > warm-up) or, when the budget
    cannot hold all of them either way, when it completes more of them within the budget. A measured eager
    forward time scales the compiled one by the H100's measured ratio; warm-up costs are not scaled (mostly CPU work).
    """
    eager = eager_s_per_forward if eager_s_per_forward else costs.eager_s
    compiled = eager * costs.compiled_s / costs.eager_s
    warmup = costs.cached_compile_s if cache_available else costs.cold_compile_s
    n = max(0, int(expected_forwards))
    d = {"compile": False, "device": device_type, "expected_forwards": n, "budget_s": budget_s,
         "cache_available": cache_available, "eager_s_per_forward": round(eager, 4),
         "compiled_s_per_forward": round(compiled, 4), "warmup_s": warmup,
         "eager_total_s": round(n * eager, 1), "compiled_total_s": round(warmup + n * compiled, 1)}
    if device_type != "cuda":
        return {**d, "reason": "never on the CPU"}
    if budget_s is None or (budget_s >= d["compiled_total_s"] and budget_s >= d["eager_total_s"]):
        pays = n * (eager - compiled) > warmup
        why = f"{n} forwards save {n * (eager - compiled):.1f} s against a {warmup:.0f} s warm-up"
        return {**d, "compile": pays, "reason": why + (": compile" if pays else ": stay eager")}
    done_eager = min(n, budget_s / eager)
    done_compiled = min(n, max(0.0, (budget_s - warmup) / compiled))
    pays = done_compiled > done_eager
    why = f"within {budget_s:.0f} s: {done_eager:.0f} forwards eager, {done_compiled:.0f} compiled"
    return {**d, "compile": pays, "reason": why + (": compile" if pays else ": stay eager")}


def c_compiler() -> str | None:
    """The C compiler Triton would use ($CC, else cc, gcc or clang on PATH), or None."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


def _eager(networks: Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    """How uncompiled networks run: lean, their logits computed a chunk of channels at a time as the windows are
    stitched (a compiled graph frees each buffer after its last use by itself)."""
    return [lean_forward.lean(n, head_by_chunks=True) for n in networks]


def maybe_compile(networks: Sequence[torch.nn.Module], device: torch.device, weights_dir: Path,
                  expected_forwards: int, budget_s: float | None, eager_s_per_forward: float | None = None,
                  force: bool | None = None, costs: Costs = Costs(), batch_size: int = 1, aot: bool = True,
                  patch: tuple[int, ...] | None = None) -> LocalBackend:
    """The backend the networks run in, compiled when that pays, with the decision as its description
    (`force`: True always compiles, False never). Uncompiled, they run lean (`lean_forward`). The networks
    themselves are not changed.

    An AOT package for this device and batch size beside the weights is used whenever it exists (it costs no
    warm-up, so it always pays); otherwise torch.compile when `decide` says so. torch.compile is lazy: the
    warm-up is paid by the first forward pass of each network. aot=False: torch.compile only.

    On a GPU, with `patch` and no `eager_s_per_forward`, the decision uses this GPU's eager forward, timed here
    (measure_eager_forward), rather than the H100's: on a T4 a forward is several times slower, and compiling
    pays after fewer of them.
    """
    device = torch.device(device)
    if aot and force is not False:
        packaged = aot_package.load(list(networks), weights_dir, device, batch_size)
        if packaged is not None:
            return LocalBackend(packaged, device, {
                "compile": True, "kind": "aot", "device": device.type, "expected_forwards": expected_forwards,
                "package": aot_package.package_path(weights_dir, device, batch_size).name,
                "reason": "an AOT package for this device: compiled forwards without a warm-up"})
    if device.type == "cuda" and force is not False and c_compiler() is None:
        # Triton builds its kernel launcher with the system's C compiler at the first compiled call; a slim
        # image has none, and the case would fail there instead of running eager
        log.warning("no C compiler (CC, cc, gcc or clang): torch.compile cannot run here; staying eager")
        return LocalBackend(_eager(networks), device, {
            "kind": "torch.compile", "compile": False, "device": device.type, "expected_forwards": expected_forwards,
            "reason": "no C compiler for Triton: eager (an AOT package needs none)"})
    cached = device.type == "cuda" and cache_path(weights_dir, device).is_file()
    eager = _eager(networks)
    measured = device.type == "cuda" and force is None and eager_s_per_forward is None and patch is not None
    if measured:
        eager_s_per_forward = measure_eager_forward(eager[0], patch, device, batch_size)
    decision = {"kind": "torch.compile", "eager_measured_here": measured,
                **decide(device.type, expected_forwards, budget_s, cached, eager_s_per_forward, costs)}
    if force is not None:
        decision = {**decision, "compile": force, "reason": f"forced ({'on' if force else 'off'})"}
    if not decision["compile"]:
        return LocalBackend(eager, device, decision)
    decision["cache_loaded"] = load_cache(weights_dir, device) if cached else False
    # dynamic=False: every window has the patch's shape; a dynamic graph would be slower
    return LocalBackend([torch.compile(n, dynamic=False) for n in networks], device, decision)


@torch.inference_mode()
def warm_up(networks: Sequence[Callable[[torch.Tensor], torch.Tensor]], patch: tuple[int, ...], device: torch.device,
            batch_size: int = 1) -> float:
    """One forward pass per network on a window-shaped input, as the predictor runs it; returns seconds."""
    t0 = time.monotonic()
    x = torch.randn((batch_size, 1, *patch), device=device, dtype=input_dtype(device))
    for net in networks:
        with autocast(device):
            net(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.monotonic() - t0


def measure_eager_forward(net: torch.nn.Module, patch: tuple[int, ...], device: torch.device,
                       batch_size: int = 1) -> float:
    """Seconds per window of one eager forward pass on this device (the second of two: the first pays for
    cuDNN's algorithm search, which the case's first window would pay anyway)."""
    warm_up([net], patch, device, batch_size)
    return warm_up([net], patch, device, batch_size) / batch_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", type=Path, default=Path(__file__).resolve().parents[2] / "weights",
                   help="the model folder; what is built goes to its compile_cache/")
    p.add_argument("--device", default="cuda", help="the device to build for (cuda, cuda:N, or cpu)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass, as the predictor will run")
    p.add_argument("--aot", action="store_true", help="build an AOTInductor package (no warm-up when loaded)")
    p.add_argument("--max-autotune", action="store_true",
                   help="with --aot: time kernel choices on this device while building (slower build)")


def run_from_args(a: argparse.Namespace) -> int:
    """Build what the arguments ask for; prints one summary line."""
    from cbctseg.model.loading import ModelError, load_model

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.error("compile: device %s requested but CUDA is not available", a.device)
        return 2
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        model = load_model(a.weights, device=device)
    except ModelError as e:
        log.error("compile: %s", e)
        return 2
    if a.aot:
        path = aot_package.package_path(a.weights, device, a.batch_size)
        in_channels = next(model.networks[0].parameters()).shape[1]  # the stem convolution's input channels
        seconds = aot_package.build(model.networks[0], model.patch_size, in_channels, device, path, a.batch_size,
                                    a.max_autotune)
        loaded = aot_package.load(model.networks, a.weights, device, a.batch_size, path)
        if loaded is None:
            log.error("compile: the package %s was built but does not load; see the warning above", path)
            return 1
        first = warm_up(loaded, model.patch_size, device, a.batch_size)
        print(f"AOT package built in {seconds:.1f} s, first pass of each network {first:.1f} s; "
              f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
        return 0
    backend = maybe_compile(model.networks, device, a.weights, 0, None, force=True, aot=False)
    seconds = warm_up(backend.networks, model.patch_size, device, a.batch_size)
    path = save_cache(a.weights, device)
    print(f"compiled warm-up {seconds:.1f} s (cache loaded first: {backend.decision.get('cache_loaded')}); "
          f"cache {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Compile the model's networks ahead of time for this device: an AOT "
                                "package (--aot), or torch's portable compile cache from a compiled warm-up.")
    add_arguments(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return run_from_args(a)


if __name__ == "__main__":
    raise SystemExit(main())

