"""Work order for one case: windows x models x mirror flips, ordered so that every prefix is a complete answer.

A *pass* is one (model, flip) pair run over every window. Passes without mirroring come first, one per
model, then the mirrored passes; with a per-voxel weight sum beside the logit sum, stopping after any
number of windows still gives a correct weighted average of what was done.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable

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


@dataclass(frozen=True)
class WorkItem:
    """One forward pass: a network, a flip and a window. Mandatory items give every voxel an answer."""

    model: int
    flip: tuple[int, ...]
    window: tuple[slice, ...]
    mandatory: bool


def plan_work(n_models: int, mirror_axes: tuple[int, ...], use_mirroring: bool, windows: list[tuple[slice, ...]],
              slab_major: bool = False) -> list[WorkItem]:
    """All work items in order. Mandatory: the first model, unmirrored, on every window.

    Pass-major (default): pass after pass over all windows, so any prefix is a complete answer. Slab-major
    (for streamed accumulation): all passes of one slab of windows (same first-axis start) before the next,
    so finished slices can be freed; there the budget keeps the mandatory items of later slabs.
    """
    passes = anytime_passes(n_models, mirror_axes, use_mirroring)
    if not slab_major:
        return [WorkItem(p.model, p.flip, w, i == 0) for i, p in enumerate(passes) for w in windows]
    slabs: dict[int, list[tuple[slice, ...]]] = {}
    for w in windows:
        slabs.setdefault(w[0].start, []).append(w)
    return [WorkItem(p.model, p.flip, w, i == 0) for z in sorted(slabs) for i, p in enumerate(passes)
            for w in slabs[z]]


def sliding_windows(image_shape: tuple[int, ...], patch: tuple[int, ...], step: float) -> list[tuple[slice, ...]]:
    """nnU-Net's window positions (evenly spaced, `ceil((size - patch) / (patch * step)) + 1` per axis)."""
    steps = compute_steps_for_sliding_window(image_shape, patch, step)
    return [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in itertools.product(*steps)]


class Budget:
    """A deadline on a clock, less the time the work after the sliding window (finalize, writing) needs."""

    def __init__(self, deadline: float | None, reserve_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.deadline = deadline  # a clock() value; None: no limit
        self.reserve_s = reserve_s
        self.clock = clock

    def left(self) -> float:
        """Seconds left for the sliding window."""
        return float("inf") if self.deadline is None else self.deadline - self.clock() - self.reserve_s

    def allows(self, seconds: float) -> bool:
        """Whether work projected to take `seconds` still ends in time."""
        return seconds <= self.left()
