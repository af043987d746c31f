"""Stitching of windows' logits: Gaussian-weighted fp16 logit sums over the image, averaged or argmaxed by chunks.

The logit sum is fp16 as in nnU-Net; a per-voxel fp32 weight sum makes any subset of the work a correct
weighted average, which is what lets the budget stop early and an out-of-memory error cost nothing already
done. `Accumulator` holds the sums of the whole image (on the device or the CPU); `StreamedLabels` holds only
the band of slices the current windows touch and argmaxes every slice no later window touches. Each weight is
normalised by its voxel's planned weight total (`Normaliser`), so the sums stay weighted means of the logits.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def is_oom(e: BaseException) -> bool:
    """Whether `e` says the device ran out of memory (torch's own error, or a RuntimeError's message)."""
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
                if not is_oom(e):
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
            return
        # fp32 logits: weighted, added to the sums in fp32 and rounded once, as `sums += chunk * w32` does, in
        # the weighted chunk's own memory; a third faster on the CPU than the mixed-dtype in-place add
        weighted = chunk.mul_(w32) if dims else chunk * w32  # the flipped chunk is a copy already
        sums.copy_(weighted.add_(sums))

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

    With a `sink`, finished slices are not argmaxed here: sink(first region slice, averaged fp16 logits
    (C, n, y, x)) takes them (an ensemble adds them to its probability sums), and `result` is None.
    """

    def __init__(self, num_classes: int, shape: tuple[int, ...], patch_z: int, device: torch.device,
                 normaliser: Normaliser | None = None, origin: tuple[int, ...] | None = None,
                 sink: Callable[[int, torch.Tensor], None] | None = None):
        self.shape, self.num_classes, self.device = tuple(shape), num_classes, device
        self.normaliser = normaliser
        self.origin = tuple(origin) if origin is not None else (0,) * len(self.shape)
        self.sink = sink
        self.labels = torch.zeros(self.shape, dtype=torch.uint8) if sink is None else None
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
            if self.sink is not None:
                self.sink(self.z0 + a, avg)
            else:
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

    def result(self) -> torch.Tensor | None:
        """The label map of the region (uint8, on the CPU); None with a sink, which has had every slice."""
        self.finish_before(self.origin[0] + self.shape[0])
        return self.labels
