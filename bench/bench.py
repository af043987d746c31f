"""Benchmark of issue "Fast path": our engine against nnU-Net's nnUNetPredictor, same weights, same case.

One run measures, for each phantom shape: model load, preprocess, sliding window, finalize, end to end
(image array in, label map out), peak GPU memory and voxel agreement of the two label maps; and, once,
process cold start to the first forward pass. Each number is the median of --repeats runs after a
warm-up run. Results go to bench/results/<date>-<gpu>.json and the table in bench/README.md.

    python bench/bench.py                                  # GPU: ToothFairy2 network, random weights
    python bench/bench.py --compile aot                    # our networks from an AOT package built first
    python bench/bench.py --device cpu --configuration 3d_fullres_torchres_tiny --shapes 48x80x80 --out /tmp/b
    python bench/bench.py table                            # only rebuild the README table from results/
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
README = BENCH / "README.md"
sys.path[:0] = [str(REPO), str(BENCH)]
# nnU-Net reads these at import: no dataset folders needed, our trainers findable, its predictor uncompiled
for _var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
    os.environ.setdefault(_var, "/tmp/nnunet_unused")
os.environ.setdefault("nnUNet_extTrainer", str(REPO / "cbctseg" / "training" / "nnunet_trainers"))
os.environ.setdefault("nnUNet_compile", "f")

import torch  # noqa: E402

import forward_flops  # noqa: E402
from make_model import TF2_CONFIGURATION, TF2_DATASET, TF2_PLANS, make_model_folder  # noqa: E402

MEDIAN, LARGEST = "169x347x371", "298x512x512"
SPEEDUP_TARGETS = {LARGEST: 6.0, MEDIAN: 8.0}  # nnUNetPredictor end to end / ours
PEAK_GB_TARGET, AGREEMENT_TARGET, COLD_START_TARGET_S = 12.0, 0.999, 20.0
TIE_LOGIT = 0.05  # a few fp16 roundings of an 8-pass logit sum: differences within this are ties
LOW_WEIGHT = 1e-3  # window weight sums below this make fp16 products of logits and weights lose bits
BUDGET_S = 540.0  # ToothFairy2's 10 minutes less run.py's margin: what --compile auto plans with


# ---------------------------------------------------------------- helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_gpu_gb": None, "peak_gpu_reserved_gb": None}
    return {"peak_gpu_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 3),
            "peak_gpu_reserved_gb": round(torch.cuda.max_memory_reserved(device) / 1e9, 3)}


def parse_shape(text: str) -> tuple[int, int, int]:
    z, y, x = (int(v) for v in text.lower().split("x"))
    return z, y, x


def shape_name(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def median_of(runs: list[dict]) -> dict:
    """Per-key median of a list of {name: seconds} dicts."""
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def environment(device: torch.device) -> dict:
    from cbctseg.networks.device import describe

    env = describe(device)
    for pkg in ("nnunetv2", "dynamic_network_architectures", "numpy", "SimpleITK"):
        try:
            env[pkg] = version(pkg)
        except Exception:
            env[pkg] = None
    env["cpu"] = platform.processor() or platform.machine()
    env["cpu_count"] = os.cpu_count()
    return env


def phantom(shape: tuple[int, int, int], spacing: float, seed: int = 0) -> np.ndarray:
    """A CBCT-like phantom as our reader returns it: integer HU values in a float32 array (z, y, x)."""
    from cbctseg.training.phantom import PhantomSpec, make_phantom_arrays

    image, _ = make_phantom_arrays(PhantomSpec(shape=shape, spacing=(spacing,) * 3, seed=seed))
    return np.round(image).astype(np.int16).astype(np.float32)


def expected_forwards(patch: tuple[int, ...], n_folds: int, mirror_axes: tuple[int, ...], shape: tuple[int, ...],
                      step: float) -> tuple[int, int]:
    """(windows, window forwards) for a case of this network-space shape."""
    from cbctseg.inference.schedule import plan_case

    plan = plan_case(tuple(shape), tuple(patch), step, n_folds, tuple(mirror_axes), True)
    return len(plan.windows), len(plan.items)


def _checkpoint(weights: Path, fold: str) -> dict:
    return torch.load(weights / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu", mmap=True,
                      weights_only=False)


def model_geometry(weights: Path, folds: list[str]) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
    """(patch, number of models, mirror axes) of a model folder, without building its networks."""
    ckpt = _checkpoint(weights, folds[0])
    plans = json.loads((weights / "plans.json").read_text())
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    patch = PlansManager(plans).get_configuration(ckpt["init_args"]["configuration"]).patch_size
    return tuple(patch), len(folds), tuple(ckpt.get("inference_allowed_mirroring_axes") or ())


def forward_tflop(weights: Path, folds: list[str]) -> float:
    """Flops of one forward pass of a window (forward_flops.py), for the arithmetic rate a pass time stands for."""
    configuration = _checkpoint(weights, folds[0])["init_args"]["configuration"]
    return forward_flops.count(configuration, 1, weights / "plans.json", weights / "dataset.json")["tflop_per_pass"]


# ---------------------------------------------------------------- our engine

def load_ours(weights: Path, folds: list[str], device: torch.device):
    from cbctseg.model.loading import load_model

    return load_model(weights, folds, device)


def run_ours(model, backend, image: np.ndarray, spacing: list[float], device: torch.device,
             args) -> tuple[np.ndarray, dict, dict]:
    """Image array in, label map (contiguous labels, CPU) out; seconds per stage and what the engine chose."""
    from cbctseg.inference.finalize import finalize
    from cbctseg.inference.postprocess import to_fdi
    from cbctseg.inference.preprocess import preprocess
    from cbctseg.resources import cutoffs, label_map
    from cbctseg.inference.predictor import predict
    from cbctseg.case import choose_accumulation

    t = {}
    sync(device)
    t0 = time.perf_counter()
    pre = preprocess(image, spacing, model, device)
    sync(device)
    t1 = time.perf_counter()
    resampled = tuple(pre.data.shape[1:]) != tuple(pre.shape_after_cropping)
    accumulation = choose_accumulation(model, tuple(pre.data.shape[1:]), resampled, device, args.accumulate,
                                       args.batch_size)
    result, is_labels, report = predict(model, backend, pre.data, args.step, True, accumulation, None,
                                        args.batch_size, progress=False)
    sync(device)
    t2 = time.perf_counter()
    labels = finalize(result, pre, model, device, is_labels)
    del result
    lm = label_map()
    if model.num_classes == lm.num_classes:  # the real pipeline's post-processing, as case.py does it
        to_fdi(labels, lm, cutoffs())[0].cpu().numpy()
    else:
        labels.cpu().numpy()
    t3 = time.perf_counter()
    t.update(preprocess=t1 - t0, sliding_window=t2 - t1, finalize=t3 - t2, end_to_end=t3 - t0)
    out = labels.cpu().numpy()  # contiguous labels, for agreement (outside the timing)
    info = {"accumulation": getattr(accumulation, "value", str(accumulation)),
            "network_input_shape": list(pre.data.shape[1:]),
            "seconds_per_pass": getattr(report, "seconds_per_item", None),
            "passes_done": getattr(report, "items_done", None), "events": getattr(report, "events", [])}
    return out, t, info


# ---------------------------------------------------------------- nnU-Net's predictor

def load_nnunet(weights: Path, folds: list[str], device: torch.device, step: float):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    p = nnUNetPredictor(tile_step_size=step, use_gaussian=True, use_mirroring=True, perform_everything_on_device=True,
                        device=device, verbose=False, allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(weights), use_folds=tuple(int(f) if f.isdigit() else f for f in folds))
    return p


def run_nnunet(p, image: np.ndarray, spacing: list[float], device: torch.device) -> tuple[np.ndarray, dict, dict]:
    """What nnUNetPredictor.predict_single_npy_array does, with a timer per stage."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    sync(device)
    t0 = time.perf_counter()
    pre = p.configuration_manager.preprocessor_class(verbose=False)
    data, _, props = pre.run_case_npy(image[None], None, {"spacing": list(spacing)}, p.plans_manager,
                                      p.configuration_manager, p.dataset_json)
    data = torch.from_numpy(data)
    t1 = time.perf_counter()
    logits = p.predict_logits_from_preprocessed_data(data).cpu()
    t2 = time.perf_counter()
    seg = convert_predicted_logits_to_segmentation_with_correct_shape(logits, p.plans_manager, p.configuration_manager,
                                                                      p.label_manager, props)
    t3 = time.perf_counter()
    seconds = {"preprocess": t1 - t0, "sliding_window": t2 - t1, "finalize": t3 - t2, "end_to_end": t3 - t0}
    # the logits tell near-ties from real disagreements, when they lie on the label map's grid
    same_grid = (tuple(logits.shape[1:]) == seg.shape and list(p.plans_manager.transpose_forward) == [0, 1, 2])
    return seg, seconds, {"logits": logits if same_grid else None}


