"""Peak host memory (and GPU memory, on a GPU) of the real pipeline: `process.py` in a fresh process per case.

A model folder of the ToothFairy2 configuration (patch 160x320x320, 43 classes, 7 stages) is built with
`make_model.py`, by default *narrowed* (4..32 features, one block per stage) so that a CPU runs it: the logit
sums, the chunks of a window's 43-channel output and finalize do not depend on the width, the network's own
activations do. Each case is a phantom at the plans' 0.3 mm spacing (no resampling: the ToothFairy2 path), written
once to --work and reused. Each run is `process.py` on one case in its own process; its peak resident set
size is the kernel's (`wait4`'s ru_maxrss), its GPU peak `torch.cuda.max_memory_allocated` from the case
report. A guard kills a run whose resident set passes --rss-limit-gb (recorded as exceeded), so that a
version that would take the machine's memory cannot.

    python bench/host_memory.py [--shapes 8x512x512 298x512x512] [--device cpu] [--folds 0] [--no-mirroring]
        [--ensemble-spacing 1.5] [--gpu-memory-gb 15] [--code DIR] [--label after] [--machine "..."]
        [--out bench/results/host_memory/DATE-LABEL.json]

--ensemble-spacing F runs an ensemble instead of one model: the model and a copy of it under a configuration
whose spacing is F times coarser (it resamples; the first does not), packed by `process.py ensemble` with
--folds as each member's folds.

--gpu-memory-gb G lets each run use at most G GB of the GPU (process.py's option): on a large GPU, what a GPU of
that size does, its placement of the sums and its fallbacks included.

--code DIR runs another checkout's process.py (e.g. the code before a change) on the same model and cases.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

NARROW_FEATURES = [4, 8, 16, 32, 32, 32, 32]
NARROW_BLOCKS = [1, 1, 1, 1, 1, 1, 1]
TF2_SPACING = (0.3, 0.3, 0.3)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process now (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def write_case(folder: Path, shape: tuple[int, ...]) -> Path:
    """A phantom of shape (z, y, x) at 0.3 mm in folder/<shape>/case.mha (kept for later runs)."""
    import SimpleITK as sitk

    from cbctseg.training.phantom import PhantomSpec, make_phantom

    path = folder / "x".join(map(str, shape)) / "case.mha"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        image, _ = make_phantom(PhantomSpec(shape=shape, spacing=TF2_SPACING, seed=0))
        sitk.WriteImage(image, str(path.with_suffix(".tmp.mha")), useCompression=True)
        os.replace(path.with_suffix(".tmp.mha"), path)
    return path


def make_ensemble(model: Path, work: Path, factor: float, folds: list[str] | None) -> Path:
    """An ensemble folder of `model` and its copy at `factor` times the spacing (built once, kept in work)."""
    sys.path.insert(0, str(REPO / "test"))
    from ensemble_reference import make_second_configuration

    coarse = work / f"{model.name}-coarse{factor:g}"
    if not (coarse / "plans.json").is_file():
        make_second_configuration(model, coarse, spacing_factor=factor)
    out = work / f"ensemble-{model.name}-{factor:g}-folds{'-'.join(folds or ['all'])}"
    if not (out / "ensemble.json").is_file():
        member_args = []
        for m in (model, coarse):
            member_args += ["--member", str(m)] + (["--folds", *folds] if folds else [])
        subprocess.run([sys.executable, str(REPO / "process.py"), "ensemble", "--out", str(out), *member_args],
                       check=True, cwd=REPO)
    return out


def run_case(code: Path, case: Path, model: Path, out: Path, args: argparse.Namespace) -> dict:
    """process.py on one case in a fresh process: peak RSS, wall time, exit status, the case report."""
    report_file = out / "report.json"
    cmd = [sys.executable, str(code / "process.py"), "--input", str(case.parent), "--output", str(out / "output"),
           "--weights", str(model), "--device", args.device, "--step-size", str(args.step_size),
           "--time-budget", "0", "--compile", args.compile, "--report", str(report_file)]
    if args.folds and not args.ensemble_spacing:  # an ensemble file lists its members' folds
        cmd += ["--folds", *args.folds]
    if args.no_mirroring:
        cmd.append("--no-mirroring")
    if args.gpu_memory_gb:
        cmd += ["--gpu-memory-gb", str(args.gpu_memory_gb)]
    env = {**os.environ, "nnUNet_compile": "f"}
    env.setdefault("nnUNet_def_n_proc", "2")
    limit = int(args.rss_limit_gb * 1e9)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    reader.start()
    timeline, exceeded, sampled_peak = [], False, 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        rss = rss_bytes(proc.pid)
        sampled_peak = max(sampled_peak, rss)
        if not timeline or time.monotonic() - t0 - timeline[-1][0] >= 1.0:
            timeline.append((round(time.monotonic() - t0, 1), round(rss / 1e9, 3)))
        if rss > limit and not exceeded:
            exceeded = True
            os.kill(proc.pid, signal.SIGKILL)
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(5)
    wall = time.monotonic() - t0
    report = json.loads(report_file.read_text())[0] if report_file.is_file() else None
    result = {
        "exit_code": proc.returncode, "wall_s": round(wall, 1),
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3),
        "rss_limit_exceeded": exceeded, "rss_limit_gb": args.rss_limit_gb,
        "rss_timeline_s_gb": timeline,
    }
    if report:
        result.update({"status": report.get("status"), "error": report.get("error"),
                       "peak_gpu_memory_gb": report.get("peak_gpu_memory_gb"),
                       "peak_gpu_reserved_gb": report.get("peak_gpu_reserved_gb"),
                       "accumulation": report.get("prediction", {}).get("accumulation") or [
                           m.get("prediction", {}).get("accumulation") for m in report["prediction"].get("models", [])],
                       "windows": report.get("prediction", {}).get("windows"),
                       "passes_done": report.get("prediction", {}).get("items_done"),
                       "seconds": report.get("seconds")})
    else:
        result["stderr_tail"] = "".join(stderr)[-2000:]
    return result


def git_commit(code: Path) -> str | None:
    """The checkout's commit, with "+changes" when its tracked files differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(code), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(code), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return (head + "+changes" if changed else head) or None


