"""Sliding-window prediction of the fold ensemble with mirroring, and the finalize step, on one device.

Windows run on `device`; logits accumulate where `accumulate_on` says (the GPU when memory allows). The
logit sum is fp16 as in nnU-Net; the per-voxel weight sum (fp32) makes any prefix of the work a correct
weighted average, which is what lets the budget stop early.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from tqdm import tqdm

from .model import Model
from .preprocess import Preprocessed, _call_with_device
from .schedule import Budget, anytime_passes, sliding_windows

log = logging.getLogger(__name__)


@dataclass
class PredictionReport:
    """What the sliding window did for one case."""

    windows: int = 0
    passes_planned: int = 0
    items_planned: int = 0
    items_done: int = 0
    passes_done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds_per_item: float | None = None


class Accumulator:
    """Gaussian-weighted sums of logits (fp16) and of weights (fp32) over a (padded) image."""

    def __init__(self, num_classes: int, shape: tuple[int, ...], device: torch.device):
        self.logits = torch.zeros((num_classes, *shape), dtype=torch.half, device=device)
        self.weights = torch.zeros(shape, dtype=torch.float32, device=device)

    def add(self, window: tuple[slice, ...], logits: torch.Tensor, weight: torch.Tensor) -> None:
        logits = logits.to(self.logits.device, non_blocking=True)
        weight = weight.to(self.weights.device)
        self.logits[(slice(None), *window)] += logits * weight
        self.weights[window] += weight

    def average(self) -> torch.Tensor:
        """Logit sum divided by weight sum, in place (the accumulator is spent afterwards)."""
        if not bool((self.weights > 0).all()):
            raise RuntimeError("some voxels were covered by no window")
        return self.logits.div_(self.weights)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def predict_logits(model: Model, data: torch.Tensor, step_size: float = 0.5, use_mirroring: bool = True,
                   accumulate_on: torch.device | None = None, budget: Budget | None = None,
                   progress: bool = True) -> tuple[torch.Tensor, PredictionReport]:
    """Ensembled, mirrored, Gaussian-weighted logits (C, z, y, x) of the preprocessed data (1, z, y, x)."""
    device = data.device
    accumulate_on = accumulate_on or device
    budget = budget or Budget(None)
    patch = model.patch_size
    padded, revert = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
    windows = sliding_windows(tuple(padded.shape[1:]), patch, step_size)
    passes = anytime_passes(len(model.networks), model.mirror_axes, use_mirroring)
    report = PredictionReport(windows=len(windows), passes_planned=len(passes),
                              items_planned=len(windows) * len(passes))
    gaussian = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=device)
    acc = Accumulator(model.num_classes, tuple(padded.shape[1:]), accumulate_on)
    bar = tqdm(total=report.items_planned, desc="sliding window", unit="pass", disable=not progress, leave=False)
    started = None
    stop_reason = None
    done = [0] * len(passes)
    for p_idx, p in enumerate(passes):
        net = model.networks[p.model]
        dims = [a + 2 for a in p.flip]
        for w in windows:
            # the first pass always completes: it is the one that covers every voxel
            if p_idx > 0 and report.seconds_per_item is not None and not budget.allows(report.seconds_per_item):
                stop_reason = f"time budget: {budget.left():.1f} s left, one window takes {report.seconds_per_item:.2f} s"
                break
            x = padded[(slice(None), *w)][None]
            x = torch.flip(x, dims) if dims else x.contiguous()
            with _autocast(device):
                y = net(x)
            y = torch.flip(y, dims) if dims else y
            acc.add(w, y[0].float(), gaussian)
            done[p_idx] += 1
            report.items_done += 1
            bar.update()
            _sync(device)
            if report.items_done == 1:
                started = time.monotonic()  # the first window pays for warm-up; time the rest
            else:
                report.seconds_per_item = (time.monotonic() - started) / (report.items_done - 1)
        if stop_reason:
            break
    for p, n in zip(passes, done):
        name = f"fold {model.folds[p.model]}" + (f" flip {list(p.flip)}" if p.flip else "")
        if n == len(windows):
            report.passes_done.append(name)
        else:
            report.skipped.append(f"{name}: {len(windows) - n} of {len(windows)} windows ({stop_reason})")
    bar.close()
    logits = acc.average()
    return logits[(slice(None), *revert[1:])], report


@torch.inference_mode()
def finalize(logits: torch.Tensor, pre: Preprocessed, model: Model, device: torch.device,
             channels_per_chunk: int = 8) -> torch.Tensor:
    """Label map (uint8, contiguous labels) on the input grid: resample logits back, argmax, un-crop, un-transpose.

    Resampling runs over channel chunks with a running argmax, so the float32 copy nnU-Net makes of all
    43 channels never exists; the result is the same because resampling treats channels independently.
    """
    pm, cm = model.plans_manager, model.configuration
    logits = logits.to(device)
    target_shape = pre.shape_after_cropping
    if tuple(logits.shape[1:]) == tuple(target_shape):
        labels = logits.argmax(0).to(torch.uint8)
    else:
        best_val = best_idx = None
        for c0 in range(0, logits.shape[0], channels_per_chunk):
            chunk = logits[c0:c0 + channels_per_chunk]
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
