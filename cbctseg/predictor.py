"""Sliding-window prediction: runs a case's work items (windows x folds x flips) on the device under the time budget.

Items go in batches of one network and flip; the budget skips optional items it cannot afford, networks with
`submit` (Triton) get the next batches ahead of time, and each batch's logits are added to the sums
(`stitching`), which live in one of three places (`Accumulation`): the same device, the CPU, or *streamed*:
on the device but only for the band of slices the current windows touch, finishing (argmax) and freeing
every band no later window touches. Since any subset of the work is a correct weighted average, the budget
may stop early, and an out-of-memory error (sums moved to the CPU, or the batch halved) costs nothing done.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum

import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from tqdm import tqdm

from .precision import autocast
from .model import Model
from .schedule import Budget, WorkItem, plan_work, sliding_windows
from .stitching import Accumulator, Normaliser, StreamedLabels, is_oom

log = logging.getLogger(__name__)


class Accumulation(str, Enum):
    DEVICE = "device"
    CPU = "cpu"
    STREAMED = "streamed"


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
        while (len(b) < batch_size and b[-1] + 1 < len(items) and items[b[-1] + 1].model == items[i].model
               and items[b[-1] + 1].flip == items[i].flip):
            b.append(b[-1] + 1)
        batches.append(tuple(b))
        i = b[-1] + 1
    return batches


def _pass_name(model: Model, item: WorkItem) -> str:
    return f"fold {model.folds[item.model]}" + (f" flip {list(item.flip)}" if item.flip else "")


@torch.inference_mode()
def predict(model: Model, data: torch.Tensor, step_size: float = 0.5, use_mirroring: bool = True,
            accumulation: Accumulation = Accumulation.DEVICE, budget: Budget | None = None,
            batch_size: int = 1, progress: bool = True, in_flight: int = 1, sync_every: int = 8
            ) -> tuple[torch.Tensor, bool, PredictionReport]:
    """Run the ensemble's sliding window over data (1, z, y, x) on its device.

    sync_every: items between waits for the device (each wait times the work so far, for the budget).

    in_flight > 1: networks with `submit` (Triton) get the next batches ahead of time, so that many
    requests are on the server while this loop stitches.

    Returns (result, is_labels, report): averaged logits (C, z, y, x), or, when streamed, the uint8
    argmax (z, y, x) on the CPU. Raises stitching.NonFiniteLogits when the averaged logits hold NaN or infinity.
    """
    device = data.device
    budget = budget or Budget(None)
    patch = model.patch_size
    padded, revert = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
    shape = tuple(padded.shape[1:])
    windows = sliding_windows(shape, patch, step_size)
    streamed = accumulation == Accumulation.STREAMED
    items = plan_work(len(model.networks), model.mirror_axes, use_mirroring, windows, slab_major=streamed)
    report = PredictionReport(accumulation=accumulation.value, batch_size=batch_size, windows=len(windows),
                              passes_planned=len(items) // len(windows), items_planned=len(items),
                              budget_left_at_start_s=None if budget.deadline is None else round(budget.left(), 1))
    gaussian = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=device)
    # the sums cover the image without its padding (the padding's logits would be cropped away anyway)
    origin, region = tuple(int(s.start) for s in revert[1:]), tuple(data.shape[1:])
    normaliser = Normaliser(gaussian, windows, report.passes_planned)
    if streamed:
        acc = StreamedLabels(model.num_classes, region, patch[0], device, normaliser, origin)
    else:
        acc = Accumulator(model.num_classes, region, device if accumulation == Accumulation.DEVICE
                          else torch.device("cpu"), normaliser=normaliser, origin=origin)
    done = [False] * len(items)
    mandatory_left = sum(1 for it in items if it.mandatory)
    bar = tqdm(total=len(items), desc="sliding window", unit="window", disable=not progress, leave=False)
    started, timed_items, skip_reason, since_sync = None, 0, None, 0
    t_first = budget.clock()
    ahead: dict[tuple[int, ...], Future] = {}  # batches sent ahead; one the budget then skips is not used
    i = 0
    while i < len(items):
        item = items[i]
        if not item.mandatory and report.seconds_per_item is not None:
            # items queued on a GPU since the last wait are not on the clock yet (a CPU runs them in line)
            queued = since_sync if device.type == "cuda" else 0
            need = report.seconds_per_item * (1 + mandatory_left + queued)
            if not budget.allows(need):
                skip_reason = (f"time budget: {budget.left():.1f} s left, {mandatory_left} required windows and this "
                               f"one need {need:.1f} s")
                i += 1
                continue
        # a batch: consecutive items of the same network and flip
        batch = [i]
        while (len(batch) < batch_size and batch[-1] + 1 < len(items)
               and items[batch[-1] + 1].model == item.model and items[batch[-1] + 1].flip == item.flip
               and (item.mandatory or report.seconds_per_item is None
                    or budget.allows(report.seconds_per_item * (len(batch) + 1 + mandatory_left)))):
            batch.append(batch[-1] + 1)
        if streamed:
            acc.finish_before(min(items[j].window[0].start for j in range(i, len(items))))
        try:
            if in_flight > 1:
                for b in [b for b in ahead if b[0] < i]:  # skipped by the budget
                    del ahead[b]
                for b in _next_batches(items, i, batch_size, in_flight):
                    net = model.networks[items[b[0]].model]
                    if b not in ahead and hasattr(net, "submit"):
                        ahead[b] = net.submit(_window_batch(padded, items, b))
            sent = ahead.pop(tuple(batch), None)
            if sent is not None:
                y = sent.result()
            else:
                with autocast(device):
                    y = model.networks[item.model](_window_batch(padded, items, batch))
            if not y.is_contiguous():
                # channels-last networks (precision.memory_format): the sums are channel-major, and adding them a
                # chunk of channels at a time from a channels-last output would read all of it for every chunk
                y = y.contiguous()
            for k, j in enumerate(batch):
                acc.add(items[j].window, y[k], gaussian, item.flip)
                done[j] = True
                mandatory_left -= items[j].mandatory
                report.items_done += 1
                bar.update()
            del y  # before the next forward pass, which would otherwise hold two outputs
        except RuntimeError as e:
            if not is_oom(e):
                raise
            del e
            _recover_from_oom(acc, report, device, streamed)
            if report.batch_size > 1:
                report.batch_size = batch_size = max(1, batch_size // 2)
            continue  # the same item again; finished items stay in the sums
        since_sync += len(batch)
        if started is None or since_sync >= sync_every or batch[-1] + 1 == len(items):
            # the GPU runs ahead of this loop; waiting for it only now and then keeps it busy between passes
            _sync(device)
            now = budget.clock()
            if started is None:
                # the first batch pays for warm-up: a pessimistic estimate until later batches are timed
                report.seconds_per_item = (now - t_first) / len(batch)
                started = now
            else:
                timed_items += since_sync
                report.seconds_per_item = (now - started) / timed_items
                if report.projected_total_s is None:
                    report.projected_total_s = round(report.seconds_per_item * len(items), 1)
            since_sync = 0
        i = batch[-1] + 1
    bar.close()
    passes: dict[tuple, list[int]] = {}
    for k, it in enumerate(items):
        passes.setdefault((it.model, it.flip), []).append(k)
    for ks in passes.values():
        name = _pass_name(model, items[ks[0]])
        missing = sum(not done[k] for k in ks)
        if missing == 0:
            report.passes_done.append(name)
        else:
            report.skipped.append(f"{name}: {missing} of {len(windows)} windows ({skip_reason})")
    if streamed:
        return acc.result(), True, report
    return acc.average(), False, report


def _recover_from_oom(acc, report: PredictionReport, device: torch.device, streamed: bool) -> None:
    """Free what can be freed and move the sums off the GPU; nothing finished is lost."""
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
