"""Predict: a run over the input's cases (`case.predict_case` each), its results.json, its exit code and signals.

Imports no torch until the run's cases, output and temporary folder have been checked: a run that cannot
start says so in a fraction of a second (the engine's imports take seconds)."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
import traceback
from pathlib import Path

from cbctseg.io import gc_io, preflight
from cbctseg.model.manifest import ModelError
from cbctseg.model.verify import VerifiedMember, verify_members
from cbctseg.options import CaseOptions, gpu_limit_error
from cbctseg.resources import task
from cbctseg.termination import Terminated, raising_on_signals

log = logging.getLogger("cbctseg")


def _process_age_s() -> float:
    """Seconds since this process started (the interpreter and imports count against grand-challenge's limit)."""
    try:
        import os

        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


PROCESS_START = time.monotonic() - _process_age_s()
# reading, finalizing and writing after the last window, and start-up before the first
DEFAULT_MARGIN_S = 60.0


def summary_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['case']}: FAILED: {r['error']}"
    s, p = r["seconds"], r["prediction"]
    stages = ", ".join(f"{k} {v:.1f}" for k, v in s.items() if k != "total")
    partial = f", skipped {len(p['skipped'])} pass(es)" if p["skipped"] else ""
    return (f"{r['case']}: ok in {s['total']:.1f} s ({stages}), {p['items_done']}/{p['items_planned']} window passes"
            f"{partial}, {len(r['structures_present'])} structures -> {r['output']}")


def batch_table(reports: list[dict]) -> str:
    """The closing table of a run over several cases."""
    ok = [r for r in reports if r["status"] == "ok"]
    lines = [f"{'case':40s} {'status':8s} {'seconds':>8s}"]
    lines += [f"{r['case'][:40]:40s} {r['status']:8s} {r.get('seconds', {}).get('total', 0):8.1f}" for r in reports]
    mean = sum(r["seconds"]["total"] for r in ok) / len(ok) if ok else 0.0
    lines.append(f"{len(reports)} case(s), {len(ok)} ok, {len(reports) - len(ok)} failed, {mean:.1f} s per case")
    return "\n".join(lines)


class RunRecord:
    """What a predict run did so far, case by case, so that results.json can be written at any moment."""

    def __init__(self, output: Path):
        self.output = Path(output)
        self.cases: list[gc_io.Case] | None = None  # None: not known yet
        self.results: dict[str, dict] = {}  # case name -> results.json entry
        self.reports: list[dict] = []
        self.run_error: str | None = None
        self.current: gc_io.Case | None = None  # the case being segmented
        self.current_output_before: tuple[int, int] | None = None

    def record(self, case: gc_io.Case, report: dict) -> None:
        error = None if report["status"] == "ok" else report["error"]
        self.results[case.name] = gc_io.case_result(case, error)
        self.reports.append(report)
        log.info("report %s", json.dumps(report))
        print(summary_line(report), file=sys.stderr, flush=True)

    def fail_remaining(self, message: str) -> None:
        """Every case without a result fails with `message` (or the run, when its cases are not known)."""
        if self.cases is None:
            self.run_error = message
            return
        for case in self.cases:
            if case.name not in self.results:
                self.record(case, {"case": case.name, "status": "failed", "error": f"{case.name}: {message}"})

    def terminated(self, t: Terminated) -> None:
        """The run was stopped by a signal: the case in progress failed (its output, if written, is removed),
        the cases not started fail too."""
        signame = signal.Signals(t.signum).name
        case = self.current
        if case is not None and case.name not in self.results:
            if _file_id(case.output_path) != self.current_output_before:
                case.output_path.unlink(missing_ok=True)
            self.record(case, {"case": case.name, "status": "failed",
                               "error": f"{case.name}: terminated by {signame} while it was being segmented"})
        self.fail_remaining(f"not started: the run was terminated by {signame}")

    def entries(self) -> list[dict]:
        if self.cases is None:
            return [gc_io.run_error_result(self.run_error)] if self.run_error else []
        return [self.results[c.name] for c in self.cases if c.name in self.results]

    def write(self, report_file: Path | None) -> bool:
        """results.json (and the per-case reports when asked); False when they could not be written."""
        try:
            gc_io.write_results(self.entries(), self.output)
            if report_file:
                report_file.parent.mkdir(parents=True, exist_ok=True)
                report_file.write_text(json.dumps(self.reports, indent=1))
            return True
        except OSError as e:
            log.error("cannot write the results: %s", e)
            return False


