"""Finalize: the label map on the input grid from the averaged logits (resample back, argmax, un-crop, un-transpose).

Runs on the device by slices or by chunks of channels (`stitching.CHUNK_BYTES`), so no full-size float32
copy of the logits and no int64 index of the volume is made.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from cbctseg.model.loading import Model
from cbctseg.inference.preprocess import Preprocessed, resample
from cbctseg.inference.stitching import CHUNK_BYTES, _slices_per_chunk


def resampled_chunks(logits: torch.Tensor, pre: Preprocessed, model: Model, device: torch.device,
                     channels_per_chunk: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(first channel, chunk) of the logits (C, *model grid) resampled back to the cropped input grid with the
    model's own function, a chunk of channels at a time on `device` (CHUNK_BYTES of fp32 copies by default):
    resampling treats channels independently, so the chunks are the whole result's."""
    target_shape = tuple(pre.shape_after_cropping)
    if channels_per_chunk is None:
        # resampling makes a float32 copy of its input and its float32 result, per channel
        per_channel = (int(np.prod(logits.shape[1:])) + int(np.prod(target_shape))) * 4
        channels_per_chunk = max(1, CHUNK_BYTES // per_channel)
    for c0 in range(0, logits.shape[0], channels_per_chunk):
        chunk = logits[c0:c0 + channels_per_chunk].to(device)
        res = resample(model.configuration.resampling_fn_probabilities, chunk, target_shape, pre.target_spacing,
                       pre.spacing_transposed, device)
        del chunk
        yield c0, res
        del res


@torch.inference_mode()
def finalize(logits: torch.Tensor, pre: Preprocessed, model: Model, device: torch.device,
             is_labels: bool = False, channels_per_chunk: int | None = None) -> torch.Tensor:
    """Label map (uint8, contiguous labels) on the input grid: resample logits back, argmax, un-crop, un-transpose.

    The argmax goes by slices; resampling by chunks of channels (CHUNK_BYTES of fp32 copies) with a running
    maximum, so neither the float32 copy nnU-Net makes of all 43 channels nor an int64 index of the volume
    ever exists; the result is the same because resampling treats channels independently.
    """
    pm = model.plans_manager
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
        best_val = labels = None
        for c0, res in resampled_chunks(logits, pre, model, device, channels_per_chunk):
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
