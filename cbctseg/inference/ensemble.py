"""Ensembles of several models, each with its own plans: their softmax probabilities averaged on the input grid.

nnU-Net ensembles models offline: each model writes its probabilities (its folds' and flips' logits averaged,
resampled to the input's cropped grid, softmax, un-cropped with background 1 outside the crop) and
`nnUNetv2_ensemble` averages them, then takes the argmax. Here the models run one after the other and the
label map is made band by band of slices (`BandEnsemble`): every model but the last keeps its averaged fp16
logits on its own grid (on the CPU), and the last one, when it predicts on the input grid, streams its
finished bands (`stitching.StreamedLabels` with a sink); each band then gets every kept model's logits
resampled for just those slices (`band_resampling`), the weighted softmax sum and the argmax. So no
probability sum and no resampled copy of the input's size ever exists: on the largest ToothFairy2 case the
kept model at 1.5 times the spacing holds 2.0 GB, where a sum over the input grid would hold 6.7 GB.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cbctseg.inference.band_resampling import LINEAR, BandResampler, axis_modes
from cbctseg.inference.finalize import resampled_chunks
from cbctseg.inference.preprocess import Preprocessed
from cbctseg.inference.stitching import _slices_per_chunk
from cbctseg.model.loading import Model
from cbctseg.networks.backend import BackendSlot

CPU = torch.device("cpu")


@dataclass(frozen=True)
class LoadedModel:
    """One model of a run: the loaded model, how its networks run (chosen once per run), its ensemble weight."""

    model: Model
    backend: BackendSlot
    weight: float = 1.0


class BandEnsemble:
    """The ensemble's label map on the input grid, made band by band along the reference model's first axis.

    The reference is the model that streams its bands (run last), or the first model run when none streams;
    everything here is in its axis order (its `transpose_forward`) and over its cropped region, which is every
    model's: the crop is the input's non-zero box. Voxels outside it are background, as in nnU-Net.
    """

    def __init__(self, reference: Model, pre: Preprocessed, num_classes: int):
        self.order = list(reference.plans_manager.transpose_forward)
        self.back = list(reference.plans_manager.transpose_backward)
        self.num_classes = num_classes
        self.target = tuple(int(s) for s in pre.shape_after_cropping)
        self.kept: list[tuple[BandResampler, float]] = []
        self.labels = torch.zeros(tuple(pre.shape_before_cropping), dtype=torch.uint8)
        self._region = self.labels[tuple(slice(a, b) for a, b in pre.bbox)]
        self.streamed = False  # a model streamed every band (the label map is complete)

    def _in_reference_order(self, model: Model) -> list[int]:
        """For each axis of the reference, the model's axis that is the same axis of the input."""
        back = model.plans_manager.transpose_backward
        return [back[a] for a in self.order]

    @torch.inference_mode()
    def keep(self, logits: torch.Tensor, pre: Preprocessed, model: Model, weight: float,
             device: torch.device) -> None:
        """Keep a finished model's averaged logits (C, *its grid) for the bands, on the CPU, in the reference's
        axis order. A model whose resampling `band_resampling` does not reproduce is resampled here with its
        own function (by chunks of channels on `device`) to a copy of the input grid's size."""
        axes = self._in_reference_order(model)
        view = logits.permute(0, *[a + 1 for a in axes])
        cur = [pre.target_spacing[a] for a in axes]
        new = [pre.spacing_transposed[a] for a in axes]
        modes = axis_modes(model.configuration.resampling_fn_probabilities, cur, new)
        if modes is None and tuple(logits.shape[1:]) != tuple(pre.shape_after_cropping):
            view = self._resampled(logits, pre, model, device).permute(0, *[a + 1 for a in axes])
            modes = [LINEAR] * len(axes)
        if tuple(view.shape[1:]) == self.target:
            modes = [LINEAR] * len(axes)  # nothing to resample
        self.kept.append((BandResampler(view.to(CPU, torch.half), self.target, modes), float(weight)))

    @staticmethod
    def _resampled(logits: torch.Tensor, pre: Preprocessed, model: Model, device: torch.device) -> torch.Tensor:
        out = torch.empty((logits.shape[0], *pre.shape_after_cropping), dtype=torch.half)
        for c0, res in resampled_chunks(logits, pre, model, device):
            out[c0:c0 + res.shape[0]] = res.cpu()
        return out

    def sink(self, weight: float, device: torch.device) -> Callable[[int, torch.Tensor], None]:
        """For the reference model streaming its bands: sink(first slice, averaged logits (C, n, ...)) finishes
        those slices of the label map with every kept model."""

        def take(z: int, logits: torch.Tensor) -> None:
            self._band(z, z + logits.shape[1], device, torch.softmax(logits.to(device).float(), 0).mul_(weight))
            if z + logits.shape[1] == self.target[0]:
                self.streamed = True

        return take

    @torch.inference_mode()
    def _band(self, z0: int, z1: int, device: torch.device, total: torch.Tensor | None = None) -> None:
        for resampler, weight in self.kept:
            p = torch.softmax(resampler.band(z0, z1, device), 0).mul_(weight)
            total = p if total is None else total.add_(p)
            del p
        self._region[z0:z1] = total.argmax(0).to(torch.uint8).cpu()

    @torch.inference_mode()
    def result(self, device: torch.device) -> torch.Tensor:
        """The argmax (uint8) on the input grid, in the input's axis order. Bands no model streamed are made
        here from the kept models."""
        if not self.streamed:
            # the float32 sum, a model's resampled band and its softmax
            step = _slices_per_chunk(self.num_classes * int(np.prod(self.target[1:])) * 12)
            for z in range(0, self.target[0], step):
                self._band(z, min(z + step, self.target[0]), device)
        return self.labels.permute(*self.back).to(device)
