"""Work order for one case: windows x folds x mirror flips, ordered so that every prefix is a complete answer.

The words, one meaning each:
- a *window* is one patch-sized box of the padded image (`sliding_windows`);
- a *pass* is one fold's network with one flip, run over every window (`Pass`);
- a *work item* is one window of one pass: one forward of one network (`WorkItem`); a *batch* is several
  consecutive work items of the same pass, run as one forward call.

Passes without mirroring come first, one per fold, then the mirrored passes; with a per-voxel weight sum beside
the logit sum, stopping after any number of work items still gives a correct weighted average of what was done.
`plan_case` is the one place a case's windows and work items are planned.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable

from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window


@dataclass(frozen=True)
class Pass:
    """One fold's network (index into the model's folds) with the spatial axes to flip (empty: none)."""

    fold: int
    flip: tuple[int, ...]


def flip_combinations(mirror_axes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """No flip, then every non-empty combination of the allowed axes, in nnU-Net's order."""
    axes = sorted(mirror_axes)
    return [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


def anytime_passes(n_folds: int, mirror_axes: tuple[int, ...], use_mirroring: bool = True) -> list[Pass]:
    """Every fold unmirrored first, then each flip for every fold."""
    flips = flip_combinations(mirror_axes) if use_mirroring else [()]
    return [Pass(m, f) for f in flips for m in range(n_folds)]


@dataclass(frozen=True)
class WorkItem:
    """One window of one pass: a fold's network, a flip and a window. Mandatory items give every voxel an answer."""

    fold: int
    flip: tuple[int, ...]
    window: tuple[slice, ...]
    mandatory: bool

    def same_pass(self, other: "WorkItem") -> bool:
        """Whether both belong to one pass (so one forward call can run them together)."""
        return self.fold == other.fold and self.flip == other.flip


def plan_work(n_folds: int, mirror_axes: tuple[int, ...], use_mirroring: bool, windows: list[tuple[slice, ...]],
              slab_major: bool = False) -> list[WorkItem]:
    """All work items in order. Mandatory: the first model, unmirrored, on every window.

    Pass-major (default): pass after pass over all windows, so any prefix is a complete answer. Slab-major
    (for streamed accumulation): all passes of one slab of windows (same first-axis start) before the next,
    so finished slices can be freed; there the budget keeps the mandatory items of later slabs.
    """
    passes = anytime_passes(n_folds, mirror_axes, use_mirroring)
    if not slab_major:
        return [WorkItem(p.fold, p.flip, w, i == 0) for i, p in enumerate(passes) for w in windows]
    slabs: dict[int, list[tuple[slice, ...]]] = {}
    for w in windows:
        slabs.setdefault(w[0].start, []).append(w)
    return [WorkItem(p.fold, p.flip, w, i == 0) for z in sorted(slabs) for i, p in enumerate(passes)
            for w in slabs[z]]


def sliding_windows(image_shape: tuple[int, ...], patch: tuple[int, ...], step: float) -> list[tuple[slice, ...]]:
    """nnU-Net's window positions (evenly spaced, `ceil((size - patch) / (patch * step)) + 1` per axis)."""
    steps = compute_steps_for_sliding_window(image_shape, patch, step)
    return [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in itertools.product(*steps)]


def padded_shape(shape: tuple[int, ...], patch: tuple[int, ...]) -> tuple[int, ...]:
    """The image's shape once padded to at least one patch (what nnU-Net's pad_nd_image gives)."""
    return tuple(max(int(s), int(p)) for s, p in zip(shape, patch))


@dataclass(frozen=True)
class CasePlan:
    """A case's windows (in padded-image coordinates) and its work items in the order they run."""

    windows: list[tuple[slice, ...]]
    items: list[WorkItem]

    @property
    def passes(self) -> int:
        return len(self.items) // len(self.windows)


def plan_case(shape: tuple[int, ...], patch: tuple[int, ...], step: float, n_folds: int,
              mirror_axes: tuple[int, ...], use_mirroring: bool, slab_major: bool = False) -> CasePlan:
    """The windows and work items of a case whose network input has spatial `shape`."""
    windows = sliding_windows(padded_shape(shape, patch), patch, step)
    return CasePlan(windows, plan_work(n_folds, mirror_axes, use_mirroring, windows, slab_major))


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