# ---------------------------------------------------------------- cold start

def child_env(tmp: Path, tag: str) -> dict:
    """A fresh inductor/triton cache per child: only the portable cache beside the weights may help it."""
    env = dict(os.environ)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / f"inductor-{tag}")
    env["TRITON_CACHE_DIR"] = str(tmp / f"triton-{tag}")
    return env


def cold_start(engine: str, weights: Path, args, passes: int, tmp: Path, compile_mode: str = "off") -> dict:
    """Spawn `python bench/first_forward.py`, wall time from spawn to the end of its first forward pass."""
    runs, children = [], []
    for i in range(args.cold_repeats):
        cmd = [sys.executable, str(BENCH / "first_forward.py"), engine, str(weights), "--device", args.device,
               "--folds", *args.folds, "--passes", str(passes), "--budget", str(BUDGET_S), "--compile", compile_mode]
        spawned = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(tmp, f"{engine}-{compile_mode}-{i}"),
                           cwd=tmp)
        exited = time.time()
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("FIRST_FORWARD ")), None)
        if r.returncode != 0 or line is None:
            raise RuntimeError(f"cold start {engine} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        child = json.loads(line[len("FIRST_FORWARD "):])
        runs.append({"to_first_forward_s": child["wall_at_first_forward"] - spawned, "process_s": exited - spawned,
                     "import_s": child["import_s"], "load_s": child["load_s"], "first_forward_s": child["forward_s"]})
        children.append(child.get("compile"))
    return {**median_of(runs), "runs": runs, "compile": children[-1]}


def make_compile_cache(weights: Path, args, tmp: Path, aot: bool = False) -> dict:
    """`python -m cbctseg.networks.compile_cache [--aot]` in a fresh process (cold compile): the portable cache, or the AOT
    package, that the engine ships with."""
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "cbctseg.networks.compile_cache", "--weights", str(weights), "--device",
                        args.device, "--batch-size", str(args.batch_size), *(["--aot"] if aot else [])],
                       capture_output=True, text=True, cwd=REPO, env=child_env(tmp, "make-cache"))
    if r.returncode != 0:
        raise RuntimeError(f"making the {'AOT package' if aot else 'compile cache'} failed:\n{r.stderr[-3000:]}")
    return {"process_s": round(time.time() - t0, 2), "output": r.stdout.strip().splitlines()[-1:]}


