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

import numpy as np
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


# temporaries of adding a window, averaging and the argmax stay near this many bytes: they go by chunks of
# channels or slices, so no full-size fp32 (or fp16) copy of the logit sums ever exists beside them
CHUNK_BYTES = 128 * 1024**2


class NonFiniteLogits(RuntimeError):
    """The averaged logits hold NaN or infinity: the fp16 sums overflowed, or the network answered NaN/inf."""


class Normaliser:
    """Per-voxel factors that keep the fp16 logit sums weighted *means* of the logits rather than sums.

    nnU-Net sums one fold's windows in fp16 with the Gaussian (peak 10) over the flips' mean: where windows
    overlap its sums reach 10-20 times the logits, and adding all (fold, flip) passes would reach that times
    the number of passes, so large logits overflow. Along the image's edges and in its corners only windows'
    rims cover a voxel, whose Gaussian weights are 1e-5 to 1e-8: there the sums are subnormal fp16 numbers,
    and every rounding loses much of their precision. Multiplying each weight at voxel x by about
    1 / (passes * sum of all planned windows' weights at x) fixes both: every voxel's sum stays near its
    logits' size (a convex combination once every pass is in), so it cannot overflow where the network's own
    fp16 output does not, and carries fp16's full relative precision, also in the corners. The weight sums get
    the same factor, so the average, also of a partial ensemble, is the plain Gaussian-weighted one.

    The Gaussian is a product of one profile per axis, and the windows lie on a grid: the sum of window
    weights is a product of per-axis sums (three small vectors, no volume). Where fp16 rounds the Gaussian
    (subnormal rims, and nnU-Net's floor for values that round to zero) the product is only approximate,
    which the floor bounds and the weight sums make exact.
    """

    def __init__(self, weight: torch.Tensor, windows: list[tuple[slice, ...]], passes: int):
        w = weight.float()
        peak = float(w.max())
        center = tuple(n // 2 for n in w.shape)
        self.passes = passes
        self.peak = peak
        self.floor = float(w[w > 0].min())  # nnU-Net replaces zeros by the smallest positive weight
        self.axis_sums: list[torch.Tensor] = []
        for a, n in enumerate(w.shape):
            line = tuple(slice(None) if b == a else c for b, c in enumerate(center))
            profile = (w[line] / peak).cpu()
            length = max(s[a].stop for s in windows)
            sums = torch.zeros(length, dtype=torch.float32)
            for start in sorted({s[a].start for s in windows}):
                sums[start:start + n] += profile
            self.axis_sums.append(sums)
        self._on: tuple[torch.device | None, list[torch.Tensor]] = (None, [])

    def factor(self, region: tuple[slice, ...], device: torch.device) -> torch.Tensor:
        """The factors (fp32, on `device`) over `region` (padded-image coordinates)."""
        if self._on[0] != device:
            self._on = (device, [v.to(device) for v in self.axis_sums])
        total = None
        for a, (r, sums) in enumerate(zip(region, self._on[1])):
            shape = [1] * len(region)
            shape[a] = r.stop - r.start
            part = sums[r].view(shape)
            total = part * self.peak if total is None else total * part
        return (total.clamp_min(self.floor) * self.passes).reciprocal_()


def _slices_per_chunk(per_slice_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(1, per_slice_bytes))


def _clip(window: tuple[slice, ...], origin: tuple[int, ...], shape: tuple[int, ...]
          ) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """The part of `window` (padded-image coordinates) inside the region [origin, origin + shape): its slices in
    the region and in the window, or None when they do not meet."""
    target, source = [], []
    for w, o, s in zip(window, origin, shape):
        a, b = max(w.start, o), min(w.stop, o + s)
        if a >= b:
            return None
        target.append(slice(a - o, b - o))
        source.append(slice(a - w.start, b - w.start))
    return tuple(target), tuple(source)


def check_finite(avg: torch.Tensor, first_slice: int) -> None:
    """Raise NonFiniteLogits when a chunk of averaged logits (C, z, ...) holds NaN or infinity."""
    if bool(torch.isfinite(avg).all()):
        return
    nan = int(torch.isnan(avg).sum())
    inf = int(torch.isinf(avg).sum())
    raise NonFiniteLogits(
        f"the network's logits are not finite ({inf} infinite and {nan} NaN values from slice {first_slice} of "
        f"the network's input on): they overflowed the float16 sums or the network answered NaN/infinity; the "
        f"model's weights are damaged or scaled far beyond what nnU-Net's float16 inference allows")


class Accumulator:
    """Gaussian-weighted sums of logits (fp16) and of weights (fp32) over a region of the padded image.

    The region (`origin`, `shape` in padded-image coordinates) is the image without its padding: windows are
    added clipped to it, so a case thinner than the patch holds sums for its own slices only (8 of 160 on a
    thin case), and the sums of every voxel it holds are exactly those of the whole padded image.
    With a `normaliser`, every weight is multiplied by its factor, in the logit sums and the weight sums alike.
    sum_weights=False: logits only; the owner keeps account of the weights (StreamedLabels).
    """

    def __init__(self, num_classes: int, shape: tuple[int, ...], device: torch.device, sum_weights: bool = True,
                 normaliser: Normaliser | None = None, origin: tuple[int, ...] | None = None):
        self.shape = tuple(shape)
        self.origin = tuple(origin) if origin is not None else (0,) * len(self.shape)
        self.normaliser = normaliser
        self.logits = torch.zeros((num_classes, *self.shape), dtype=torch.half, device=device)
        self.weights = torch.zeros(self.shape, dtype=torch.float32, device=device) if sum_weights else None
        self._w: tuple[torch.Tensor, ...] | None = None

    @property
    def device(self) -> torch.device:
        return self.logits.device

    def add(self, window: tuple[slice, ...], logits: torch.Tensor, weight: torch.Tensor,
            flip: tuple[int, ...] | list[int] = (), channels_per_chunk: int | None = None) -> None:
        """Add weight * logits (C, *window shape) at window; `flip`: logits are still flipped along these axes.

        Flipping back and weighting go by chunks of channels (CHUNK_BYTES): no full-size temporary of the
        window's logits.
        """
        clipped = _clip(window, self.origin, self.shape)
        if clipped is None:
            return
        target, source = clipped
        w16, w32 = self.window_weight(target, source, weight)
        dims = [a + 1 for a in flip]
        # the same voxels in the network's output, which is still flipped along `flip`
        size = logits.shape[1:]
        flipped = tuple(slice(n - s.stop, n - s.start) if a in flip else s
                        for a, (s, n) in enumerate(zip(source, size)))
        if channels_per_chunk is None:
            channels_per_chunk = _slices_per_chunk(w32.numel() * 4)
        for c0 in range(0, logits.shape[0], channels_per_chunk):
            try:
                self._add_channels(target, logits, flipped, c0, c0 + channels_per_chunk, dims, w16, w32)
            except RuntimeError as e:
                if not _is_oom(e):
                    raise
                # earlier chunks are already in the sums: finish this one a channel at a time, never redo it
                del e
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                try:
                    for c in range(c0, min(c0 + channels_per_chunk, logits.shape[0])):
                        self._add_channels(target, logits, flipped, c, c + 1, dims, w16, w32)
                except RuntimeError:
                    # not an "out of memory" error: retrying this item would add its first chunks twice
                    raise RuntimeError("device memory exhausted while adding a window to the sums") from None
        if self.weights is not None:
            self.weights[target] += w32

    def _add_channels(self, target, logits, flipped, c0: int, c1: int, dims: list[int], w16, w32) -> None:
        chunk = logits[(slice(c0, c1), *flipped)].to(self.device)
        chunk = torch.flip(chunk, dims) if dims else chunk
        sums = self.logits[(slice(c0, c1), *target)]
        if chunk.dtype == sums.dtype:
            # fp16 network output (autocast): fused, fp32 math and one rounding
            sums.addcmul_(chunk, w16)
        elif dims:
            sums += chunk.mul_(w32)  # the flipped chunk is a copy already: weight it in place
        else:
            sums += chunk * w32

    def window_weight(self, target: tuple[slice, ...], source: tuple[slice, ...], weight: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights (fp16, fp32) of the voxels `target` of the sums, from `source` of the window weight,
        times the normaliser's factors there."""
        if self._w is None or self._w[0] is not weight:
            # converted once per weight tensor
            self._w = (weight, weight.to(self.device, self.logits.dtype), weight.to(self.device, torch.float32))
        if self.normaliser is None:
            return self._w[1][source], self._w[2][source]
        region = tuple(slice(t.start + o, t.stop + o) for t, o in zip(target, self.origin))
        w32 = self._w[2][source] * self.normaliser.factor(region, self.device)
        return w32.to(self.logits.dtype), w32

    def move_to(self, device: torch.device) -> None:
        self.logits, self._w = self.logits.to(device), None
        self.weights = self.weights.to(device) if self.weights is not None else None

    def average(self) -> torch.Tensor:
        """Logit sums divided by weight sums in place, a few slices at a time (the accumulator is spent afterwards).

        Raises NonFiniteLogits when the result holds NaN or infinity."""
        per_slice = self.logits[:, :1].numel() * 4  # the fp32 temporary of a mixed-dtype division
        step = _slices_per_chunk(per_slice)
        for z0 in range(0, self.shape[0], step):
            w = self.weights[z0:z0 + step]
            if not bool((w > 0).all()):
                raise RuntimeError("some voxels were covered by no window")
            part = self.logits[:, z0:z0 + step]
            part.div_(w)
            check_finite(part, z0)
        self.weights = None
        return self.logits


class StreamedLabels:
    """Accumulates a band of slices on the device and emits finished label slices to the CPU.

    The band holds logit sums only. The weight sums are summed again, a few slices at a time, when slices are
    finished, from the windows added so far, in the order they were added: the same fp32 sums a weight band
    would hold, without keeping one (168 MB on the largest ToothFairy2 case). Holds the region `origin`,
    `shape` of the padded image (the image without its padding; z coordinates of `z0` and `weights` are the
    region's, windows and `finish_before` speak padded-image coordinates); valid when the logits need no
    resampling before the argmax.
    """

    def __init__(self, num_classes: int, shape: tuple[int, ...], patch_z: int, device: torch.device,
                 normaliser: Normaliser | None = None, origin: tuple[int, ...] | None = None):
        self.shape, self.num_classes, self.device = tuple(shape), num_classes, device
        self.normaliser = normaliser
        self.origin = tuple(origin) if origin is not None else (0,) * len(self.shape)
        self.labels = torch.zeros(self.shape, dtype=torch.uint8)
        self.z0 = 0  # first slice (of the region) held in the band
        self.band = self._band(min(patch_z, self.shape[0]))
        self.added: list[tuple[tuple[slice, ...], torch.Tensor]] = []  # (window, weight) of every add, in order

    def _band(self, slices: int) -> Accumulator:
        return Accumulator(self.num_classes, (slices, *self.shape[1:]), self.device, sum_weights=False,
                           normaliser=self.normaliser, origin=(self.origin[0] + self.z0, *self.origin[1:]))

    def _ensure(self, z_stop: int) -> None:
        """Grow the band so it reaches region slice z_stop (only when windows are unevenly spaced)."""
        held = self.band.shape[0]
        if self.z0 + held >= z_stop:
            return
        bigger = self._band(z_stop - self.z0)
        bigger.logits[:, :held] = self.band.logits
        self.band = bigger

    def add(self, window: tuple[slice, ...], logits: torch.Tensor, weight: torch.Tensor,
            flip: tuple[int, ...] | list[int] = ()) -> None:
        clipped = _clip(window, self.origin, self.shape)
        if clipped is None:
            return
        z = clipped[0][0]
        if z.start < self.z0:
            raise RuntimeError("streamed accumulation needs windows in slice order")
        self._ensure(z.stop)
        self.band.add(window, logits, weight, flip)
        self.added.append((window, weight))

    def weights(self, z_start: int, z_stop: int) -> torch.Tensor:
        """The weight sums of region slices [z_start, z_stop), summed in the order windows were added."""
        out = torch.zeros((z_stop - z_start, *self.shape[1:]), dtype=torch.float32, device=self.band.device)
        origin = (self.origin[0] + z_start, *self.origin[1:])
        for window, weight in self.added:
            clipped = _clip(window, origin, tuple(out.shape))
            if clipped is not None:
                target, source = clipped
                # the same voxels in the band's coordinates
                in_band = tuple(slice(t.start + o - b, t.stop + o - b)
                                for t, o, b in zip(target, origin, self.band.origin))
                out[target] += self.band.window_weight(in_band, source, weight)[1]
        return out

    def finish_before(self, z: int) -> None:
        """Every slice before padded-image slice z is final: argmax it to the CPU and drop it from the band."""
        n = min(z - self.origin[0], self.z0 + self.band.shape[0]) - self.z0
        if n <= 0:
            return
        # a few slices at a time keeps the fp32 temporaries small
        step = _slices_per_chunk(self.band.logits[:, :1].numel() * 6)
        for a in range(0, n, step):
            b = min(n, a + step)
            weights = self.weights(self.z0 + a, self.z0 + b)
            if not bool((weights > 0).all()):
                raise RuntimeError("some voxels were covered by no window")
            # the same fp16 rounding as Accumulator.average, so the argmax is the same
            avg = (self.band.logits[:, a:b] / weights).half()
            del weights
            check_finite(avg, self.z0 + a)
            self.labels[self.z0 + a:self.z0 + b] = avg.argmax(0).to(torch.uint8).cpu()
            del avg
        keep = self.band.shape[0] - n
        # shift the kept slices to the front in place, in chunks of at most n slices: a chunk's source then
        # never overlaps what is written, and no copy of the kept band (1.8 GB on the largest case) is made
        for a in range(0, keep, min(n, 16)):
            b = min(keep, a + min(n, 16))
            self.band.logits[:, a:b] = self.band.logits[:, a + n:b + n]
        self.band.logits[:, keep:] = 0
        self.z0 += n
        self.band.origin = (self.origin[0] + self.z0, *self.origin[1:])
        self.added = [(w, g) for w, g in self.added if w[0].stop > self.origin[0] + self.z0]

    def result(self) -> torch.Tensor:
        """The label map of the region (uint8, on the CPU)."""
        self.finish_before(self.origin[0] + self.shape[0])
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
    argmax (z, y, x) on the CPU. Raises NonFiniteLogits when the averaged logits hold NaN or infinity.
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


@torch.inference_mode()
def finalize(logits: torch.Tensor, pre: Preprocessed, model: Model, device: torch.device,
             is_labels: bool = False, channels_per_chunk: int | None = None) -> torch.Tensor:
    """Label map (uint8, contiguous labels) on the input grid: resample logits back, argmax, un-crop, un-transpose.

    The argmax goes by slices; resampling by chunks of channels (CHUNK_BYTES of fp32 copies) with a running
    maximum, so neither the float32 copy nnU-Net makes of all 43 channels nor an int64 index of the volume
    ever exists; the result is the same because resampling treats channels independently.
    """
    pm, cm = model.plans_manager, model.configuration
    target_shape = tuple(pre.shape_after_cropping)
    if is_labels:
        if tuple(logits.shape) != target_shape:
            raise RuntimeError("streamed labels need no resampling; use another accumulation for this case")
        labels = logits.to(device)
    elif tuple(logits.shape[1:]) == target_shape:
        labels = torch.empty(target_shape, dtype=torch.uint8, device=device)
        step = _slices_per_chunk(logits[:, :1].numel() * 8)
        for z0 in range(0, target_shape[0], step):
            labels[z0:z0 + step] = logits[:, z0:z0 + step].to(device).argmax(0)
    else:
        if channels_per_chunk is None:
            # resampling makes a float32 copy of its input and its float32 result, per channel
            per_channel = (int(np.prod(logits.shape[1:])) + int(np.prod(target_shape))) * 4
            channels_per_chunk = max(1, CHUNK_BYTES // per_channel)
        best_val = labels = None
        for c0 in range(0, logits.shape[0], channels_per_chunk):
            chunk = logits[c0:c0 + channels_per_chunk].to(device)
            res = _call_with_device(cm.resampling_fn_probabilities, chunk, target_shape, pre.target_spacing,
                                    pre.spacing_transposed, device=device)
            del chunk
            for j in range(res.shape[0]):
                val = res[j].float()
                if best_val is None:
                    best_val = val.clone()  # not a view: res is freed chunk by chunk
                    labels = torch.zeros(target_shape, dtype=torch.uint8, device=device)
                    continue
                better = val > best_val  # strict: the lower class wins ties, as argmax does
                labels.masked_fill_(better, c0 + j)
                torch.maximum(best_val, val, out=best_val)
                del better, val
            del res
        del best_val
    full = torch.zeros(pre.shape_before_cropping, dtype=torch.uint8, device=device)
    full[tuple(slice(b[0], b[1]) for b in pre.bbox)] = labels
    return full.permute(*pm.transpose_backward)
