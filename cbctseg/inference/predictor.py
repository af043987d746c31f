"""Sliding-window prediction: runs a case's work items (windows x folds x flips, `schedule.plan_case`) on a
backend under the time budget.

Items go in batches of one pass; the budget skips optional items it cannot afford, a backend that takes requests
ahead of time (Triton) gets the next batches early, and each batch's logits are added to the sums
(`stitching`), which live in one of four places (`Accumulation`): the same device, the CPU, or *streamed*:
only the band of slices the current windows touch, on the device or the CPU, finishing (argmax) and freeing
every band no later window touches. Since any subset of the work is a correct weighted average, the budget
may stop early, and an out-of-memory error (sums moved to the CPU, or the batch halved) costs nothing done.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum

import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from tqdm import tqdm

from cbctseg.inference.schedule import Budget, WorkItem, plan_case
from cbctseg.model.loading import Model
from cbctseg.networks.backend import Backend
from cbctseg.inference.stitching import Accumulator, Normaliser, StreamedLabels, is_oom

log = logging.getLogger(__name__)


class Accumulation(str, Enum):
    DEVICE = "device"  # the whole image's sums on the device
    CPU = "cpu"  # the whole image's sums on the CPU
    STREAMED = "streamed"  # a band of slices on the device
    STREAMED_CPU = "streamed-cpu"  # a band of slices on the CPU (the networks on the device)

    @property
    def streams(self) -> bool:
        return self in (Accumulation.STREAMED, Accumulation.STREAMED_CPU)


@dataclass
class PredictionReport:
    """What the sliding window did for one case, what it skipped and why, and its projections."""

    accumulation: str = ""
    batch_size: int = 1
    windows: int = 0
    passes_planned: int = 0
    items_planned: int = 0
    items_done: int = 0
    passes_done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds_per_item: float | None = None
    projected_total_s: float | None = None
    budget_left_at_start_s: float | None = None
    events: list[str] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _window_batch(padded: torch.Tensor, items: list[WorkItem], batch: list[int] | tuple[int, ...]) -> torch.Tensor:
    """The network input for a batch of items: their windows, stacked and flipped."""
    dims = [a + 2 for a in items[batch[0]].flip]
    x = torch.stack([padded[(slice(None), *items[j].window)] for j in batch])
    return torch.flip(x, dims) if dims else x.contiguous()


def _next_batches(items: list[WorkItem], i: int, batch_size: int, n: int) -> list[tuple[int, ...]]:
    """Up to n batches from item i, grouped as predict groups them when the budget does not intervene."""
    batches: list[tuple[int, ...]] = []
    while i < len(items) and len(batches) < n:
        b = [i]
        while len(b) < batch_size and b[-1] + 1 < len(items) and items[b[-1] + 1].same_pass(items[i]):
            b.append(b[-1] + 1)
        batches.append(tuple(b))
        i = b[-1] + 1
    return batches


def _pass_name(model: Model, item: WorkItem) -> str:
    return f"fold {model.folds[item.fold]}" + (f" flip {list(item.flip)}" if item.flip else "")


@torch.inference_mode()
def predict(model: Model, backend: Backend, data: torch.Tensor, step_size: float = 0.5, use_mirroring: bool = True,
            accumulation: Accumulation = Accumulation.DEVICE, budget: Budget | None = None,
            batch_size: int = 1, progress: bool = True, in_flight: int = 1, sync_every: int = 8,
            reserved_items: float = 0.0, sink: Callable[[int, torch.Tensor], None] | None = None
            ) -> tuple[torch.Tensor | None, bool, PredictionReport]:
    """Run the model's folds (on `backend`) over data (1, z, y, x), window by window, on data's device.

    sync_every: items between waits for the device (each wait times the work so far, for the budget).

    in_flight > 1: a backend that takes requests ahead of time (Triton) gets the next batches early, so that
    many requests are on the server while this loop stitches.

    reserved_items: work after this model's (later models of an ensemble), in this model's work items, that
    the budget keeps time for: optional items are skipped sooner so that it still fits.

    sink (streamed only): takes each finished band of averaged logits instead of the argmax
    (`stitching.StreamedLabels`); the result is then None.

    Returns (result, is_labels, report): averaged logits (C, z, y, x), or, when streamed, the uint8
    argmax (z, y, x) on the CPU. Raises stitching.NonFiniteLogits when the averaged logits hold NaN or infinity.
    """
    device = data.device
    budget = budget or Budget(None)
    patch = model.patch_size
    padded, revert = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
    streamed = accumulation.streams
    plan = plan_case(tuple(data.shape[1:]), patch, step_size, len(model.folds), model.mirror_axes, use_mirroring,
                     slab_major=streamed)
    windows, items = plan.windows, plan.items
    report = PredictionReport(accumulation=accumulation.value, batch_size=batch_size, windows=len(windows),
                              passes_planned=plan.passes, items_planned=len(items),
                              budget_left_at_start_s=None if budget.deadline is None else round(budget.left(), 1))
    gaussian = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=device)
    acc = _sums(model, data, revert, gaussian, windows, accumulation, report.passes_planned, sink)
    run = _SlidingWindow(backend, padded, items, acc, gaussian, budget, report, in_flight, progress, reserved_items)
    timer = _Timer(device, budget, report, sync_every, len(items))
    i = 0
    while i < len(items):
        batch = run.next_batch(i, batch_size, timer.queued())
        if batch is None:  # the budget skips item i
            i += 1
            continue
        if streamed:
            acc.finish_before(run.first_slice_from(i))
        try:
            y = run.forward(batch, batch_size)
            run.stitch(batch, y)
            del y  # before the next forward pass, which would otherwise hold two outputs
        except RuntimeError as e:
            if not is_oom(e):
                raise
            del e
            batch_size = _recover_from_oom(acc, report, device, streamed)
            continue  # the same item again; finished items stay in the sums
        timer.batch_done(len(batch), last=batch[-1] + 1 == len(items))
        i = batch[-1] + 1
    run.bar.close()
    _summarise_passes(model, items, run.done, len(windows), run.skip_reason, report)
    if streamed:
        return acc.result(), True, report
    return acc.average(), False, report


def _sums(model: Model, data: torch.Tensor, revert: tuple[slice, ...], gaussian: torch.Tensor,
          windows: list[tuple[slice, ...]], accumulation: Accumulation, passes: int,
          sink: Callable[[int, torch.Tensor], None] | None = None) -> Accumulator | StreamedLabels:
    """Empty sums for the case where `accumulation` says, normalised for the planned windows and passes."""
    device = data.device
    # the sums cover the image without its padding (the padding's logits would be cropped away anyway)
    origin, region = tuple(int(s.start) for s in revert[1:]), tuple(data.shape[1:])
    normaliser = Normaliser(gaussian, windows, passes)
    if accumulation.streams:
        band_device = device if accumulation == Accumulation.STREAMED else torch.device("cpu")
        return StreamedLabels(model.num_classes, region, model.patch_size[0], band_device, normaliser, origin, sink)
    return Accumulator(model.num_classes, region, device if accumulation == Accumulation.DEVICE
                       else torch.device("cpu"), normaliser=normaliser, origin=origin)


class _SlidingWindow:
    """One case's work items: which the budget lets run next, how a batch runs on its network, and which are done."""

    def __init__(self, backend: Backend, padded: torch.Tensor, items: list[WorkItem],
                 acc: Accumulator | StreamedLabels, gaussian: torch.Tensor, budget: Budget, report: PredictionReport,
                 in_flight: int, progress: bool, reserved_items: float = 0.0):
        self.backend, self.padded, self.items, self.acc, self.gaussian = backend, padded, items, acc, gaussian
        self.budget, self.report, self.in_flight = budget, report, in_flight
        self.device = padded.device
        self.done = [False] * len(items)
        self.mandatory_left = sum(1 for it in items if it.mandatory)
        self.reserved_items = reserved_items  # later work the budget keeps time for
        self.skip_reason: str | None = None  # why the budget skipped items, for the report
        self.ahead: dict[tuple[int, ...], Future] = {}  # batches sent ahead; one the budget then skips is not used
        self.bar = tqdm(total=len(items), desc="sliding window", unit="window", disable=not progress, leave=False)

    def next_batch(self, i: int, batch_size: int, queued: int) -> list[int] | None:
        """Item i and the next items of its network and flip, up to batch_size, as far as the budget allows them;
        None when the budget skips item i. queued: items run but not yet on the clock."""
        items, item, report, budget = self.items, self.items[i], self.report, self.budget
        if not item.mandatory and report.seconds_per_item is not None:
            need = report.seconds_per_item * (1 + self.mandatory_left + queued + self.reserved_items)
            if not budget.allows(need):
                later = " and later models' first passes" if self.reserved_items else ""
                self.skip_reason = (f"time budget: {budget.left():.1f} s left, {self.mandatory_left} required windows"
                                    f"{later} and this one need {need:.1f} s")
                return None
        batch = [i]
        while (len(batch) < batch_size and batch[-1] + 1 < len(items) and items[batch[-1] + 1].same_pass(item)
               and (item.mandatory or report.seconds_per_item is None
                    or budget.allows(report.seconds_per_item * (len(batch) + 1 + self.mandatory_left
                                                                + self.reserved_items)))):
            batch.append(batch[-1] + 1)
        return batch

    def first_slice_from(self, i: int) -> int:
        """The first slice (padded-image coordinates) any window from item i on touches."""
        return min(self.items[j].window[0].start for j in range(i, len(self.items)))

    def forward(self, batch: list[int], batch_size: int) -> torch.Tensor:
        """The network's output for a batch (channel-major): the answer to a request sent ahead, or run now.

        With in_flight > 1, first sends the next batches ahead, when the backend takes requests ahead."""
        if self.in_flight > 1 and self.backend.sends_ahead:
            self._send_ahead(batch[0], batch_size)
        sent = self.ahead.pop(tuple(batch), None)
        if sent is not None:
            y = sent.result()
        else:
            y = self.backend.forward(self.items[batch[0]].fold, _window_batch(self.padded, self.items, batch))
        if not y.is_contiguous():
            # a channels-last output (a backend's own layout): the sums are channel-major, and adding them a
            # chunk of channels at a time from a channels-last output would read all of it for every chunk
            y = y.contiguous()
        return y

    def _send_ahead(self, i: int, batch_size: int) -> None:
        for b in [b for b in self.ahead if b[0] < i]:  # skipped by the budget
            del self.ahead[b]
        for b in _next_batches(self.items, i, batch_size, self.in_flight):
            if b not in self.ahead:
                self.ahead[b] = self.backend.submit(self.items[b[0]].fold, _window_batch(self.padded, self.items, b))

    def stitch(self, batch: list[int], y: torch.Tensor) -> None:
        """Add a batch's outputs to the sums and count its items done."""
        flip = self.items[batch[0]].flip
        for k, j in enumerate(batch):
            self.acc.add(self.items[j].window, y[k], self.gaussian, flip)
            self.done[j] = True
            self.mandatory_left -= self.items[j].mandatory
            self.report.items_done += 1
            self.bar.update()


