"""Exploration on a GPU before the benchmark: forward-pass variants of the ToothFairy2 network, the engine on
one large case, agreement with nnUNetPredictor on random weights, cold starts. Each step is skipped when the
time left (--budget) is short; every result is printed and written to OUT/probe.json as it comes, so a run
cut short keeps what it measured.

    python bench/probe.py --out DIR [--budget 480] [--only forward,cudnn,layout,compile,profile,aot,engine,agreement,cold]
    python bench/probe.py --out /tmp/p --device cpu --configuration 3d_fullres_torchres_tiny \
        --largest 96x160x160 --median 64x100x110      # a smoke run of the script itself

Steps: forward (eager, batch 1 and 2, cudnn.benchmark on and off, fp32 weights, lean), cudnn (the eager pass
when cuDNN's autotuning tries all its algorithms, benchmark_limit 0, in a fresh process), layout
(channels_last_3d, eager and compiled), compile (torch.compile default, max-autotune-no-cudagraphs, reduce-overhead = CUDA graphs),
profile (where one pass's time goes: the GPU's kernels by kind and the slowest kernels, for the eager, the
compiled and the channels_last_3d compiled pass, with the pass's flops from forward_flops.py as TFLOP/s),
aot (AOT package: build time, load time, forward; --aot-max-autotune also builds one with max_autotune),
engine (largest case through the engine: streamed and whole-volume sums), agreement (median case against
nnUNetPredictor), cold (cold starts: eager, torch.compile with the portable cache, AOT package).

The numbers here guide the engine's choices; the benchmark (bench.py) is what reports.
"""
from __future__ import annotations

import argparse
import atexit
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench  # noqa: F401  (environment variables for nnU-Net, sys.path)
import torch
from bench import (BENCH, agreement_of, load_nnunet, load_ours, peak_gb, phantom, reset_peak, run_nnunet, run_ours,
                   sync)
from forward_flops import achieved_tflops, count
from make_model import TF2_CONFIGURATION, TF2_DATASET, TF2_PLANS, build_network, make_model_folder, plans_with

from cbctseg.networks import lean_forward, precision
from cbctseg.networks.precision import autocast

T0 = time.monotonic()
RESULTS: dict = {}
STEPS = ("forward", "cudnn", "layout", "compile", "profile", "aot", "engine", "agreement", "cold")
OUT: Path | None = None


def note(key: str, value) -> None:
    RESULTS[key] = value
    print(f"[{time.monotonic() - T0:6.1f}s] {key}: {json.dumps(value)}", flush=True)
    if OUT is not None:
        (OUT / "probe.json").write_text(json.dumps(RESULTS, indent=1))


def timed_forward(net, x, n: int = 5, warm: int = 2) -> dict:
    """Median seconds of n forward passes after warm, and the peak memory of one pass above the baseline."""
    cuda = x.device.type == "cuda"
    with torch.inference_mode(), autocast(x.device):
        for _ in range(warm):
            net(x)
        sync(x.device)
        base = torch.cuda.memory_allocated() if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            y = net(x)
            sync(x.device)
            times.append(time.perf_counter() - t)
            del y
    return {"s": round(statistics.median(times), 4), "per_window_s": round(statistics.median(times) / x.shape[0], 4),
            "peak_extra_gb": round((torch.cuda.max_memory_allocated() - base) / 1e9, 2) if cuda else None}


def first_call(net, x) -> float:
    t = time.perf_counter()
    with torch.inference_mode(), autocast(x.device):
        net(x)
    sync(x.device)
    return round(time.perf_counter() - t, 2)




def _kernel_kind(name: str) -> str:
    n = name.lower()
    if n.startswith("triton"):
        return "triton (fused normalisation, activation, adds)"
    if any(k in n for k in ("nchwtonhwc", "nhwctonchw", "transpose", "copy", "cat")):
        return "layout and copies"  # before convolutions: cuDNN's layout conversions are named cudnn::…
    if any(k in n for k in ("conv", "xmma", "implicit", "cudnn", "cutlass", "sm90_", "sm80_", "wgrad", "dgrad")):
        return "convolution (cuDNN)"
    if any(k in n for k in ("norm", "reduce", "welford")):
        return "normalisation (eager)"
    if "elementwise" in n or "vectorized" in n:
        return "elementwise (eager)"
    return "other"


