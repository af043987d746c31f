"""cbctseg.evaluation.pictures: fixed size, fixed colour per structure, only present structures shown."""
from __future__ import annotations

import numpy as np
from PIL import Image

from cbctseg.training.phantom import PhantomSpec, make_phantom_arrays
from cbctseg.evaluation.pictures import COLOURS, LEGEND_PX, png_size, render_case
from cbctseg.resources import label_map


def _colours(path, region=None) -> set[tuple[int, int, int]]:
    a = np.asarray(Image.open(path).convert("RGB"))
    if region is not None:
        a = a[region]
    return set(map(tuple, np.unique(a.reshape(-1, 3), axis=0).tolist()))


def test_palette_is_fixed_distinct_and_covers_all_structures():
    assert set(COLOURS) == set(label_map().fdi)
    assert len(set(COLOURS.values())) == 42
    assert COLOURS[1] == (222, 184, 135)


def test_png_size_and_colours_of_present_structures_only(tmp_path):
    image, truth = make_phantom_arrays(PhantomSpec(shape=(40, 64, 64), seed=4))
    pred = truth.copy()
    pred[pred == 27] = 0
    pred[pred == 5] = 0

    out = render_case(image, pred, tmp_path / "pred.png", title="prediction only")
    with Image.open(out) as im:
        assert im.size == png_size(False) == (1800, 440)
    seen = _colours(out)
    for v, c in COLOURS.items():
        assert (c in seen) == (v not in (5, 27)), v
    # the slice panels themselves carry exact colours (outlines), not only the legend
    panels = _colours(out, (slice(None), slice(0, png_size(False)[0] - LEGEND_PX)))
    assert COLOURS[7] in panels and COLOURS[1] in panels

    both = render_case(image, pred, tmp_path / "both.png", truth=truth, title="with truth")
    with Image.open(both) as im:
        assert im.size == png_size(True) == (1800, 840)
    seen = _colours(both)
    assert all(c in seen for c in COLOURS.values())  # the truth row and legend show 5 and 27


def test_empty_labels_render_without_legend(tmp_path):
    image = np.zeros((20, 30, 40), np.float32)
    out = render_case(image, np.zeros((20, 30, 40), np.uint8), tmp_path / "empty.png")
    assert not (_colours(out) & set(COLOURS.values()))
