"""Ensembles of several models, each with its own plans: their softmax probabilities averaged on the input grid.

nnU-Net ensembles models offline: each model writes its probabilities (its folds' and flips' logits averaged,
resampled to the input's cropped grid, softmax, un-cropped with background 1 outside the crop) and
`nnUNetv2_ensemble` averages them, then takes the argmax. Here each model's averaged logits go into one
weighted sum of probabilities on the input grid as soon as they are final: band by band while a model that
needs no resampling streams (`stitching.StreamedLabels` with a sink), or, for a model that resamples, by
chunks of channels in two sweeps over its resampled logits (a per-voxel log-sum-exp, then the probabilities).
So one fp16 sum of the input's size exists, and never a float copy of the volume per model.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cbctseg.inference.preprocess import Preprocessed, _call_with_device
from cbctseg.inference.stitching import CHUNK_BYTES, _slices_per_chunk
from cbctseg.model.loading import Model
from cbctseg.networks.backend import BackendSlot
from cbctseg.networks.device import free_memory


@dataclass(frozen=True)
class LoadedModel:
    """One model of a run: the loaded model, how its networks run (chosen once per run), its ensemble weight."""

    model: Model
    backend: BackendSlot
    weight: float = 1.0


def sums_device(num_classes: int, shape: tuple[int, ...], device: torch.device) -> torch.device:
    """Where the probability sums live: on the GPU when they take at most a third of its free memory (the
    models' own sums and forward passes need the rest), else on the CPU."""
    free = free_memory(device)
    need = 2 * num_classes * int(np.prod(shape))
    return device if free is not None and 3 * need + 1024**3 < free else torch.device("cpu")


class ProbabilitySum:
    """The weighted sum of the models' softmax probabilities (fp16, (C, *input shape)) on the input's grid."""

    def __init__(self, num_classes: int, shape: tuple[int, ...], device: torch.device):
        self.sums = torch.zeros((num_classes, *shape), dtype=torch.half, device=device)
        self.models = 0  # models added

    def _region(self, model: Model, pre: Preprocessed) -> torch.Tensor:
        """The sums over the model's cropped region, in the model's axis order (a view)."""
        view = self.sums.permute(0, *[a + 1 for a in model.plans_manager.transpose_forward])
        return view[(slice(None), *(slice(a, b) for a, b in pre.bbox))]

    def sink(self, model: Model, pre: Preprocessed, weight: float) -> Callable[[int, torch.Tensor], None]:
        """A sink for a model's finished bands of averaged logits on its cropped grid (no resampling): adds
        weight x softmax of the band starting at slice z."""
        region = self._region(model, pre)

        def add(z: int, logits: torch.Tensor) -> None:
            p = torch.softmax(logits.float(), 0).mul_(weight)
            region[:, z:z + p.shape[1]] += p.to(region.device, torch.half)

        return add

    @torch.inference_mode()
    def add_logits(self, logits: torch.Tensor, pre: Preprocessed, model: Model, weight: float,
                   device: torch.device) -> None:
        """Add weight x softmax of a model's averaged logits (C, *its grid), resampled to the cropped input grid
        as nnU-Net resamples them, working on `device` by chunks."""
        target = tuple(pre.shape_after_cropping)
        if tuple(logits.shape[1:]) == target:
            add = self.sink(model, pre, weight)
            step = _slices_per_chunk(logits[:, :1].numel() * 12)
            for z in range(0, target[0], step):
                add(z, logits[:, z:z + step].to(device))
        else:
            self._add_resampled(logits, pre, model, weight, device, target)
        self.models += 1

    def _add_resampled(self, logits: torch.Tensor, pre: Preprocessed, model: Model, weight: float,
                       device: torch.device, target: tuple[int, ...]) -> None:
        """Softmax over channels resampled a chunk at a time: a first sweep keeps each voxel's running maximum
        and sum of exponentials, a second adds exp(logit - max) / sum; the resampling of a channel does not
        depend on the others, so each sweep sees the same values."""
        per_channel = (int(np.prod(logits.shape[1:])) + int(np.prod(target))) * 4
        chunk = max(1, CHUNK_BYTES // per_channel)
        cm = model.configuration

        def resampled(c0: int) -> torch.Tensor:
            part = logits[c0:c0 + chunk].to(device)
            return _call_with_device(cm.resampling_fn_probabilities, part, target, pre.target_spacing,
                                     pre.spacing_transposed, device=device).float()

        top = total = None
        for c0 in range(0, logits.shape[0], chunk):
            res = resampled(c0)
            m = res.amax(0)
            if top is None:
                top, total = m, torch.exp(res - m).sum(0)
            else:
                new_top = torch.maximum(top, m)
                total = total * torch.exp(top - new_top) + torch.exp(res - new_top).sum(0)
                top = new_top
            del res, m
        region = self._region(model, pre)
        scale = total.reciprocal_().mul_(weight)
        for c0 in range(0, logits.shape[0], chunk):
            p = torch.exp(resampled(c0).sub_(top)).mul_(scale)
            region[c0:c0 + p.shape[0]] += p.to(region.device, torch.half)
            del p

    @torch.inference_mode()
    def labels(self, device: torch.device) -> torch.Tensor:
        """The argmax (uint8, input grid) by slices; voxels no model covered (outside every crop) are background."""
        shape = tuple(self.sums.shape[1:])
        out = torch.empty(shape, dtype=torch.uint8, device=device)
        step = _slices_per_chunk(self.sums[:, :1].numel() * 10)
        for z in range(0, shape[0], step):
            out[z:z + step] = self.sums[:, z:z + step].to(device).argmax(0)
        return out
