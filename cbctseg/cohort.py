"""Cohort mode: many cases from a folder or a list file, K in flight, resumable, with a JSON summary.

Each of K worker threads runs the engine's own per-case function (`case.predict_case`) with the one shared
model. With the Triton backend this is what keeps the server busy: while one case is read, preprocessed or
finalized here, the windows of the others are on the server, where dynamic batching merges them. Outputs
are written atomically, so an existing output is a finished case: a rerun skips it (resume after a crash
or a stop) unless --overwrite. A Triton error stops the cohort instead of failing every remaining case.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm import tqdm

from cbctseg.io import gc_io
from cbctseg.model.loading import ModelError
from cbctseg.options import (ACCUMULATIONS, CaseOptions, add_backend_arguments, add_device_arguments, gpu_limit_error,
                             positive_int, step_size)
from cbctseg.resources import task
from cbctseg.inference.schedule import Budget
from cbctseg.inference.ensemble import LoadedModel
from cbctseg.networks.triton_backend import TritonError

log = logging.getLogger(__name__)
LIST_SUFFIXES = {".txt", ".lst", ".list"}


def read_cases(source: Path, output: Path) -> list[gc_io.Case]:
    """Cases from a list file (one image path a line, '#' comments, paths relative to the list) or a folder."""
    source = Path(source)
    if not (source.is_file() and source.suffix in LIST_SUFFIXES):
        return gc_io.find_cases(source, output)
    out_dir = Path(output) / task()["output_folder"]
    lines = [s.strip() for s in source.read_text().splitlines()]
    paths = [(source.parent / s).resolve() for s in lines if s and not s.startswith("#")]
    if not paths:
        raise gc_io.InputError(f"{source}: lists no case")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise gc_io.InputError(f"{source}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]}")
    names = [p.name for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:  # outputs are named after inputs: two cases must not write the same file
        raise gc_io.InputError(f"{source}: several cases named {dupes[0]}")
    return [gc_io.Case(p.name, p, out_dir / p.name) for p in paths]


def run_cohort(cases: list[gc_io.Case], members: list[LoadedModel], device: torch.device, options: CaseOptions,
               workers: int = 2, time_budget_s: float | None = None, overwrite: bool = False,
               progress: bool = True) -> list[dict]:
    """Segment the cases, `workers` at a time; returns one report per case (ok, failed, skipped, not started).

    The members' backends are shared: the first case to need one chooses it (compiled or not) while the
    others wait."""
    from cbctseg.case import predict_case

    todo = [c for c in cases if overwrite or not c.output_path.exists()]
    started = {c.output_path for c in todo}
    reports = [{"case": c.name, "status": "skipped", "output": str(c.output_path), "reason": "output exists"}
               for c in cases if c.output_path not in started]
    stop = threading.Event()

    def one(case: gc_io.Case) -> dict:
        if stop.is_set():
            return {"case": case.name, "status": "not started", "error": "cohort stopped after a Triton error"}
        budget = Budget(time.monotonic() + time_budget_s if time_budget_s else None)
        try:
            return predict_case(case, members, device, options, budget)
        except TritonError as e:
            stop.set()
            return {"case": case.name, "status": "failed", "error": str(e)}
        except Exception as e:  # one bad case must not stop the others
            log.debug("%s", traceback.format_exc())
            return {"case": case.name, "status": "failed", "error": f"{type(e).__name__}: {e}"}

    failed = 0
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="case") as pool, \
            tqdm(total=len(todo), desc="cohort", unit="case", disable=not progress) as bar:
        futures = [pool.submit(one, c) for c in todo]
        try:
            for f in as_completed(futures):
                r = f.result()
                reports.append(r)
                bar.update()
                if r["status"] == "failed":
                    failed += 1
                    bar.set_postfix(failed=failed)
                    log.error("%s: %s", r["case"], r["error"])
        except BaseException:  # Ctrl-C: let the running cases finish (their outputs are atomic), start no other
            stop.set()
            for f in futures:
                f.cancel()
            raise
    return sorted(reports, key=lambda r: r["case"])


def summarize(reports: list[dict], wall_s: float, **context) -> dict:
    """Counts, throughput and the per-case reports."""
    counts = {s: sum(r["status"] == s for r in reports) for s in ("ok", "failed", "skipped", "not started")}
    done = [r["seconds"]["total"] for r in reports if r["status"] == "ok"]
    return {**context, "cases": len(reports), **counts, "wall_s": round(wall_s, 1),
            "seconds_per_case": round(sum(done) / len(done), 2) if done else None,
            "cases_per_hour": round(3600 * len(done) / wall_s, 1) if done and wall_s > 0 else None,
            "reports": reports}


def write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the `cohort` subcommand."""
    p.add_argument("--input", type=Path, required=True,
                   help="folder of images (as for predict) or a list file (.txt: one image path a line)")
    p.add_argument("--output", type=Path, required=True, help="output root (label maps as for predict)")
    p.add_argument("--weights", type=Path, action="append", default=None,
                   help="nnU-Net model folder, or an ensemble folder (ensemble.json); give it several times to "
                        "ensemble models with different plans (default: /opt/ml/model when it holds a model, "
                        "else weights/)")
    add_device_arguments(p, "auto, cuda, cuda:N or cpu (pre- and post-processing; the networks too with "
                            "--backend local)")
    p.add_argument("--folds", nargs="+", default=None, help="folds to ensemble (default: all in the model folder)")
    p.add_argument("--workers", type=positive_int, default=2, help="cases in flight")
    p.add_argument("--step-size", type=step_size, default=0.5, help="sliding-window step as a fraction of the patch")
    p.add_argument("--no-mirroring", action="store_true", help="skip test-time mirroring (4x fewer passes)")
    p.add_argument("--accumulate", default="auto", choices=ACCUMULATIONS)
    p.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward pass")
    p.add_argument("--time-budget", type=float, default=0.0, help="seconds per case (0: no limit)")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose output exists (default: skip them)")
    p.add_argument("--summary", type=Path, default=None, help="JSON summary (default: OUTPUT/cohort_summary.json)")
    add_backend_arguments(p)


