"""Work order for one case: windows x models x mirror flips, ordered so that every prefix is a complete answer.

A *pass* is one (model, flip) pair run over every window. Passes without mirroring come first, one per
model, then the mirrored passes; with a per-voxel weight sum beside the logit sum, stopping after any
number of windows still gives a correct weighted average of what was done.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window


@dataclass(frozen=True)
class Pass:
    """One network (index into the model's folds) with the spatial axes to flip (empty: none)."""

    model: int
    flip: tuple[int, ...]


def flip_combinations(mirror_axes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """No flip, then every non-empty combination of the allowed axes, in nnU-Net's order."""
    axes = sorted(mirror_axes)
    return [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


def anytime_passes(n_models: int, mirror_axes: tuple[int, ...], use_mirroring: bool = True) -> list[Pass]:
    """Every model unmirrored first, then each flip for every model."""
    flips = flip_combinations(mirror_axes) if use_mirroring else [()]
    return [Pass(m, f) for f in flips for m in range(n_models)]


def sliding_windows(image_shape: tuple[int, ...], patch: tuple[int, ...], step: float) -> list[tuple[slice, ...]]:
    """nnU-Net's window positions (evenly spaced, `ceil((size - patch) / (patch * step)) + 1` per axis)."""
    steps = compute_steps_for_sliding_window(image_shape, patch, step)
    return [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in itertools.product(*steps)]


class Budget:
    """A deadline on the clock, with the time the work after prediction (finalize, writing) still needs."""

    def __init__(self, deadline: float | None, reserve_s: float = 0.0):
        self.deadline = deadline  # time.monotonic() value, None for no limit
        self.reserve_s = reserve_s

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic() - self.reserve_s

    def allows(self, seconds: float) -> bool:
        """Whether work projected to take `seconds` still ends before the deadline."""
        return seconds <= self.left()