def profile_pass(net, x, tflop: float, passes: int = 3) -> dict:
    """Where a forward pass's time goes: kernel time by kind and the ten slowest kernels, per pass."""
    from torch.profiler import ProfilerActivity, profile

    cuda = x.device.type == "cuda"
    with torch.inference_mode(), autocast(x.device):
        for _ in range(2):
            net(x)
        sync(x.device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        t = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(passes):
                net(x)
            sync(x.device)
        wall = (time.perf_counter() - t) / passes
    # on a GPU the kernels themselves (the operators that launch them report the same time again as their own)
    events = [e for e in prof.key_averages()
              if (e.device_type == torch.autograd.DeviceType.CUDA if cuda else e.key.startswith("aten::"))]
    kernels = [(e.key, (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / passes,
                e.count // passes) for e in events]
    kernels = [k for k in kernels if k[1] > 0]
    by_kind: dict[str, float] = {}
    for name, ms, _ in kernels:
        by_kind[_kernel_kind(name)] = by_kind.get(_kernel_kind(name), 0.0) + ms
    busy = sum(by_kind.values())
    top = sorted(kernels, key=lambda k: -k[1])[:10]
    return {"wall_ms_per_pass_profiled": round(wall * 1e3, 1), "kernel_ms_per_pass": round(busy, 1),
            "tflops_over_kernel_time": achieved_tflops(tflop, busy / 1e3) if busy else None,
            "ms_by_kind": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "slowest": [{"kernel": name[:120], "ms": round(ms, 2), "calls": calls} for name, ms, calls in top]}


def channels_last_faster(results: dict) -> bool:
    """Whether the compiled channels_last_3d pass beat the compiled contiguous one by more than noise (3 %)."""
    return results["compiled_channels_last_b1"]["s"] < 0.97 * results["compiled_b1"]["s"]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(f"{float((a.float() - b.float()).abs().max()):.3g}")


def attempt(key: str, fn) -> None:
    """Run one measurement; an error is a result too, and the next step goes on."""
    try:
        fn()
    except Exception as e:
        note(f"{key}_error", f"{type(e).__name__}: {str(e)[:1500]}")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> int:
    global OUT
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget", type=float, default=480)
    p.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps of {STEPS}")
    p.add_argument("--aot-max-autotune", action="store_true", help="aot: also build with max_autotune (slow)")
    p.add_argument("--compile", default="on", choices=["on", "aot", "off"], help="engine step's networks")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (with a small --configuration)")
    p.add_argument("--configuration", default=TF2_CONFIGURATION)
    p.add_argument("--cudnn-benchmark-limit", type=int, default=None,
                   help="torch.backends.cudnn.benchmark_limit for this process (the cudnn step runs itself with 0)")
    p.add_argument("--largest", default="298x512x512", help="engine step's shape")
    p.add_argument("--median", default="169x347x371", help="agreement step's shape")
    a = p.parse_args()
    steps = set(a.only.split(","))
    if steps - set(STEPS):
        p.error(f"unknown steps {steps - set(STEPS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    OUT = a.out
    left = lambda: a.budget - (time.monotonic() - T0)  # noqa: E731
    dev = torch.device(a.device)
    torch.backends.cudnn.benchmark = True
    if a.cudnn_benchmark_limit is not None:
        torch.backends.cudnn.benchmark_limit = a.cudnn_benchmark_limit
    conf = a.configuration
    plans = plans_with(TF2_PLANS, conf)
    dataset = json.loads(TF2_DATASET.read_text())
    patch = tuple(plans["configurations"][conf]["patch_size"])
    largest, median = (tuple(int(v) for v in s.split("x")) for s in (a.largest, a.median))
    torch.manual_seed(0)
    nets = [build_network(plans, dataset, conf).to(dev).eval() for _ in range(2)]
    fp32 = copy.deepcopy(nets[0])  # as nnU-Net stores it, for the forward step's comparison
    for net in nets:  # the networks as load_model stores them
        precision.prepare(net, dev)
    note("gpu", torch.cuda.get_device_name() if dev.type == "cuda" else "none (cpu)")
    note("torch", torch.__version__)
    note("steps", sorted(steps))
    note("cudnn_benchmark_limit", torch.backends.cudnn.benchmark_limit)
    x1_fp32 = torch.randn((1, 1, *patch), device=dev)
    x1 = x1_fp32.to(precision.input_dtype(dev))
    x2 = torch.randn((2, 1, *patch), device=dev, dtype=x1.dtype)
    t = time.perf_counter()
    with torch.inference_mode(), autocast(dev):
        ref = nets[0](x1)  # eager answer: every variant's output is compared with it
    sync(dev)
    note("eager_first_call_s", round(time.perf_counter() - t, 2))  # cuDNN's autotuning of every convolution

    if "forward" in steps:
        note("eager_b1", timed_forward(nets[0], x1))
        # as before precision.prepare: fp32 weights (autocast casts them to fp16 in every pass) and an fp32 input
        note("eager_b1_fp32_weights", timed_forward(fp32, x1_fp32))
        with torch.inference_mode(), autocast(dev):
            note("eager_fp32_weights_max_diff", max_diff(fp32(x1_fp32), ref))
        lean = lean_forward.lean(nets[0])  # how the engine runs an uncompiled network
        note("eager_b1_lean", timed_forward(lean, x1))
        with torch.inference_mode(), autocast(dev):
            note("eager_lean_max_diff", max_diff(lean(x1), ref))
        note("eager_b2", timed_forward(nets[0], x2))
        torch.backends.cudnn.benchmark = False
        attempt("eager_b1_no_cudnn_benchmark", lambda: note("eager_b1_no_cudnn_benchmark", timed_forward(nets[0], x1)))
        torch.backends.cudnn.benchmark = True

    if "cudnn" in steps and left() > 120:
        # cuDNN's autotuning tries 10 algorithms per convolution by default; all of them, in a fresh process
        # (the choices are cached per process): the forward step again with benchmark_limit 0
        def all_algorithms():
            child_out = a.out / "cudnn_all_algorithms"
            r = subprocess.run([sys.executable, __file__, "--out", str(child_out), "--only", "forward",
                                "--device", a.device, "--configuration", conf, "--cudnn-benchmark-limit", "0",
                                "--budget", str(max(30, left() - 60))], capture_output=True, text=True,
                               timeout=max(30, left() - 30))
            child = json.loads((child_out / "probe.json").read_text()) if (child_out / "probe.json").is_file() else {}
            if not child:
                raise RuntimeError(r.stderr[-1500:])
            note("cudnn_all_algorithms", {k: child.get(k) for k in ("cudnn_benchmark_limit", "eager_first_call_s",
                                                                    "eager_b1", "eager_b1_lean")})
            (child_out / "probe.json").unlink()  # its numbers are in this probe's file
            child_out.rmdir()
        attempt("cudnn_all_algorithms", all_algorithms)

    cl_compiled = None
    # each gate is about what its step costs on an H100 (a compilation about 40 s): a step cut short by the
    # caller's timeout loses only itself, since every result is written as it comes
    if "layout" in steps and left() > 60:
        def layout():
            nonlocal cl_compiled
            cl = build_network(plans, dataset, conf).to(dev).eval()
            cl.load_state_dict(nets[0].state_dict())
            precision.prepare(cl, dev)
            cl = cl.to(memory_format=torch.channels_last_3d)
            xcl = x1.to(memory_format=torch.channels_last_3d)
            note("eager_channels_last_b1", timed_forward(cl, xcl))
            with torch.inference_mode(), autocast(dev):
                note("eager_channels_last_max_diff", max_diff(cl(xcl), ref))
            if left() > 50:
                c = torch.compile(cl, dynamic=False)
                note("compiled_channels_last_first_call_s", first_call(c, xcl))
                note("compiled_channels_last_b1", timed_forward(c, xcl))
                cl_compiled = (c, xcl)
        attempt("layout", layout)

    c0 = None
    if "compile" in steps and left() > 50:
        def compiled():
            nonlocal c0
            c0 = torch.compile(nets[0], dynamic=False)
            note("compile_b1_first_call_s", first_call(c0, x1))
            note("compiled_b1", timed_forward(c0, x1))
            if "compiled_channels_last_b1" in RESULTS:  # whether bench.py's run should take --channels-last
                note("channels_last_faster", channels_last_faster(RESULTS))
            c1 = torch.compile(nets[1], dynamic=False)
            note("compile_b1_second_network_first_call_s", first_call(c1, x1))
        attempt("compile", compiled)
        for mode in ("max-autotune-no-cudagraphs", "reduce-overhead"):
            if left() < 200:
                break
            def moded(mode=mode):
                torch._dynamo.reset()
                c = torch.compile(nets[0], dynamic=False, mode=mode)
                note(f"compile_{mode}_first_call_s", first_call(c, x1))
                note(f"compiled_{mode}_b1", timed_forward(c, x1))
                with torch.inference_mode(), autocast(dev):
                    note(f"compiled_{mode}_max_diff", max_diff(c(x1).clone(), ref))
            attempt(f"compile_{mode}", moded)

    if "profile" in steps and left() > 30:

        flops = count(conf)
        note("tflop_per_pass", flops["tflop_per_pass"])
        note("tflop_by_stage", flops["tflop_by_stage"])
        variants = [("eager", nets[0], x1), ("compiled", c0, x1)]
        if cl_compiled is not None:
            variants.append(("compiled_channels_last", *cl_compiled))
        for name, net, x in variants:
            if net is not None and left() > 10:
                attempt(f"profile_{name}", lambda net=net, x=x, name=name:
                        note(f"profile_{name}", profile_pass(net, x, flops["tflop_per_pass"])))

    if not steps & {"aot", "engine", "agreement", "cold"}:  # no step below needs a model folder
        return finish()
    # outside OUT, which holds results only; removed at exit (1.2 GB on a GPU)
    model_dir = Path(tempfile.mkdtemp(prefix="cbctseg-probe-"))
    atexit.register(shutil.rmtree, model_dir, ignore_errors=True)
    weights = make_model_folder(model_dir / "model", configuration=conf)
    if c0 is not None:
        from cbctseg.networks.compile_cache import save_cache

        attempt("compile_cache", lambda: note("compile_cache_mb", round(save_cache(weights, dev).stat().st_size / 1e6, 1)))

    if "aot" in steps and left() > 150:
        from cbctseg.networks import aot_package

        def aot(max_autotune: bool):
            tag = "aot_max_autotune" if max_autotune else "aot"
            path = aot_package.package_path(weights, dev)
            if max_autotune:
                path = path.with_name(path.stem + "-max-autotune.pt2")
            note(f"{tag}_build_s", round(aot_package.build(nets[0], patch, 1, dev, path, 1, max_autotune), 1))
            note(f"{tag}_package_mb", round(path.stat().st_size / 1e6, 1))
            t = time.perf_counter()
            runners = aot_package.load(nets, weights, dev, 1, path)
            note(f"{tag}_load_s", round(time.perf_counter() - t, 3))
            note(f"{tag}_first_call_s", first_call(runners[0], x1))
            note(f"{tag}_b1", timed_forward(runners[0], x1))
            with torch.inference_mode():
                note(f"{tag}_max_diff", max_diff(runners[0](x1), ref))
                note(f"{tag}_second_network_max_diff", max_diff(runners[1](x1), nets[1](x1)))
            if max_autotune:  # the engine and the cold start use the default package
                path.unlink()
        attempt("aot", lambda: aot(False))
        if a.aot_max_autotune and left() > 200:
            attempt("aot_max_autotune", lambda: aot(True))

    # the engine on the largest shape, batch 1, streamed and device accumulation
    if "engine" in steps and left() > 200:
        from cbctseg.networks.compile_cache import maybe_compile

        def engine():
            model = load_ours(weights, ["0", "1"], dev)
            backend = maybe_compile(model.networks, dev, weights, 216, None, force=a.compile != "off",
                                    aot=a.compile == "aot")
            note("engine_compile", backend.describe())
            t = time.perf_counter()
            img = phantom(largest, 0.3)
            note("phantom_largest_s", round(time.perf_counter() - t, 1))
            for acc in ("streamed", "device"):
                if left() < 120:
                    break
                args = argparse.Namespace(step=0.5, accumulate=acc, batch_size=1)
                t = time.perf_counter()
                run_ours(model, backend, img, [0.3] * 3, dev, args)
                note(f"ours_largest_{acc}_first_run_s", round(time.perf_counter() - t, 1))
                reset_peak(dev)
                _, seconds, info = run_ours(model, backend, img, [0.3] * 3, dev, args)
                note(f"ours_largest_{acc}", {**{k: round(v, 2) for k, v in seconds.items()}, **peak_gb(dev),
                                             "s_per_pass": info["seconds_per_pass"]})
        attempt("engine", engine)

    # agreement with nnU-Net on the median shape, random weights
    if "agreement" in steps and left() > 100:
        def agreement():
            model = load_ours(weights, ["0", "1"], dev)
            img = phantom(median, 0.3)
            args = argparse.Namespace(step=0.5, accumulate="device", batch_size=1)
            from cbctseg.networks.compile_cache import maybe_compile

            backend = maybe_compile(model.networks, dev, weights, 0, None, force=False, aot=False)
            ours, s_ours, _ = run_ours(model, backend, img, [0.3] * 3, dev, args)
            note("ours_median", {k: round(v, 2) for k, v in s_ours.items()})
            for n in model.networks:
                n.to("cpu")
            pred = load_nnunet(weights, ["0", "1"], dev, 0.5)
            reset_peak(dev)
            ref_labels, s_ref, info = run_nnunet(pred, img, [0.3] * 3, dev)
            note("nnunet_median_first_run", {**{k: round(v, 2) for k, v in s_ref.items()}, **peak_gb(dev)})
            note("agreement_median", agreement_of(ours, ref_labels, info["logits"], patch, 0.5))
        attempt("agreement", agreement)

    # cold starts in fresh processes (empty inductor caches; only what lies beside the weights helps)
    if "cold" in steps:
        for mode in ("off", "aot", "on"):
            if left() < 40:
                break
            if mode == "aot" and not any((weights / "compile_cache").glob("*.pt2")):
                continue
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"/tmp/ind-{mode}", "TRITON_CACHE_DIR": f"/tmp/tri-{mode}"}
            t = time.time()
            r = subprocess.run([sys.executable, str(BENCH / "first_forward.py"), "ours", str(weights), "--compile",
                                mode, "--device", a.device], capture_output=True, text=True, env=env,
                               timeout=max(10, left()))
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("FIRST_FORWARD ")), None)
            if line:
                child = json.loads(line.split(" ", 1)[1])
                note(f"cold_start_{mode}", {"to_first_forward_s": round(child["wall_at_first_forward"] - t, 1),
                                            "compile_kind": (child.get("compile") or {}).get("kind"),
                                            **{k: round(v, 2) for k, v in child.items() if k.endswith("_s")}})
            else:
                note(f"cold_start_{mode}_error", r.stderr[-1500:])
    return finish()


def finish() -> int:
    """The summary notes: every timed forward pass as an arithmetic rate, and the probe's own time."""
    if "tflop_per_pass" in RESULTS:
        note("tflops_per_window", {k: achieved_tflops(RESULTS["tflop_per_pass"], v["per_window_s"])
                                   for k, v in RESULTS.items() if isinstance(v, dict) and v.get("per_window_s")})
    note("done_s", round(time.monotonic() - T0, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
