"""PNG pictures of a label map over its CT: axial, coronal and sagittal slices, one fixed colour per structure.

Layout (pixels, fixed so that tests and reports can rely on it): a title band of TITLE_PX on top, then one
row of three PANEL_PX x PANEL_PX panels per label map (prediction, then ground truth below it when given)
after a ROW_LABEL_PX margin, and a LEGEND_PX column on the right listing the structures present in either
label map. See `png_size`. Arrays are (z, y, x) with z inferior -> superior; coronal and sagittal panels
are drawn with superior up, the axial one with anterior up and the patient's right on the left.
Pixel aspect is one voxel per pixel side (spacing is ignored).
"""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from cbctseg.resources import label_map

DPI = 100
PANEL_PX, ROW_LABEL_PX, LEGEND_PX, TITLE_PX = 400, 30, 570, 40
FILL_ALPHA = 0.45  # label fill blended over the CT; outlines use the exact colour


def _palette() -> dict[int, tuple[int, int, int]]:
    colours = {
        1: (222, 184, 135), 2: (190, 140, 95), 3: (255, 215, 0), 4: (255, 140, 0), 5: (0, 191, 255),
        6: (30, 100, 255), 7: (160, 100, 255), 8: (255, 0, 255), 9: (0, 255, 190), 10: (255, 40, 40),
    }
    # Teeth: one hue family per quadrant, from bright incisors to darker molars.
    for quadrant, hue in ((1, 0.95), (2, 0.30), (3, 0.58), (4, 0.12)):
        for k in range(8):
            r, g, b = colorsys.hsv_to_rgb((hue + 0.012 * k) % 1.0, 0.55 + 0.05 * k, 1.0 - 0.06 * k)
            colours[quadrant * 10 + k + 1] = (round(r * 255), round(g * 255), round(b * 255))
    assert len(set(colours.values())) == len(colours), "palette colours must be distinct"
    assert all(len(set(c)) > 1 for c in colours.values()), "no grey palette colours (the CT is grey)"
    return colours


COLOURS: dict[int, tuple[int, int, int]] = _palette()
_LUT = np.zeros((256, 3), dtype=np.uint8)
_KNOWN = np.zeros(256, dtype=bool)
for _v, _c in COLOURS.items():
    _LUT[_v], _KNOWN[_v] = _c, True


def png_size(with_truth: bool) -> tuple[int, int]:
    """(width, height) in pixels of the PNG written by render_case."""
    rows = 2 if with_truth else 1
    return ROW_LABEL_PX + 3 * PANEL_PX + LEGEND_PX, TITLE_PX + rows * PANEL_PX


