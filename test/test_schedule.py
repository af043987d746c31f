"""Work order and window placement."""
from __future__ import annotations

import math

import pytest

from cbctseg.inference.schedule import Pass, anytime_passes, flip_combinations, sliding_windows


def test_flips_never_include_the_lateral_axis_unless_allowed():
    assert flip_combinations((0, 1)) == [(), (0,), (1,), (0, 1)]
    assert all(2 not in f for f in flip_combinations((0, 1)))


def test_anytime_order_runs_every_model_unmirrored_first():
    passes = anytime_passes(2, (0, 1))
    assert passes[:2] == [Pass(0, ()), Pass(1, ())]
    assert len(passes) == 8 and len(set(passes)) == 8
    assert anytime_passes(2, (0, 1), use_mirroring=False) == [Pass(0, ()), Pass(1, ())]


@pytest.mark.parametrize("shape, n", [((169, 347, 371), 8), ((298, 512, 512), 27), ((160, 320, 320), 1)])
def test_window_counts_match_nnunet_formula(shape, n):
    patch = (160, 320, 320)
    w = sliding_windows(shape, patch, 0.5)
    assert len(w) == n == math.prod(math.ceil((s - p) / (p * 0.5)) + 1 for s, p in zip(shape, patch))
    covered = [set() for _ in shape]
    for win in w:
        for d, sl in enumerate(win):
            assert sl.stop - sl.start == patch[d] and 0 <= sl.start and sl.stop <= shape[d]
            covered[d].update(range(sl.start, sl.stop))
    assert all(len(c) == s for c, s in zip(covered, shape))