class _Timer:
    """Waits for the device now and then, and times the items run so far (report.seconds_per_item) for the budget.

    The GPU runs ahead of the loop; waiting for it only now and then keeps it busy between passes."""

    def __init__(self, device: torch.device, budget: Budget, report: PredictionReport, sync_every: int,
                 items: int):
        self.device, self.budget, self.report, self.sync_every, self.items = device, budget, report, sync_every, items
        self.started: float | None = None
        self.timed_items = 0
        self.since_sync = 0
        self.t_first = budget.clock()

    def queued(self) -> int:
        """Items queued on a GPU since the last wait, not on the clock yet (a CPU runs them in line)."""
        return self.since_sync if self.device.type == "cuda" else 0

    def batch_done(self, n: int, last: bool) -> None:
        """Count a batch of n items; wait for the device and time it after the first batch, every sync_every
        items and after the last."""
        self.since_sync += n
        if self.started is None or self.since_sync >= self.sync_every or last:
            _sync(self.device)
            now = self.budget.clock()
            if self.started is None:
                # the first batch pays for warm-up: a pessimistic estimate until later batches are timed
                self.report.seconds_per_item = (now - self.t_first) / n
                self.started = now
            else:
                self.timed_items += self.since_sync
                self.report.seconds_per_item = (now - self.started) / self.timed_items
                if self.report.projected_total_s is None:
                    self.report.projected_total_s = round(self.report.seconds_per_item * self.items, 1)
            self.since_sync = 0


