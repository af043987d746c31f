"""Preprocessing as the plans say: transpose, crop to non-zero, normalise, resample (on the device).

With CT normalisation (the ToothFairy2 plans) every step runs on the device in torch; any other scheme goes
through nnU-Net's own CPU functions. Both give nnU-Net's DefaultPreprocessor result (tested), and keep what
the finalize step needs to undo them.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

from cbctseg.model.loading import Model


@dataclass
class Preprocessed:
    """The network's input (1, z, y, x) on the device in model.input_dtype, and how to map a prediction back."""

    data: torch.Tensor
    shape_before_cropping: tuple[int, ...]
    bbox: list[list[int]]
    shape_after_cropping: tuple[int, ...]
    spacing_transposed: list[float]  # the input's spacing in the network's axis order
    target_spacing: list[float]


def resample(fn, data: torch.Tensor, new_shape, current_spacing, new_spacing, device: torch.device) -> torch.Tensor:
    """nnU-Net's resampling function `fn` (a partial, as the plans give it) applied to data (C, ...), as a
    float tensor on `device`. The torch functions take a device; the default (scipy) ones take and return
    numpy arrays, on the CPU."""
    target = fn.func if hasattr(fn, "func") else fn
    if "device" in inspect.signature(target).parameters:
        out = fn(data, new_shape, current_spacing, new_spacing, device=device)
    else:
        out = fn(data.cpu().float().numpy(), new_shape, current_spacing, new_spacing)
    return torch.as_tensor(out).to(device)


def nonzero_bbox(data: torch.Tensor) -> list[list[int]]:
    """[start, stop) per spatial axis of the voxels non-zero in any channel of data (C, z, y, x).

    nnU-Net's crop_to_nonzero fills holes in that mask first, which never changes its bounding box. An
    all-zero image keeps its full extent (nnU-Net fails on one).
    """
    mask = (data != 0).any(0)
    bbox = []
    for axis in range(mask.ndim):
        hit = torch.nonzero(mask.any(dim=[a for a in range(mask.ndim) if a != axis])).flatten()
        bbox.append([int(hit[0]), int(hit[-1]) + 1] if hit.numel() else [0, mask.shape[axis]])
    return bbox


def ct_normalize_(data: torch.Tensor, properties: dict) -> torch.Tensor:
    """nnU-Net's CTNormalization in place on a float32 tensor: clip to the 0.5/99.5 percentiles, z-score."""
    data.clamp_(properties["percentile_00_5"], properties["percentile_99_5"])
    return data.sub_(properties["mean"]).div_(max(properties["std"], 1e-8))


def _on_device_ok(model: Model) -> bool:
    return all(s == "CTNormalization" for s in model.configuration.normalization_schemes)


def preprocess(image: np.ndarray, spacing_zyx: list[float], model: Model, device: torch.device) -> Preprocessed:
    """Turn an image array (z, y, x) with its spacing into the network's input, as nnU-Net's DefaultPreprocessor."""
    pm, cm = model.plans_manager, model.configuration
    spacing = [spacing_zyx[i] for i in pm.transpose_forward]
    if _on_device_ok(model):
        # the raw array crosses to the device once, in its own dtype; everything after runs there, on a copy
        # (normalising in place must never reach the caller's array, which a CPU float32 tensor would share)
        data = torch.from_numpy(np.ascontiguousarray(image)).to(device)[None].to(torch.float32, copy=True)
        data = data.permute(0, *[i + 1 for i in pm.transpose_forward])
        shape_before = tuple(data.shape[1:])
        bbox = nonzero_bbox(data)
        data = data[(slice(None), *(slice(a, b) for a, b in bbox))].contiguous()
        props = pm.foreground_intensity_properties_per_channel
        for c in range(data.shape[0]):
            ct_normalize_(data[c], props[str(c)])
    else:
        arr = image[None].astype(np.float32, copy=True)
        arr = arr.transpose([0, *[i + 1 for i in pm.transpose_forward]])
        shape_before = tuple(arr.shape[1:])
        arr, seg, bbox = crop_to_nonzero(arr)
        arr = DefaultPreprocessor(verbose=False)._normalize(arr, seg, cm, pm.foreground_intensity_properties_per_channel)
        data = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
    shape_after_crop = tuple(data.shape[1:])
    target = list(cm.spacing)
    if len(target) < len(shape_after_crop):
        target = [spacing[0], *target]
    new_shape = compute_new_shape(shape_after_crop, spacing, target)
    data = resample(cm.resampling_fn_data, data, new_shape, spacing, target, device)
    # on a GPU the networks' input is fp16 (model.input_dtype): half the bytes, the same answer (precision.py)
    return Preprocessed(data.to(model.input_dtype).contiguous(), shape_before, [list(map(int, b)) for b in bbox],
                        shape_after_crop, spacing, target)
