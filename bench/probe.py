"""Exploration on a GPU before the benchmark: forward-pass variants of the ToothFairy2 network, the engine on
one large case, agreement with nnUNetPredictor on random weights, cold starts. Each step is skipped when the
time left (--budget) is short; results are printed as they come and written to OUT/probe.json.

    python bench/probe.py --out DIR [--budget 480]

The numbers here guide the engine's choices; the benchmark (bench.py) is what reports.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench  # noqa: F401  (environment variables for nnU-Net, sys.path)
import torch
from bench import (BENCH, agreement_of, load_nnunet, load_ours, phantom, run_nnunet, run_ours)
from make_model import TF2_CONFIGURATION, TF2_DATASET, TF2_PLANS, build_network, make_model_folder, plans_with

T0 = time.monotonic()
RESULTS: dict = {}


def note(key: str, value) -> None:
    RESULTS[key] = value
    print(f"[{time.monotonic() - T0:6.1f}s] {key}: {json.dumps(value)}", flush=True)


def timed_forward(net, x, n: int = 5, warm: int = 2) -> dict:
    """Median seconds of n forward passes after warm, and the peak memory of one pass above the baseline."""
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        for _ in range(warm):
            net(x)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            y = net(x)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            del y
    return {"s": round(statistics.median(times), 4), "per_window_s": round(statistics.median(times) / x.shape[0], 4),
            "peak_extra_gb": round((torch.cuda.max_memory_allocated() - base) / 1e9, 2)}


def first_call(net, x) -> float:
    t = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        net(x)
    torch.cuda.synchronize()
    return round(time.perf_counter() - t, 2)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget", type=float, default=480)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    left = lambda: a.budget - (time.monotonic() - T0)  # noqa: E731
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    plans = plans_with(TF2_PLANS, TF2_CONFIGURATION)
    dataset = json.loads(TF2_DATASET.read_text())
    patch = tuple(plans["configurations"][TF2_CONFIGURATION]["patch_size"])
    torch.manual_seed(0)
    nets = [build_network(plans, dataset, TF2_CONFIGURATION).to(dev).eval() for _ in range(2)]
    note("gpu", torch.cuda.get_device_name())
    note("torch", torch.__version__)
    x1 = torch.randn((1, 1, *patch), device=dev)
    x2 = torch.randn((2, 1, *patch), device=dev)
    note("eager_b1", timed_forward(nets[0], x1))
    note("eager_b2", timed_forward(nets[0], x2))
    try:
        c0 = torch.compile(nets[0], dynamic=False)
        note("compile_b1_first_call_s", first_call(c0, x1))
        note("compiled_b1", timed_forward(c0, x1))
        if left() > 300:
            note("compile_b2_first_call_s", first_call(c0, x2))
            note("compiled_b2", timed_forward(c0, x2))
        c1 = torch.compile(nets[1], dynamic=False)
        note("compile_b1_second_network_first_call_s", first_call(c1, x1))
    except Exception as e:  # report and go on with what still can be measured
        note("compile_error", repr(e)[:2000])
        c0 = c1 = None
    weights = make_model_folder(Path("/tmp/probe_model"))
    from cbctseg.compile_cache import save_cache

    if c0 is not None:
        path = save_cache(weights, dev)
        note("compile_cache_mb", round(path.stat().st_size / 1e6, 1))
    # the engine on the largest shape, compiled networks, batch 1, streamed and device accumulation
    if left() > 200:
        model = load_ours(weights, ["0", "1"], dev)
        if c0 is not None:
            model.networks = [torch.compile(n, dynamic=False) for n in model.networks]
        t = time.perf_counter()
        img = phantom((298, 512, 512), 0.3)
        note("phantom_largest_s", round(time.perf_counter() - t, 1))
        for acc in ("streamed", "device"):
            if left() < 120:
                break
            args = argparse.Namespace(step=0.5, accumulate=acc, batch_size=1)
            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            _, seconds, info = run_ours(model, img, [0.3] * 3, dev, args)
            note(f"ours_largest_{acc}_first_run_s", round(time.perf_counter() - t, 1))
            torch.cuda.reset_peak_memory_stats()
            _, seconds, info = run_ours(model, img, [0.3] * 3, dev, args)
            note(f"ours_largest_{acc}", {**{k: round(v, 2) for k, v in seconds.items()},
                                         "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
                                         "s_per_pass": info["seconds_per_pass"]})
        del img
        # agreement with nnU-Net on the median shape, random weights
        if left() > 100:
            img = phantom((169, 347, 371), 0.3)
            args = argparse.Namespace(step=0.5, accumulate="device", batch_size=1)
            ours, s_ours, _ = run_ours(model, img, [0.3] * 3, dev, args)
            note("ours_median", {k: round(v, 2) for k, v in s_ours.items()})
            for n in model.networks:
                n.to("cpu")
            torch.cuda.empty_cache()
            pred = load_nnunet(weights, ["0", "1"], dev, 0.5)
            torch.cuda.reset_peak_memory_stats()
            ref, s_ref, info = run_nnunet(pred, img, [0.3] * 3, dev)
            note("nnunet_median_first_run", {**{k: round(v, 2) for k, v in s_ref.items()},
                                             "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)})
            note("agreement_median", agreement_of(ours, ref, info["logits"], patch, 0.5))
            del pred, info
            torch.cuda.empty_cache()
    # cold starts in fresh processes (empty inductor caches; the portable cache beside the weights)
    for mode in ("off", "on"):
        if left() < 40:
            break
        env = {**__import__("os").environ, "TORCHINDUCTOR_CACHE_DIR": f"/tmp/ind-{mode}",
               "TRITON_CACHE_DIR": f"/tmp/tri-{mode}"}
        t = time.time()
        r = subprocess.run([sys.executable, str(BENCH / "first_forward.py"), "ours", str(weights), "--compile", mode],
                           capture_output=True, text=True, env=env, timeout=max(10, left()))
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("FIRST_FORWARD ")), None)
        if line:
            child = json.loads(line.split(" ", 1)[1])
            note(f"cold_start_{mode}", {"to_first_forward_s": round(child["wall_at_first_forward"] - t, 1),
                                        **{k: round(v, 2) for k, v in child.items() if k.endswith("_s")}})
        else:
            note(f"cold_start_{mode}_error", r.stderr[-1500:])
    (a.out / "probe.json").write_text(json.dumps(RESULTS, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