# ---------------------------------------------------------------- one shape

def bench_shape(shape, image: np.ndarray, ours, nnunet, weights: Path, device: torch.device, args) -> dict:
    from cbctseg.networks.compile_cache import maybe_compile

    spacing = [args.spacing] * 3
    m = ours["model"]
    windows, passes = expected_forwards(m.patch_size, len(m.folds), m.mirror_axes, shape, args.step)
    case = {"shape": list(shape), "name": shape_name(shape), "windows": windows, "passes": passes}
    labels, ref_logits = {}, None
    for engine in args.engines:
        # only this engine's networks on the GPU, so peak memory is its own
        if engine == "ours":
            if nnunet:
                nnunet["predictor"].network.to("cpu")
            model = ours["model"]
            for net in ours["eager"]:
                net.to(device)
            # as process.py runs them: eager networks run lean; aot: the package the run built beside the weights
            force = {"auto": None, "off": False}.get(args.compile, True)
            backend = maybe_compile(ours["eager"], device, weights, passes, BUDGET_S, force=force)
            decision = backend.describe()
            if args.compile == "aot" and decision.get("kind") != "aot":
                if not args.aot_fallback:
                    raise RuntimeError(f"--compile aot, but the package was not used: {decision}")
                # it did not load (the log says why): maybe_compile fell back to torch.compile, and so does the run
                args.compile = "on"
            if decision["compile"] and decision.get("kind") != "aot":
                # one compiled wrapper per network for the whole run: a new wrapper per shape would compile
                # again inside the timed run of a shape that gets no warm-up of its own
                backend = ours.setdefault("compiled", backend)
            run = lambda img=image, m=model, b=backend: run_ours(m, b, img, spacing, device, args)  # noqa: E731
        else:
            # package runners hold the parameters they were bound to: drop them, or the GPU keeps our weights
            backend = run = None
            for net in ours["eager"]:
                net.to("cpu")
            run = lambda img=image: run_nnunet(nnunet["predictor"], img, spacing, device)  # noqa: E731
        free(device)
        warmup_s = None
        if args.warmup == "each" or engine not in args.warmed:
            # cudnn autotuning, compilation, first network transfer: they depend on the window shape only, which
            # every case shares (--warmup window: a case of one window does them, for less time than a real case)
            reset_peak(device)
            t0 = time.perf_counter()
            run(args.window_image if args.warmup == "window" else image)
            warmup_s = round(time.perf_counter() - t0, 2)
            args.warmed.add(engine)
            free(device)
        runs, peaks = [], []
        for _ in range(args.repeats):
            reset_peak(device)
            labels[engine], seconds, info = run()
            peaks.append(peak_gb(device))
            runs.append(seconds)
            free(device)
        ref_logits = info.pop("logits", None) if engine == "nnunet" else ref_logits
        load = ours["load_s"] if engine == "ours" else nnunet["load_s"]
        case[engine] = {"load_s": load, **median_of(runs), "warmup_run_s": warmup_s,
                        **max(peaks, key=lambda p: p["peak_gpu_gb"] or 0), "runs": runs, **info}
        # the sliding window's arithmetic rate: how far its passes are from what the GPU could compute
        case[engine]["sliding_window_tflops"] = forward_flops.achieved_tflops(passes * args.tflop,
                                                                              case[engine]["sliding_window"])
        if engine == "ours":
            case[engine]["compile"] = decision
        print(f"  {engine:6s} {shape_name(shape)}: end to end {case[engine]['end_to_end']:.2f} s "
              f"(sliding window {case[engine]['sliding_window']:.2f} s), peak GPU {case[engine]['peak_gpu_gb']} GB",
              flush=True)
    if "ours" in labels and "nnunet" in labels:
        a, b = labels["ours"], labels["nnunet"]
        if a.shape != b.shape:
            raise RuntimeError(f"label maps differ in shape: ours {a.shape}, nnU-Net {b.shape}")
        case.update(agreement_of(a, b, ref_logits, ours["model"].patch_size, args.step))
        case["structures_in_reference"] = int(np.count_nonzero(np.bincount(b.ravel())[1:]))
        del ref_logits
        case["speedup"] = {k: round(case["nnunet"][k] / case["ours"][k], 2) if case["ours"][k] > 0 else None
                           for k in ("load_s", "preprocess", "sliding_window", "finalize", "end_to_end")}
        print(f"  agreement {case['agreement']:.6f} ({case['differing_voxels']} voxels differ), "
              f"end-to-end speed-up {case['speedup']['end_to_end']}x", flush=True)
    return case


