"""Post-processing on the device: per-class volume cutoffs, then contiguous labels -> FDI values."""
from __future__ import annotations

import torch

from cbctseg.resources import LabelMap


def to_fdi(labels: torch.Tensor, label_map: LabelMap, cutoffs: dict[int, int] | None = None
           ) -> tuple[torch.Tensor, dict[int, int]]:
    """Map contiguous labels to FDI values, removing each class whose volume (voxels) is below its cutoff.

    `cutoffs` is keyed by FDI value. Returns the FDI label map and {FDI value: voxels removed}.
    """
    lut = torch.as_tensor(label_map.to_fdi_lut(), device=labels.device)
    removed: dict[int, int] = {}
    if cutoffs:
        counts = torch.bincount(labels.reshape(-1).long(), minlength=len(lut)).cpu().tolist()
        for label, fdi in zip(label_map.labels, label_map.fdi):
            if 0 < counts[label] < cutoffs.get(fdi, 0):
                lut[label] = 0
                removed[fdi] = counts[label]
    return lut[labels.long()], removed
