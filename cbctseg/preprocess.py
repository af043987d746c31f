"""Preprocessing as the plans say: transpose, crop to non-zero, normalise, resample (on the device).

nnU-Net's own functions do each step; we only choose where the resampling runs and keep what the
finalize step needs to undo them.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

from .model import Model


@dataclass
class Preprocessed:
    """The network's input (1, z, y, x) on the device, and how to map a prediction back to the input grid."""

    data: torch.Tensor
    shape_before_cropping: tuple[int, ...]
    bbox: list[list[int]]
    shape_after_cropping: tuple[int, ...]
    spacing_transposed: list[float]  # the input's spacing in the network's axis order
    target_spacing: list[float]


def _call_with_device(fn, *args, device: torch.device):
    """nnU-Net's resampling functions are partials; the torch ones take a device, the others do not."""
    target = fn.func if hasattr(fn, "func") else fn
    if "device" in inspect.signature(target).parameters:
        return fn(*args, device=device)
    return fn(*args)


def preprocess(image: np.ndarray, spacing_zyx: list[float], model: Model, device: torch.device) -> Preprocessed:
    """Turn an image array (z, y, x) with its spacing into the network's input, as nnU-Net's DefaultPreprocessor."""
    pm, cm = model.plans_manager, model.configuration
    data = image[None].astype(np.float32, copy=True)
    data = data.transpose([0, *[i + 1 for i in pm.transpose_forward]])
    spacing = [spacing_zyx[i] for i in pm.transpose_forward]
    shape_before = tuple(data.shape[1:])
    data, seg, bbox = crop_to_nonzero(data)
    shape_after_crop = tuple(data.shape[1:])
    target = list(cm.spacing)
    if len(target) < len(shape_after_crop):
        target = [spacing[0], *target]
    new_shape = compute_new_shape(shape_after_crop, spacing, target)
    data = DefaultPreprocessor(verbose=False)._normalize(data, seg, cm, pm.foreground_intensity_properties_per_channel)
    tensor = torch.from_numpy(np.ascontiguousarray(data)).to(device)
    tensor = _call_with_device(cm.resampling_fn_data, tensor, new_shape, spacing, target, device=device)
    return Preprocessed(tensor.float().contiguous(), shape_before, [list(map(int, b)) for b in bbox],
                        shape_after_crop, spacing, target)
