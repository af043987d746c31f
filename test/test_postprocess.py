"""Cutoffs and the contiguous -> FDI mapping."""
from __future__ import annotations

import numpy as np
import torch

from cbctseg.inference.postprocess import to_fdi
from cbctseg.resources import label_map


def test_every_contiguous_label_maps_to_its_fdi_value():
    lm = label_map()
    labels = torch.arange(0, 43, dtype=torch.uint8)
    fdi, removed = to_fdi(labels, lm)
    assert fdi.tolist() == [0, *range(1, 19), *range(21, 29), *range(31, 39), *range(41, 49)]
    assert removed == {}


def test_lut_round_trip_with_conversion_direction():
    lm = label_map()
    to_c = lm.to_contiguous_lut()
    assert all(to_c[f] == c for c, f in zip(lm.labels, lm.fdi))
    assert to_c[19] == -1 and to_c[49] == -1


def test_classes_below_their_cutoff_are_removed_others_kept():
    labels = torch.zeros((10, 10, 10), dtype=torch.uint8)
    labels[0, 0, :3] = 19  # FDI 21, 3 voxels
    labels[1, :, :] = 1  # FDI 1, 100 voxels
    labels[2, 0, :5] = 35  # FDI 41, 5 voxels
    fdi, removed = to_fdi(labels, label_map(), {21: 4, 1: 50, 41: 5})
    values = set(np.unique(fdi.numpy()).tolist())
    assert values == {0, 1, 41}
    assert removed == {21: 3}