def _summarise_passes(model: Model, items: list[WorkItem], done: list[bool], windows: int,
                      skip_reason: str | None, report: PredictionReport) -> None:
    """Name every pass in the report: done, or skipped with how many of its windows and why."""
    passes: dict[tuple, list[int]] = {}
    for k, it in enumerate(items):
        passes.setdefault((it.fold, it.flip), []).append(k)
    for ks in passes.values():
        name = _pass_name(model, items[ks[0]])
        missing = sum(not done[k] for k in ks)
        if missing == 0:
            report.passes_done.append(name)
        else:
            report.skipped.append(f"{name}: {missing} of {windows} windows ({skip_reason})")


def _recover_from_oom(acc, report: PredictionReport, device: torch.device, streamed: bool) -> int:
    """Free what can be freed, move the sums off the GPU, halve the batch; nothing finished is lost.

    Returns the batch size to go on with; raises when nothing is left to give up."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if isinstance(acc, Accumulator) and acc.device.type == "cuda":
        acc.move_to(torch.device("cpu"))
        report.accumulation = Accumulation.CPU.value
        report.events.append("out of GPU memory: moved the logit sums to the CPU and continued")
    elif streamed and acc.band.device.type == "cuda":
        acc.band.move_to(torch.device("cpu"))
        acc.device = torch.device("cpu")
        report.events.append("out of GPU memory: moved the streamed band to the CPU and continued")
    elif report.batch_size > 1:
        report.events.append(f"out of memory: batch {report.batch_size} -> {max(1, report.batch_size // 2)}")
    else:
        raise torch.OutOfMemoryError("out of memory with batch size 1 and the sums on the CPU")
    if report.batch_size > 1:
        report.batch_size = max(1, report.batch_size // 2)
    return report.batch_size