def run_from_args(args: argparse.Namespace) -> int:
    """The `cohort` subcommand: 0 when no case failed, 1 when some did, 2 when nothing could start."""
    from cbctseg.networks.device import limit_memory, select_device
    from cbctseg.case import load_models

    t0 = time.monotonic()
    if (error := gpu_limit_error(args)) is not None:
        log.error("cohort: %s", error)
        return 2
    try:
        device = select_device(args.device)
        limit_memory(device, args.gpu_memory_gb)
        cases = read_cases(args.input, args.output)
        members = load_models(args, device)
    except (ValueError, ModelError, TritonError) as e:  # InputError is a ValueError
        log.error("cohort: %s", e)
        return 2
    options = CaseOptions.from_args(args, progress=sys.stderr.isatty() or getattr(args, "verbose", False))
    log.info("cohort: %d case(s), %d worker(s), backend %s", len(cases), args.workers, args.backend)
    reports = run_cohort(cases, members, device, options, args.workers, args.time_budget or None, args.overwrite)
    summary = summarize(reports, time.monotonic() - t0, input=str(args.input), output=str(args.output),
                        weights=[str(m.model.folder) for m in members], folds=[m.model.folds for m in members],
                        backend=args.backend,
                        triton_url=args.triton_url if args.backend == "triton" else None, workers=args.workers)
    path = args.summary or Path(args.output) / "cohort_summary.json"
    write_json(summary, path)
    print(f"cohort: {summary['ok']} ok, {summary['skipped']} skipped (output exists), {summary['failed']} failed, "
          f"{summary['not started']} not started in {summary['wall_s']:.0f} s -> {path}")
    return 0 if summary["failed"] == 0 and summary["not started"] == 0 else 1
