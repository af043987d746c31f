"""Task configuration kept as data in `resources/`: labels, cutoffs, interface."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

RESOURCES_DIR = Path(os.environ.get("CBCTSEG_RESOURCES", Path(__file__).resolve().parent.parent / "resources"))


def _load(name: str, resources_dir: Path | None = None) -> dict:
    path = Path(resources_dir or RESOURCES_DIR) / name
    with open(path) as f:
        return json.load(f)


@dataclass(frozen=True)
class LabelMap:
    """Contiguous nnU-Net labels (0..N) <-> FDI values, with structure names."""

    labels: tuple[int, ...]
    fdi: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """Classes including background."""
        return len(self.labels) + 1

    def to_fdi_lut(self) -> np.ndarray:
        """uint8 lookup table: contiguous label -> FDI value (index with the label map)."""
        lut = np.zeros(max(self.labels) + 1, dtype=np.uint8)
        lut[list(self.labels)] = self.fdi
        return lut

    def to_contiguous_lut(self) -> np.ndarray:
        """Lookup table FDI value -> contiguous label; unknown values map to -1."""
        lut = np.full(256, -1, dtype=np.int16)
        lut[0] = 0
        lut[list(self.fdi)] = self.labels
        return lut

    def name_of_fdi(self, value: int) -> str:
        return self.names[self.fdi.index(value)]


@lru_cache(maxsize=4)
def label_map(resources_dir: Path | None = None) -> LabelMap:
    """The structures of `resources/labels.json`."""
    s = _load("labels.json", resources_dir)["structures"]
    labels = tuple(int(d["label"]) for d in s)
    if labels != tuple(range(1, len(labels) + 1)):
        raise ValueError("resources/labels.json: contiguous labels must be 1..N in order")
    return LabelMap(labels, tuple(int(d["fdi"]) for d in s), tuple(d["name"] for d in s))


def cutoffs(resources_dir: Path | None = None) -> dict[int, int]:
    """Per-class volume cutoffs in voxels, keyed by FDI value (missing classes: no cutoff)."""
    return {int(k): int(v) for k, v in _load("cutoffs.json", resources_dir).get("cutoffs", {}).items()}


def task(resources_dir: Path | None = None) -> dict:
    """The grand-challenge interface: input slugs and folders, output folder, time limit."""
    return _load("task.json", resources_dir)
