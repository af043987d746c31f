"""Sliding-window prediction of the fold ensemble with mirroring, under a time budget, and the finalize step.

Windows run on the data's device. Logits accumulate in one of three places (`Accumulation`): the same
device, the CPU, or *streamed*: on the device but only for the band of slices the current windows touch,
finishing (argmax) and freeing every band no later window touches. The logit sum is fp16 as in nnU-Net;
a per-voxel fp32 weight sum makes any subset of the work a correct weighted average, which is what lets
the budget stop early and an out-of-memory error cost nothing already done.
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
from .preprocess import Preprocessed, _call_with_device
from .schedule import Budget, WorkItem, plan_work, sliding_windows

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


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class Accumulator:
    """Gaussian-weighted sums of logits (fp16) and of weights (fp32) over a (padded) image.

    sum_weights=False: logits only; the owner keeps account of the weights (StreamedLabels).
    """

    def __init__(self, num_classes: int, shape: tuple[int, ...], device: torch.device, sum_weights: bool = True):
        self.shape = shape
        self.logits = torch.zeros((num_classes, *shape), dtype=torch.half, device=device)
        self.weights = torch.zeros(shape, dtype=torch.float32, device=device) if sum_weights else None
        self._w: tuple[torch.Tensor, ...] | None = None

    @property
    def device(self) -> torch.device:
        return self.logits.device

    def add(self, window: tuple[slice, ...], logits: torch.Tensor, weight: torch.Tensor,
            flip: tuple[int, ...] | list[int] = (), channels_per_chunk: int = 8) -> None:
        """Add weight * logits (C, *window shape) at window; `flip`: logits are still flipped along these axes.

        Flipping back and weighting go by channel chunks: no full-size temporary of the window's logits.
        """
        w16, w32 = self.weight_on_device(weight)
        dims = [a + 1 for a in flip]
        for c0 in range(0, logits.shape[0], channels_per_chunk):
            try:
                self._add_channels(window, logits, c0, c0 + channels_per_chunk, dims, w16, w32)
            except RuntimeError as e:
                if not _is_oom(e):
                    raise
                # earlier chunks are already in the sums: finish this one a channel at a time, never redo it
                del e
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                try:
                    for c in range(c0, min(c0 + channels_per_chunk, logits.shape[0])):
                        self._add_channels(window, logits, c, c + 1, dims, w16, w32)
                except RuntimeError:
                    # not an "out of memory" error: retrying this item would add its first chunks twice
                    raise RuntimeError("device memory exhausted while adding a window to the sums") from None
        if self.weights is not None:
            self.weights[window] += w32

    def _add_channels(self, window, logits, c0: int, c1: int, dims: list[int], w16, w32) -> None:
        chunk = logits[c0:c1].to(self.device)
        chunk = torch.flip(chunk, dims) if dims else chunk
        target = self.logits[(slice(c0, c1), *window)]
        if chunk.dtype == target.dtype:
            # fp16 network output (autocast): fused, fp32 math and one rounding
            target.addcmul_(chunk, w16)
        else:
            target += chunk * w32

    def weight_on_device(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The window weight in the sums' dtypes on their device, converted once per weight tensor."""
        if self._w is None or self._w[0] is not weight:
            self._w = (weight, weight.to(self.device, self.logits.dtype), weight.to(self.device, torch.float32))
        return self._w[1], self._w[2]

    def move_to(self, device: torch.device) -> None:
        self.logits, self._w = self.logits.to(device), None
        self.weights = self.weights.to(device) if self.weights is not None else None

    def average(self) -> torch.Tensor:
        """Logit sum divided by weight sum, in place (the accumulator is spent afterwards)."""
        if not bool((self.weights > 0).all()):
            raise RuntimeError("some voxels were covered by no window")
        return self.logits.div_(self.weights)


