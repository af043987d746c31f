"""torch.compile for the networks, only when it pays, with torch's portable compile cache kept beside the weights.

Compiling costs a warm-up (about 45 s cold, 17 s with the cache loaded, on an H100) and halves the time of
a forward pass (0.131 s -> 0.065 s for the ToothFairy2 network; bench/ANCHORS). It pays when the case has
enough passes to win that time back, and never on the CPU.

    python -m cbctseg.compile_cache [--weights DIR] [--device cuda]   # compile, warm up, save the cache
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CACHE_DIR = "compile_cache"


@dataclass(frozen=True)
class Costs:
    """Seconds per forward pass and warm-up costs; defaults: the ToothFairy2 network on an H100 (ANCHORS.md)."""

    eager_s: float = 0.131
    compiled_s: float = 0.065
    cold_compile_s: float = 45.0
    cached_compile_s: float = 17.0  # 7.8 s loading the cache + 9.3 s first pass


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def cache_path(weights_dir: Path, device: torch.device) -> Path:
    """Where this GPU and torch build's cache lives: <weights>/compile_cache/<gpu>-torch<ver>-<plans>.bin.

    The plans' hash is in the name because the compiled graph depends on the architecture and patch size.
    """
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = f"{_slug(props.name)}-sm{props.major}{props.minor}"
    else:
        gpu = device.type
    plans = Path(weights_dir) / "plans.json"
    tag = hashlib.sha256(plans.read_bytes()).hexdigest()[:8] if plans.is_file() else "noplans"
    return Path(weights_dir) / CACHE_DIR / f"{gpu}-torch{_slug(torch.__version__)}-{tag}.bin"


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


def decide(device_type: str, expected_passes: int, budget_s: float | None, cache_available: bool,
           eager_s_per_pass: float | None = None, costs: Costs = Costs()) -> dict:
    """Whether compiling pays for this case (a pure function).

    Compile when it finishes all passes sooner than eager (passes x saving > warm-up) or, when the budget
    cannot hold all passes either way, when it completes more passes within the budget. A measured eager
    pass time scales the compiled one by the anchors' ratio; warm-up costs are not scaled (mostly CPU work).
    """
    eager = eager_s_per_pass if eager_s_per_pass else costs.eager_s
    compiled = eager * costs.compiled_s / costs.eager_s
    warmup = costs.cached_compile_s if cache_available else costs.cold_compile_s
    n = max(0, int(expected_passes))
    d = {"compile": False, "device": device_type, "expected_passes": n, "budget_s": budget_s,
         "cache_available": cache_available, "eager_s_per_pass": round(eager, 4),
         "compiled_s_per_pass": round(compiled, 4), "warmup_s": warmup,
         "eager_total_s": round(n * eager, 1), "compiled_total_s": round(warmup + n * compiled, 1)}
    if device_type != "cuda":
        return {**d, "reason": "never on the CPU"}
    if budget_s is None or (budget_s >= d["compiled_total_s"] and budget_s >= d["eager_total_s"]):
        pays = n * (eager - compiled) > warmup
        why = f"{n} passes save {n * (eager - compiled):.1f} s against a {warmup:.0f} s warm-up"
        return {**d, "compile": pays, "reason": why + (": compile" if pays else ": stay eager")}
    done_eager = min(n, budget_s / eager)
    done_compiled = min(n, max(0.0, (budget_s - warmup) / compiled))
    pays = done_compiled > done_eager
    why = f"within {budget_s:.0f} s: {done_eager:.0f} passes eager, {done_compiled:.0f} compiled"
    return {**d, "compile": pays, "reason": why + (": compile" if pays else ": stay eager")}


def maybe_compile(networks: list[torch.nn.Module], device: torch.device, weights_dir: Path, expected_passes: int,
                  budget_s: float | None, eager_s_per_pass: float | None = None, force: bool | None = None,
                  costs: Costs = Costs()) -> tuple[list[torch.nn.Module], dict]:
    """The networks, compiled when `decide` says so (or `force` is True; False never compiles), and the decision.

    torch.compile is lazy: the warm-up cost is paid by the first forward pass of each network.
    """
    device = torch.device(device)
    cached = device.type == "cuda" and cache_path(weights_dir, device).is_file()
    decision = decide(device.type, expected_passes, budget_s, cached, eager_s_per_pass, costs)
    if force is not None:
        decision = {**decision, "compile": force, "reason": f"forced ({'on' if force else 'off'})"}
    if not decision["compile"]:
        return networks, decision
    decision["cache_loaded"] = load_cache(weights_dir, device) if cached else False
    # dynamic=False: every window has the patch's shape; a dynamic graph would be slower
    return [torch.compile(n, dynamic=False) for n in networks], decision


@torch.inference_mode()
def warm_up(networks: list[torch.nn.Module], patch: tuple[int, ...], device: torch.device,
            batch_size: int = 1) -> float:
    """One forward pass per network on a window-shaped input, as the predictor runs it; returns seconds."""
    t0 = time.monotonic()
    x = torch.randn((batch_size, 1, *patch), device=device)
    for net in networks:
        with torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext():
            net(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    from .model import load_model

    p = argparse.ArgumentParser(description="Compile the model's networks, warm them up, save torch's compile cache.")
    p.add_argument("--weights", type=Path, default=Path(__file__).resolve().parent.parent / "weights")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass, as the predictor will run")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = load_model(a.weights, device=device)
    networks, decision = maybe_compile(model.networks, device, a.weights, 0, None, force=True)
    seconds = warm_up(networks, model.patch_size, device, a.batch_size)
    path = save_cache(a.weights, device)
    print(f"compiled warm-up {seconds:.1f} s (cache loaded first: {decision.get('cache_loaded')}); "
          f"cache {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