def _labels_u8(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == np.uint8:
        return a
    return np.where(np.isin(a, list(COLOURS)), a, 0).astype(np.uint8)


def _centre(labels: np.ndarray) -> tuple[int, ...]:
    """Centre of mass of the labelled voxels (the volume centre when there are none)."""
    m = labels > 0
    total = int(np.count_nonzero(m))
    if total == 0:
        return tuple(n // 2 for n in labels.shape)
    centre = []
    for axis, n in enumerate(labels.shape):
        counts = m.sum(axis=tuple(i for i in range(3) if i != axis))
        centre.append(min(n - 1, int(round(float(np.dot(counts, np.arange(n))) / total))))
    return tuple(centre)


def _slices(vol: np.ndarray, c: tuple[int, ...]) -> list[np.ndarray]:
    """Axial (y, x), coronal (z, x) and sagittal (z, y) slices, superior up."""
    return [vol[c[0]], vol[:, c[1], :][::-1], vol[:, :, c[2]][::-1]]


def _composite(grey: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """RGB uint8: CT grey, label fill blended, label outlines in the exact palette colour."""
    rgb = np.repeat(grey[..., None], 3, axis=2)
    lab = np.where(_KNOWN[lab], lab, 0)
    inside = lab > 0
    colour = _LUT[lab].astype(np.float32)
    blend = np.round((1 - FILL_ALPHA) * rgb + FILL_ALPHA * colour).astype(np.uint8)
    rgb[inside] = blend[inside]
    edge = np.zeros(lab.shape, dtype=bool)
    edge[0, :] = edge[-1, :] = True
    edge[:, 0] = edge[:, -1] = True
    diff_y, diff_x = lab[1:, :] != lab[:-1, :], lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= diff_y
    edge[:-1, :] |= diff_y
    edge[:, 1:] |= diff_x
    edge[:, :-1] |= diff_x
    edge &= inside
    rgb[edge] = _LUT[lab[edge]]
    return rgb


def render_case(image: np.ndarray, labels: np.ndarray, out_png: Path, truth: np.ndarray | None = None,
                title: str = "", window: tuple[float, float] | None = None) -> Path:
    """Write one PNG of `labels` (FDI values) over `image`, with `truth` in a second row when given.

    Slices pass through the centre of mass of the labelled region of `truth` (else `labels`). The CT is
    shown in `window` (low, high), by default the 1st to 99th percentile of the shown slices.
    """
    image = np.asarray(image)
    labels = _labels_u8(labels)
    rows = [("prediction", labels)]
    if truth is not None:
        truth = _labels_u8(truth)
        if truth.shape != labels.shape:
            raise ValueError(f"truth shape {truth.shape} != labels shape {labels.shape}")
        rows.append(("ground truth", truth))
    if image.shape != labels.shape or labels.ndim != 3:
        raise ValueError(f"image shape {image.shape} and labels shape {labels.shape} must be the same 3-D shape")
    centre = _centre(truth if truth is not None else labels)
    img_slices = [s.astype(np.float32) for s in _slices(image, centre)]
    if window is None:
        shown = np.concatenate([s.ravel() for s in img_slices])
        window = (float(np.percentile(shown, 1)), float(np.percentile(shown, 99)))
    lo, hi = window
    greys = [np.round(np.clip((s - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8) for s in img_slices]

    width, height = png_size(truth is not None)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    names = ("axial z", "coronal y", "sagittal x")
    pad, head = 4, 22  # panel margin and per-panel title band, pixels
    for r, (row_name, lab) in enumerate(rows):
        bottom = height - TITLE_PX - (r + 1) * PANEL_PX
        fig.text(ROW_LABEL_PX / 2 / width, (bottom + PANEL_PX / 2) / height, row_name, rotation=90,
                 ha="center", va="center", fontsize=11)
        for i, (grey, lab_slice) in enumerate(zip(greys, _slices(lab, centre))):
            left = ROW_LABEL_PX + i * PANEL_PX
            ax = fig.add_axes(((left + pad) / width, (bottom + pad) / height,
                               (PANEL_PX - 2 * pad) / width, (PANEL_PX - 2 * pad - head) / height))
            ax.imshow(_composite(grey, lab_slice), interpolation="nearest", resample=False, aspect="equal")
            ax.set_title(f"{names[i]}={centre[i]}", fontsize=9)
            ax.set_axis_off()
    present = sorted(set(np.flatnonzero(np.bincount(labels.ravel(), minlength=256))) |
                     (set(np.flatnonzero(np.bincount(truth.ravel(), minlength=256))) if truth is not None else set()))
    lm = label_map()
    handles = [Patch(facecolor=np.array(COLOURS[v]) / 255, edgecolor="none", antialiased=False,
                     label=f"{v} {lm.name_of_fdi(v).replace(' (Wisdom Tooth)', '')}")
               for v in present if v in COLOURS]
    if handles:
        x0 = (ROW_LABEL_PX + 3 * PANEL_PX + 8) / width
        fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(x0, 1 - TITLE_PX / height), ncol=2,
                   fontsize=7, frameon=False, handlelength=2.2, handleheight=1.4, columnspacing=0.8)
    if title:
        fig.text(0.5, 1 - TITLE_PX / 2 / height, title, ha="center", va="center", fontsize=12)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=DPI, facecolor="white")
    return out_png