class StreamedLabels:
    """Accumulates a band of slices on the device and emits finished label slices to the CPU.

    The band holds logit sums only. The weight sums are summed again, a few slices at a time, when slices are
    finished, from the windows added so far, in the order they were added: the same fp32 sums a weight band
    would hold, without keeping one (168 MB on the largest ToothFairy2 case). Works in the padded network
    space; valid when the logits need no resampling before the argmax.
    """

    def __init__(self, num_classes: int, shape: tuple[int, ...], patch_z: int, device: torch.device):
        self.shape, self.num_classes, self.device = shape, num_classes, device
        self.labels = torch.zeros(shape, dtype=torch.uint8)
        self.z0 = 0  # first slice held in the band
        self.band = Accumulator(num_classes, (min(patch_z, shape[0]), *shape[1:]), device, sum_weights=False)
        self.added: list[tuple[tuple[slice, ...], torch.Tensor]] = []  # (window, weight) of every add, in order

    def _ensure(self, z_stop: int) -> None:
        """Grow the band so it reaches z_stop (only when windows are unevenly spaced)."""
        held = self.band.shape[0]
        if self.z0 + held >= z_stop:
            return
        bigger = Accumulator(self.num_classes, (z_stop - self.z0, *self.shape[1:]), self.device, sum_weights=False)
        bigger.logits[:, :held] = self.band.logits
        self.band = bigger

    def add(self, window: tuple[slice, ...], logits: torch.Tensor, weight: torch.Tensor,
            flip: tuple[int, ...] | list[int] = ()) -> None:
        if window[0].start < self.z0:
            raise RuntimeError("streamed accumulation needs windows in slice order")
        self._ensure(window[0].stop)
        local = (slice(window[0].start - self.z0, window[0].stop - self.z0), *window[1:])
        self.band.add(local, logits, weight, flip)
        self.added.append((window, weight))

    def weights(self, z_start: int, z_stop: int) -> torch.Tensor:
        """The weight sums of slices [z_start, z_stop) (image coordinates), summed in the order windows were added."""
        out = torch.zeros((z_stop - z_start, *self.shape[1:]), dtype=torch.float32, device=self.band.device)
        for window, weight in self.added:
            a, b = max(z_start, window[0].start), min(z_stop, window[0].stop)
            if a < b:
                w32 = self.band.weight_on_device(weight)[1]
                out[(slice(a - z_start, b - z_start), *window[1:])] += w32[a - window[0].start:b - window[0].start]
        return out

    def finish_before(self, z: int) -> None:
        """Every slice before z is final: argmax it to the CPU and drop it from the band."""
        n = min(z, self.z0 + self.band.shape[0]) - self.z0
        if n <= 0:
            return
        for a in range(0, n, 8):  # a few slices at a time keeps the fp32 temporaries small
            b = min(n, a + 8)
            weights = self.weights(self.z0 + a, self.z0 + b)
            if not bool((weights > 0).all()):
                raise RuntimeError("some voxels were covered by no window")
            # the same fp16 rounding as Accumulator.average, so the argmax is the same
            avg = (self.band.logits[:, a:b] / weights).half()
            self.labels[self.z0 + a:self.z0 + b] = avg.argmax(0).to(torch.uint8).cpu()
        keep = self.band.shape[0] - n
        # shift the kept slices to the front in place, in chunks of at most n slices: a chunk's source then
        # never overlaps what is written, and no copy of the kept band (1.8 GB on the largest case) is made
        for a in range(0, keep, min(n, 16)):
            b = min(keep, a + min(n, 16))
            self.band.logits[:, a:b] = self.band.logits[:, a + n:b + n]
        self.band.logits[:, keep:] = 0
        self.z0 += n
        self.added = [(w, g) for w, g in self.added if w[0].stop > self.z0]

    def result(self) -> torch.Tensor:
        self.finish_before(self.shape[0])
        return self.labels


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
    argmax (z, y, x) on the CPU.
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
    if streamed:
        acc = StreamedLabels(model.num_classes, shape, patch[0], device)
    else:
        acc = Accumulator(model.num_classes, shape, device if accumulation == Accumulation.DEVICE else torch.device("cpu"))
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
            if not _is_oom(e):
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
        labels = acc.result()
        return labels[revert[1:]], True, report
    logits = acc.average()
    return logits[(slice(None), *revert[1:])], False, report


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


@torch.inference_mode()
def finalize(logits: torch.Tensor, pre: Preprocessed, model: Model, device: torch.device,
             is_labels: bool = False, channels_per_chunk: int = 8) -> torch.Tensor:
    """Label map (uint8, contiguous labels) on the input grid: resample logits back, argmax, un-crop, un-transpose.

    Resampling runs over channel chunks with a running argmax, so the float32 copy nnU-Net makes of all
    43 channels never exists; the result is the same because resampling treats channels independently.
    """
    pm, cm = model.plans_manager, model.configuration
    target_shape = tuple(pre.shape_after_cropping)
    if is_labels:
        if tuple(logits.shape) != target_shape:
            raise RuntimeError("streamed labels need no resampling; use another accumulation for this case")
        labels = logits.to(device)
    elif tuple(logits.shape[1:]) == target_shape:
        labels = logits.to(device).argmax(0).to(torch.uint8)
    else:
        best_val = best_idx = None
        for c0 in range(0, logits.shape[0], channels_per_chunk):
            chunk = logits[c0:c0 + channels_per_chunk].to(device)
            res = _call_with_device(cm.resampling_fn_probabilities, chunk, target_shape, pre.target_spacing,
                                    pre.spacing_transposed, device=device).float()
            val, idx = res.max(0)
            idx = idx.to(torch.uint8) + c0
            if best_val is None:
                best_val, best_idx = val, idx
            else:
                better = val > best_val  # strict: the lower class wins ties, as argmax does
                best_val = torch.where(better, val, best_val)
                best_idx = torch.where(better, idx, best_idx)
            del res, val, idx
        labels = best_idx
    full = torch.zeros(pre.shape_before_cropping, dtype=torch.uint8, device=device)
    full[tuple(slice(b[0], b[1]) for b in pre.bbox)] = labels
    return full.permute(*pm.transpose_backward)