def window_weight(idx: tuple[np.ndarray, ...], shape: tuple[int, ...], patch: tuple[int, ...],
                  step: float) -> np.ndarray:
    """Sum of the sliding window's Gaussian weights (nnU-Net's, in fp32) at voxels idx of an unpadded image."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    from cbctseg.inference.schedule import sliding_windows

    g = compute_gaussian(tuple(patch), 1.0 / 8, value_scaling_factor=10, device=torch.device("cpu")).float().numpy()
    w = np.zeros(len(idx[0]), dtype=np.float64)
    for win in sliding_windows(shape, tuple(patch), step):
        inside = np.logical_and.reduce([(i >= s.start) & (i < s.stop) for i, s in zip(idx, win)])
        w[inside] += g[tuple(i[inside] - s.start for i, s in zip(idx, win))]
    return w


def agreement_of(ours: np.ndarray, ref: np.ndarray, ref_logits: torch.Tensor | None, patch: tuple[int, ...],
                 step: float) -> dict:
    """Voxel agreement, and why voxels differ: a near-tie in nnU-Net's logits, the image's outer shell where
    the Gaussian weights underflow fp16 in both engines, or neither ("other": a real difference).

    Random weights make many near-ties between 43 classes; trained weights few.
    """
    diff = ours != ref
    out = {"agreement": float(1.0 - diff.mean()), "differing_voxels": int(diff.sum())}
    if ref_logits is None or any(s < p for s, p in zip(ours.shape, patch)):
        return out  # logits not on the label grid, or a padded image: no breakdown
    idx = np.nonzero(diff)
    lg = ref_logits[(slice(None), *(torch.from_numpy(i) for i in idx))].float()  # (classes, differing voxels)
    cols = torch.arange(lg.shape[1])
    margin = (lg[torch.from_numpy(ref[idx]).long(), cols] - lg[torch.from_numpy(ours[idx]).long(), cols]).numpy()
    tie = margin <= TIE_LOGIT
    shell = ~tie & (window_weight(idx, ours.shape, patch, step) < LOW_WEIGHT)
    other = int((~tie & ~shell).sum())
    out.update({"differing_near_tie": int(tie.sum()), "differing_low_weight": int(shell.sum()),
                "differing_other": other, "agreement_other": float(1.0 - other / diff.size),
                "tie_logit": TIE_LOGIT, "low_weight": LOW_WEIGHT})
    return out


# ---------------------------------------------------------------- targets and the README table

def targets(result: dict) -> list[dict]:
    """The issue's targets, each with the measured value and pass/fail (None: not measured in this run)."""
    rows = []
    cases = {c["name"]: c for c in result.get("cases", [])}
    for name, factor in SPEEDUP_TARGETS.items():
        c = cases.get(name, {})
        v = c.get("speedup", {}).get("end_to_end")
        rows.append({"target": f"end to end <= 1/{factor:g} of nnUNetPredictor on {name}", "limit": factor,
                     "value": v, "pass": None if v is None else v >= factor})
    v = cases.get(LARGEST, {}).get("ours", {}).get("peak_gpu_gb")
    rows.append({"target": f"peak GPU memory <= {PEAK_GB_TARGET:g} GB on {LARGEST}", "limit": PEAK_GB_TARGET,
                 "value": v, "pass": None if v is None else v <= PEAK_GB_TARGET})
    agreements = [c["agreement"] for c in cases.values() if "agreement" in c]
    v = min(agreements) if agreements else None
    rows.append({"target": f"voxel agreement >= {AGREEMENT_TARGET:.1%} (every shape)", "limit": AGREEMENT_TARGET,
                 "value": v, "pass": None if v is None else v >= AGREEMENT_TARGET})
    for key, what in (("ours", f"compile {result.get('settings', {}).get('compile', 'off')}"),
                      ("ours_eager", "compile off")):
        v = result.get("cold_start", {}).get(key, {}).get("to_first_forward_s")
        if key == "ours" or v is not None:
            rows.append({"target": f"cold start to first forward <= {COLD_START_TARGET_S:g} s ({what})",
                         "limit": COLD_START_TARGET_S, "value": v, "pass": None if v is None else v <= COLD_START_TARGET_S})
    return rows


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _pf(p) -> str:
    return "n/a" if p is None else ("pass" if p else "FAIL")