def _shown(code: Path) -> str:
    """The checkout as the result names it: "." for this repository, else the path given."""
    return "." if code.resolve() == REPO.resolve() else str(code)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["8x512x512", "298x512x512"], help="cases, ZxYxX at 0.3 mm")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="process.py --gpu-memory-gb: the GPU memory a run may use, as on a GPU of that size")
    p.add_argument("--folds", nargs="+", default=None, help="folds to run (default: both)")
    p.add_argument("--no-mirroring", action="store_true")
    p.add_argument("--step-size", type=float, default=0.5)
    p.add_argument("--compile", default="off", choices=["auto", "on", "off"])
    p.add_argument("--full-width", action="store_true", help="the ToothFairy2 network's own width (GPU)")
    p.add_argument("--weights", type=Path, default=None, help="a model folder to use instead of building one")
    p.add_argument("--code", type=Path, default=REPO, help="checkout whose process.py runs (default: this one)")
    p.add_argument("--label", default="current", help="names the run in the result file")
    p.add_argument("--machine", default=platform.node(), help="how the result names this machine")
    p.add_argument("--ensemble-spacing", type=float, default=None,
                   help="run an ensemble of the model and a copy at this many times its spacing")
    p.add_argument("--rss-limit-gb", type=float, default=12.0, help="kill a run whose resident set passes this")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cbctseg-host-memory",
                   help="model folder and cases are kept here between runs")
    p.add_argument("--out", type=Path, default=None,
                   help="result JSON (default bench/results/host_memory/DATE-LABEL.json)")
    a = p.parse_args(argv)

    from make_model import TF2_CONFIGURATION, make_model_folder

    model = a.weights
    if model is None:
        model = a.work / ("model-full" if a.full_width else "model-narrow")
        if not (model / "plans.json").is_file():
            make_model_folder(model, folds=(0, 1), features=None if a.full_width else NARROW_FEATURES,
                              blocks=None if a.full_width else NARROW_BLOCKS)
    if a.ensemble_spacing:
        model = make_ensemble(model, a.work, a.ensemble_spacing, a.folds)
    date = datetime.date.today().isoformat()
    # not results/*.json: bench.py table reads those
    out = a.out or BENCH / "results" / "host_memory" / f"{date}-{a.label}.json"
    result = {
        "date": date, "label": a.label, "machine": a.machine, "cpu_count": os.cpu_count(),
        "code": _shown(a.code), "code_commit": git_commit(a.code), "python": platform.python_version(),
        "settings": {"device": a.device, "gpu_memory_limit_gb": a.gpu_memory_gb, "folds": a.folds or "all",
                     "mirroring": not a.no_mirroring, "step_size": a.step_size, "compile": a.compile,
                     "configuration": TF2_CONFIGURATION,
                     "network": "ToothFairy2 width" if a.full_width else
                     f"narrowed: features {NARROW_FEATURES}, blocks {NARROW_BLOCKS}",
                     "model": str(model), "spacing_mm": TF2_SPACING, "ensemble_spacing_factor": a.ensemble_spacing},
        "runs": [],
    }
    for shape_text in a.shapes:
        shape = tuple(int(v) for v in shape_text.split("x"))
        case = write_case(a.work / "cases", shape)
        with tempfile.TemporaryDirectory(prefix="host-memory-") as tmp:
            print(f"{a.label}: {shape_text} ...", file=sys.stderr, flush=True)
            r = run_case(a.code.resolve(), case, model, Path(tmp), a)
        r["shape"] = shape_text
        result["runs"].append(r)
        print(f"{a.label}: {shape_text}: peak RSS {r['peak_rss_gb']} GB"
              f"{' (limit exceeded, killed)' if r['rss_limit_exceeded'] else ''}, peak GPU "
              f"{r.get('peak_gpu_memory_gb')} GB ({r.get('peak_gpu_reserved_gb')} GB reserved), "
              f"{r.get('accumulation')}, exit {r['exit_code']}, {r['wall_s']} s",
              file=sys.stderr, flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
