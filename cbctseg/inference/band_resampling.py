"""A model's logits resampled to another grid one band of slices at a time, as nnU-Net's torch resampling
(`resample_torch_fornnunet`) resamples the whole volume.

That function is linear interpolation (torch's, half-pixel centres, edges clamped) on every axis, or, where
the spacing is anisotropic, linear in-plane and nearest ("nearest-exact") along the low-resolution axis. Each
output voxel depends on at most two input voxels per axis, and the interpolation is a product of one 1-D
interpolation per axis, so any band of output slices is computed from the few input slices around it, with
the same source positions and weights as the whole-volume call: the same values up to float32 rounding
(the per-axis products are summed in another order). An ensemble uses it to bring a model's prediction to
the input grid band by band, beside a model that streams its own bands, instead of resampling every model to
a full-size copy of the input grid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis
from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet

LINEAR, NEAREST = "linear", "nearest-exact"


def axis_modes(fn, current_spacing: list[float], new_spacing: list[float]) -> list[str] | None:
    """Per axis, how nnU-Net's resampling function `fn` (a partial, as the plans give it) interpolates from a
    grid of `current_spacing` to one of `new_spacing`; None when fn is not one this module reproduces."""
    target = getattr(fn, "func", None)
    kwargs = dict(getattr(fn, "keywords", {}) or {})
    if target is not resample_torch_fornnunet or getattr(fn, "args", ()) or kwargs.get("is_seg", False):
        return None
    if kwargs.get("mode", LINEAR) != LINEAR or kwargs.get("aniso_axis_mode", NEAREST) not in (LINEAR, NEAREST):
        return None
    extra = {"separate_z_anisotropy_threshold": kwargs["separate_z_anisotropy_threshold"]} \
        if "separate_z_anisotropy_threshold" in kwargs else {}
    separate, axis = determine_do_sep_z_and_axis(kwargs.get("force_separate_z"), current_spacing, new_spacing,
                                                 **extra)
    modes = [LINEAR] * len(current_spacing)
    if separate:
        modes[int(axis)] = kwargs.get("aniso_axis_mode", NEAREST)
    return modes


def _sources(out_range: tuple[int, int], in_size: int, out_size: int, mode: str
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For output indices [a, b) along one axis: the two source indices and the second one's weight, computed as
    torch's interpolation computes them (float32 scale in / out, half-pixel centres, clamped at the edges)."""
    a, b = out_range
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    dst = torch.arange(a, b, dtype=torch.float32)
    if mode == NEAREST:
        i0 = torch.clamp(torch.floor((dst + 0.5) * scale).long(), max=in_size - 1)
        return i0, i0, torch.zeros_like(dst)
    src = torch.clamp((dst + 0.5) * scale - 0.5, min=0.0)
    i0 = torch.clamp(torch.floor(src).long(), max=in_size - 1)
    lam = torch.clamp(src - i0.float(), 0.0, 1.0)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, lam


def _lerp(x: torch.Tensor, dim: int, i0: torch.Tensor, i1: torch.Tensor, lam: torch.Tensor,
          mode: str) -> torch.Tensor:
    """x (float32) at the source indices i0, i1 along `dim`, weighted 1 - lam and lam (i0 only for nearest)."""
    first = x.index_select(dim, i0.to(x.device))
    if mode == NEAREST:
        return first
    shape = [1] * x.ndim
    shape[dim] = -1
    lam = lam.to(x.device).view(shape)
    return first.mul_(1 - lam).add_(x.index_select(dim, i1.to(x.device)).mul_(lam))


def _along(x: torch.Tensor, dim: int, out_size: int, mode: str) -> torch.Tensor:
    """x (float32) interpolated along `dim` to `out_size`."""
    if x.shape[dim] == out_size:
        return x
    return _lerp(x, dim, *_sources((0, out_size), x.shape[dim], out_size, mode), mode)


class BandResampler:
    """Logits (C, *grid) of one model, resampled to `target` (the same axes) band by band along axis 0.

    `modes`: per axis, `axis_modes`. The logits stay as they are (fp16, any device); each band reads the few
    slices it needs, interpolates along axis 0 first (the fewest voxels), then in-plane, in float32 on `device`.
    """

    def __init__(self, logits: torch.Tensor, target: tuple[int, ...], modes: list[str]):
        self.logits, self.target, self.modes = logits, tuple(int(t) for t in target), list(modes)

    def band(self, z0: int, z1: int, device: torch.device) -> torch.Tensor:
        """Resampled logits (float32, C x (z1 - z0) x target[1:]) of target slices [z0, z1), on device."""
        n_in = self.logits.shape[1]
        if n_in == self.target[0]:
            x = self.logits[:, z0:z1].to(device, torch.float32)
        else:
            i0, i1, lam = _sources((z0, z1), n_in, self.target[0], self.modes[0])
            lo, hi = int(i0.min()), int(i1.max()) + 1  # the source slices this band reads
            x = _lerp(self.logits[:, lo:hi].to(device, torch.float32), 1, i0 - lo, i1 - lo, lam, self.modes[0])
        inplane = self.target[1:]
        if tuple(x.shape[2:]) == inplane:
            return x
        if self.modes[1] == self.modes[2]:
            # torch's own kernel for both in-plane axes: (C, n) are its batch and channels
            mode = "bilinear" if self.modes[1] == LINEAR else NEAREST
            return F.interpolate(x, size=inplane, mode=mode)
        for dim in (2, 3):
            x = _along(x, dim, self.target[dim - 1], self.modes[dim - 1])
        return x