def _file_id(path: Path) -> tuple[int, int] | None:
    """Identity of the file at `path` (inode, modification time) or None: tells whether a case wrote it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def predict_main(args: argparse.Namespace) -> int:
    """The predict command. Exit code: 0 when at least one case was written, 1 when none was (every case failed)
    or on an unexpected error, 2 when the run cannot start (output, temporary directory, budget, device, inputs,
    model), 128 + N when stopped by signal N (143: SIGTERM, 130: SIGINT).

    results.json is written on every exit but an unusable output folder: with an entry per case (finished, or
    failed with its message), or with one entry holding the message when the cases are not known.
    """
    try:
        preflight.check_output(args.output, task()["output_folder"])
    except preflight.PreflightError as e:
        log.error("cannot start: %s", e)
        return 2
    run = RunRecord(args.output)
    with raising_on_signals():
        try:
            try:
                code = _predict_cases(args, run)
            except Exception as e:  # a fault of ours, not of the input: still a report, never a traceback only
                log.error("unexpected error: %s: %s", type(e).__name__, e)
                log.debug("%s", traceback.format_exc())
                run.fail_remaining(f"unexpected error: {type(e).__name__}: {e}")
                code = 1
            if not run.write(args.report):
                code = code or 1
        except Terminated as t:  # at most one is raised: nothing interrupts this block
            log.error("%s: finished cases are kept, the others are reported as failed", t)
            gc_io.remove_temporary_files()
            run.terminated(t)
            run.write(args.report)
            code = t.exit_code
    if run.cases and len(run.cases) > 1:
        print(batch_table(run.reports), file=sys.stderr)
    return code


def _start_error(run: RunRecord, message: str) -> int:
    log.error("%s", message)
    run.fail_remaining(message)
    return 2


class _CannotStart(Exception):
    """A check before the engine failed: the message for every case."""


def _before_the_engine(args: argparse.Namespace, run: RunRecord
                       ) -> tuple[float | None, Path, list[VerifiedMember]]:
    """The checks that need no torch, cheapest first: the cases (into run), the device options, the budget, the
    temporary directory, then the models (`model.verify`). Returns (budget seconds or None, temporary directory,
    verified models); raises _CannotStart."""
    try:
        run.cases = gc_io.find_cases(args.input, args.output)
    except gc_io.InputError as e:
        raise _CannotStart(f"nothing to do: {e}") from None
    if (error := gpu_limit_error(args)) is not None:
        raise _CannotStart(f"cannot start: {error}")
    try:
        budget_s = preflight.budget_seconds(args.time_budget)
        temp = preflight.check_temp()
    except preflight.PreflightError as e:
        raise _CannotStart(f"cannot start: {e}") from None
    try:
        return budget_s, temp, verify_members(args.weights, args.folds)
    except ModelError as e:
        raise _CannotStart(f"cannot load the model: {e}") from None


def _predict_cases(args: argparse.Namespace, run: RunRecord) -> int:
    """Find the cases, check the environment and the models, load them, segment each case; returns the exit
    code."""
    try:
        budget_s, temp, verified = _before_the_engine(args, run)
    except _CannotStart as e:
        return _start_error(run, str(e))
    # the engine (torch, nnU-Net) only now: everything above fails fast without it
    import torch

    from cbctseg.case import load_models, predict_case
    from cbctseg.inference.schedule import Budget
    from cbctseg.networks.device import describe, limit_memory, select_device
    from cbctseg.networks.triton_backend import TritonError

    try:
        device = select_device(args.device)
        limit_memory(device, args.gpu_memory_gb)
    except (ValueError, RuntimeError) as e:
        return _start_error(run, f"cannot start: {e}")
    log.info("temporary directory %s (%.1f GiB free), output %s (%.1f GiB free)", temp, preflight.free_gib(temp),
             args.output, preflight.free_gib(Path(args.output)))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    log.info("environment: %s", json.dumps(describe(device)))
    try:
        t0 = time.monotonic()
        members = load_models(args, device, verified)
        log.info("model loaded in %.1f s", time.monotonic() - t0)
    except (ModelError, TritonError) as e:
        return _start_error(run, f"cannot load the model: {e}")
    if budget_s is None:
        budget_s = task()["time_limit_s"] - DEFAULT_MARGIN_S
    options = CaseOptions.from_args(args, progress=sys.stderr.isatty() or args.verbose)
    for i, case in enumerate(run.cases):
        start = PROCESS_START if i == 0 else time.monotonic()
        budget = Budget(start + budget_s if budget_s > 0 else None)
        run.current, run.current_output_before = case, _file_id(case.output_path)
        try:
            report = predict_case(case, members, device, options, budget)
        except gc_io.InputError as e:
            report = {"case": case.name, "status": "failed", "error": str(e)}
        except Exception as e:  # one bad case must not stop the others
            log.debug("%s", traceback.format_exc())
            report = {"case": case.name, "status": "failed", "error": f"{case.name}: {type(e).__name__}: {e}"}
        run.record(case, report)
        run.current = None
    n_ok = sum(r["status"] == "ok" for r in run.reports)
    if n_ok == 0:
        log.error("no case was segmented (%d failed); see results.json", len(run.reports))
        return 1
    return 0