def table(results: list[dict]) -> str:
    """Markdown: a summary row per (result, shape), the targets per result, and the stages per engine."""
    if not results:
        return "No GPU run recorded yet.\n"
    out = [("| run | GPU | compile | shape | nnU-Net end to end s | ours end to end s | speed-up | target | "
            "peak GPU GB ours / nnU-Net | agreement (excluding ties and shell) |"),
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for c in r["cases"]:
            o, n = c.get("ours", {}), c.get("nnunet", {})
            tgt = SPEEDUP_TARGETS.get(c["name"])
            sp = c.get("speedup", {}).get("end_to_end")
            verdict = "-" if tgt is None or sp is None else f">= {tgt:g}x {_pf(sp >= tgt)}"
            out.append(f"| {r['label']} | {r['environment'].get('gpu', r['environment']['device'])} | "
                       f"{r['settings']['compile']} | {c['name']} | {_f(n.get('end_to_end'))} | "
                       f"{_f(o.get('end_to_end'))} | {_f(sp, '{:.2f}x')} | {verdict} | "
                       f"{_f(o.get('peak_gpu_gb'))} / {_f(n.get('peak_gpu_gb'))} | "
                       f"{_f(c.get('agreement'), '{:.4%}')} ({_f(c.get('agreement_other'), '{:.4%}')}) |")
    out += ["", "| run | target | value | result |", "|---|---|---|---|"]
    for r in results:
        for t in targets(r):
            out.append(f"| {r['label']} | {t['target']} | {_f(t['value'], '{:.4g}')} | {_pf(t['pass'])} |")
    out += ["", ("| run | shape | engine | model load s | preprocess s | sliding window s | finalize s | "
                 "end to end s | cold start to first forward s |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for c in r["cases"]:
            for e in ("nnunet", "ours"):
                s = c.get(e)
                if s:
                    cold = r.get("cold_start", {}).get(e, {}).get("to_first_forward_s")
                    out.append(f"| {r['label']} | {c['name']} | {e} | {_f(s['load_s'])} | {_f(s['preprocess'])} | "
                               f"{_f(s['sliding_window'])} | {_f(s['finalize'])} | {_f(s['end_to_end'])} | "
                               f"{_f(cold)} |")
    return "\n".join(out) + "\n"


def refresh_readme(results_dir: Path, readme: Path) -> None:
    """Rewrite the part of the README between the result markers from every results/*.json."""
    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json")) if p.name != "partial.json"]
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    text = readme.read_text() if readme.is_file() else f"# Benchmark results\n\n{start}\n{end}\n"
    if start not in text or end not in text:
        raise RuntimeError(f"{readme} lacks the markers {start} / {end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table(results)}{end}{tail}")


# ---------------------------------------------------------------- main

def result_path(out_dir: Path, env: dict, compile_mode: str) -> tuple[str, Path]:
    gpu = slug(env.get("gpu") or env["device"])
    label = f"{dt.date.today().isoformat()}-{gpu}" + ("" if compile_mode == "off" else f"-compile-{compile_mode}")
    path, k = out_dir / f"{label}.json", 2
    while path.exists():
        path, k = out_dir / f"{label}-{k}.json", k + 1
    return path.stem, path


def run_bench(args) -> dict:
    def save(result: dict) -> None:
        """The result so far, so that a run cut short still leaves what it measured."""
        result["settings"]["compile"] = args.compile  # "on" where --aot-fallback had to leave the package
        result["targets"] = targets(result)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "partial.json").write_text(json.dumps(result, indent=1))

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    tmp = args.tmp
    weights = args.weights
    if weights is None:
        t0 = time.perf_counter()
        weights = make_model_folder(tmp / "model", args.plans, args.dataset, args.configuration,
                                    tuple(int(f) for f in args.folds), fit_steps=args.fit_steps, device=device)
        print(f"model folder {weights} ({time.perf_counter() - t0:.1f} s)", flush=True)
    env = environment(device)
    args.tflop = forward_tflop(weights, args.folds)
    result = {"schema": 1, "date": dt.datetime.now().isoformat(timespec="seconds"), "environment": env,
              "complete": False,
              "settings": {"weights": json.loads((weights / "provenance.json").read_text())["weights"]
                           if args.weights is None else str(args.weights),
                           "configuration": args.configuration if args.weights is None else None,
                           "folds": args.folds, "step": args.step, "mirroring": "from the checkpoints",
                           "repeats": args.repeats, "compile": args.compile, "batch_size": args.batch_size,
                           "accumulate": args.accumulate, "spacing_mm": args.spacing, "engines": args.engines,
                           "tflop_per_pass": args.tflop},
              "cold_start": {}, "cases": []}
    print(f"environment: {json.dumps(env)}", flush=True)
    # cold starts first, before this process holds GPU memory of its own
    if args.compile == "aot":
        try:
            result["aot_package"] = make_compile_cache(weights, args, tmp, aot=True)
            print(f"AOT package: {result['aot_package']}", flush=True)
        except RuntimeError as e:
            if not args.aot_fallback:
                raise
            # --aot-fallback: a run that cannot build the package still measures the engine, with torch.compile
            result["aot_package_error"] = str(e)[-3000:]
            args.compile = "on"
            print(f"AOT package failed, compile on instead: {str(e)[-1000:]}", flush=True)
    if args.compile in ("on", "auto") and device.type == "cuda" and not args.no_cache:
        result["compile_cache"] = make_compile_cache(weights, args, tmp)
        print(f"compile cache: {result['compile_cache']}", flush=True)
    if args.cold_repeats > 0:
        largest = max(shapes, key=lambda s: int(np.prod(s)))
        _, passes = expected_forwards(*model_geometry(weights, args.folds), largest, args.step)
        runs = [(e, args.compile if e == "ours" else "off") for e in args.engines]
        if "ours" in args.engines and args.compile != "off":
            runs.insert(1, ("ours", "off"))  # the eager path too: one case without a compile cache takes it
        for engine, mode in runs:
            key = engine if engine == "nnunet" or mode == args.compile else f"{engine}_eager"
            result["cold_start"][key] = cold_start(engine, weights, args, passes, tmp, mode)
            cold = result["cold_start"][key]["to_first_forward_s"]
            print(f"  {key:10s} cold start to first forward {cold:.1f} s", flush=True)
        save(result)
    # this process's own TorchInductor cache, so in-process compile times are not from an older run's
    os.environ.update({k: v for k, v in child_env(tmp, "bench").items() if k.endswith("CACHE_DIR")})
    ours = nnunet = None
    loads = []
    for _ in range(args.repeats):
        free(device)
        t0 = time.perf_counter()
        model = load_ours(weights, args.folds, device)
        sync(device)
        loads.append(time.perf_counter() - t0)
    ours = {"model": model, "eager": list(model.networks), "load_s": round(statistics.median(loads), 3)}
    if "nnunet" in args.engines:
        loads = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            predictor = load_nnunet(weights, args.folds, device, args.step)
            loads.append(time.perf_counter() - t0)
        nnunet = {"predictor": predictor, "load_s": round(statistics.median(loads), 3)}
    if args.warmup == "window":
        args.window_image = phantom(model_geometry(weights, args.folds)[0], args.spacing)
    for shape in shapes:
        t0 = time.perf_counter()
        image = phantom(shape, args.spacing)
        print(f"shape {shape_name(shape)}: phantom in {time.perf_counter() - t0:.1f} s", flush=True)
        result["cases"].append(bench_shape(shape, image, ours, nnunet, weights, device, args))
        del image
        save(result)  # also the settings and targets of the final result
    result["complete"] = True
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["table"]:
        p = argparse.ArgumentParser(prog="bench.py table", description="rebuild the README table from results")
        p.add_argument("--results", type=Path, default=RESULTS)
        p.add_argument("--readme", type=Path, default=README)
        a = p.parse_args(argv[1:])
        refresh_readme(a.results, a.readme)
        print(f"table in {a.readme} rebuilt from {a.results}")
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default=f"{MEDIAN},{LARGEST}", help="comma-separated ZxYxX phantom shapes")
    p.add_argument("--spacing", type=float, default=0.3, help="isotropic phantom spacing, mm (ToothFairy2: 0.3)")
    p.add_argument("--weights", type=Path, default=None,
                   help="an existing model folder (e.g. weights/); default: random weights from --plans")
    p.add_argument("--plans", type=Path, default=TF2_PLANS)
    p.add_argument("--dataset", type=Path, default=TF2_DATASET)
    p.add_argument("--configuration", default=TF2_CONFIGURATION)
    p.add_argument("--folds", nargs="+", default=["0", "1"])
    p.add_argument("--step", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--cold-repeats", type=int, default=None,
                   help="cold-start processes per engine (default: --repeats)")
    p.add_argument("--compile", nargs="?", const="on", default="off", choices=["off", "on", "auto", "aot"],
                   help="compile our networks: torch.compile (on), cbctseg.networks.compile_cache's rule (auto), or an AOT "
                        "package built first by `python -m cbctseg.networks.compile_cache --aot` (aot)")
    p.add_argument("--aot-fallback", action="store_true",
                   help="with --compile aot: when the package cannot be built or loaded, record why and run with "
                        "torch.compile (--compile on) instead of stopping")
    p.add_argument("--no-cache", action="store_true",
                   help="with --compile: do not make the portable compile cache first")
    p.add_argument("--batch-size", type=int, default=1, help="our engine's windows per forward pass")
    p.add_argument("--fit-steps", type=int, default=None,
                   help="fit the random networks to a phantom for N steps so their logits are decisive "
                        "(default: 40 on a GPU, 0 on the CPU; ignored with --weights)")
    p.add_argument("--warmup", default="window", choices=["window", "first", "each"],
                   help="untimed warm-up run per engine, once, on a case of one window's shape (all shapes share "
                        "the window shape), once on the first shape, or on each shape")
    p.add_argument("--accumulate", default="auto", choices=["auto", "device", "cpu", "streamed", "streamed-cpu"])
    p.add_argument("--engines", nargs="+", default=["ours", "nnunet"], choices=["ours", "nnunet"])
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the result JSON (smoke runs: not results/)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary model folder and caches")
    p.add_argument("--readme", type=Path, default=None,
                   help="README whose table to refresh (default: bench/README.md for results/, else OUT/README.md)")
    a = p.parse_args(argv)
    a.cold_repeats = a.repeats if a.cold_repeats is None else a.cold_repeats
    if a.fit_steps is None:
        a.fit_steps = 40 if torch.device(a.device).type == "cuda" else 0
    a.warmed = set()
    if torch.device(a.device).type != "cuda" and a.out.resolve() == RESULTS.resolve():
        p.error("a run without a GPU is a smoke run: give --out (bench/results/ holds GPU runs only)")
    a.folds = [str(f) for f in a.folds]
    a.tmp = Path(tempfile.mkdtemp(prefix="cbctseg-bench-"))  # model folder (1.2 GB for ToothFairy2), compile caches
    try:
        result = run_bench(a)
    finally:
        if not a.keep_tmp:
            shutil.rmtree(a.tmp, ignore_errors=True)
    a.out.mkdir(parents=True, exist_ok=True)
    result["label"], path = result_path(a.out, result["environment"], a.compile)
    path.write_text(json.dumps(result, indent=1))
    (a.out / "partial.json").unlink(missing_ok=True)
    readme = a.readme or (README if a.out.resolve() == RESULTS.resolve() else a.out / "README.md")
    refresh_readme(a.out, readme)
    for t in result["targets"]:
        print(f"  {_pf(t['pass']):4s} {t['target']}: {_f(t['value'], '{:.4g}')}")
    print(f"results: {path}\ntable: {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
