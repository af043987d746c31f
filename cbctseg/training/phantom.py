"""Deterministic synthetic CBCT-like phantoms with all 42 ToothFairy2 structures at their FDI values.

Anatomy lives in coordinates normalised to the field of view (each axis 0..1), so a phantom of any
size shows the same head. Array axes are (z, y, x): z runs inferior -> superior, y anterior ->
posterior, x from the patient's right to their left (x > 0.5 is left), as in an LPS volume with an
identity direction. Mirroring along z or y keeps left and right; mirroring along x swaps them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

# Hounsfield-like intensities per structure family.
AIR, SOFT, BONE, CANAL, TOOTH, CROWN, BRIDGE, IMPLANT = -1000.0, 40.0, 1400.0, 150.0, 2600.0, 3900.0, 3600.0, 5000.0


@dataclass
class PhantomSpec:
    """What to generate. Geometry follows SimpleITK: spacing, origin and direction in (x, y, z)."""

    shape: Sequence[int] = (64, 96, 96)  # (z, y, x) voxels
    spacing: Sequence[float] = (1.0, 1.0, 1.0)
    origin: Sequence[float] = (0.0, 0.0, 0.0)
    direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    seed: int = 0
    noise: float = 40.0  # standard deviation, HU
    jitter: float = 1.0  # 0 gives the canonical head, 1 the usual per-seed variation
    pixel_type: int = field(default=sitk.sitkInt16)


def _grid(shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z, y, x = (np.linspace(0.5 / n, 1 - 0.5 / n, n, dtype=np.float32) for n in shape)
    return z[:, None, None], y[None, :, None], x[None, None, :]


def _box(shape: Sequence[int], lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, ...]:
    """Index slices covering the normalised box [lo, hi] (clipped to the volume)."""
    return tuple(
        slice(max(0, int(math.floor(l * n)) - 1), min(n, int(math.ceil(h * n)) + 1)) for l, h, n in zip(lo, hi, shape)
    )


def _paint_ellipsoid(lab: np.ndarray, value: int, c: Sequence[float], r: Sequence[float], overwrite=True) -> None:
    sl = _box(lab.shape, [ci - ri for ci, ri in zip(c, r)], [ci + ri for ci, ri in zip(c, r)])
    z, y, x = _grid(lab.shape)
    z, y, x = z[sl[0]], y[:, sl[1]], x[:, :, sl[2]]
    m = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1.0
    view = lab[sl]
    if not overwrite:
        m &= view == 0
    view[m] = value


def make_phantom_arrays(spec: PhantomSpec) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 HU, labels uint8 FDI) arrays of shape spec.shape."""
    rng = np.random.default_rng(spec.seed)
    shape = tuple(int(s) for s in spec.shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"phantom shape must be 3-D with at least 8 voxels per axis, got {shape}")
    j = float(spec.jitter)

    def jit(scale: float) -> float:
        return float(rng.uniform(-scale, scale) * j)

    z, y, x = _grid(shape)
    lab = np.zeros(shape, dtype=np.uint8)
    body = ((z - 0.5) / 0.62) ** 2 + ((y - 0.5 + jit(0.02)) / (0.46 + jit(0.02))) ** 2 + (
        (x - 0.5) / (0.44 + jit(0.02))
    ) ** 2 <= 1.0

    # Dental arch: the front half of an ellipse in the (y, x) plane; theta = 0 at the front midline,
    # theta > 0 towards the patient's left.
    yc, xc = 0.62 + jit(0.02), 0.5 + jit(0.01)
    ry, rx = 0.40 + jit(0.02), 0.29 + jit(0.02)
    r_arch = np.sqrt(((y - yc) / ry) ** 2 + ((x - xc) / rx) ** 2)
    theta = np.arctan2(x - xc, yc - y)
    front = np.abs(theta) <= math.pi / 2 * 0.98
    band = lambda w: (np.abs(r_arch - 1.0) <= w) & front  # noqa: E731

    zl, zu = 0.30 + jit(0.015), 0.62 + jit(0.015)  # jaw centres
    lower_jaw = band(0.16) & (np.abs(z - zl) <= 0.09)
    upper_jaw = band(0.16) & (np.abs(z - zu) <= 0.07)
    lab[lower_jaw] = 1
    lab[upper_jaw] = 2
    # Inferior alveolar canals: tubes inside the back of the lower jaw.
    canal = band(0.045) & (np.abs(z - (zl - 0.03)) <= 0.025) & (np.abs(theta) >= 0.55)
    lab[canal & (theta > 0)] = 3
    lab[canal & (theta < 0)] = 4
    # Maxillary sinuses above the upper jaw, pharynx behind the arch.
    for value, side in ((5, 1), (6, -1)):
        _paint_ellipsoid(lab, value, (0.80 + jit(0.02), 0.45 + jit(0.02), 0.5 + side * (0.17 + jit(0.015))),
                         (0.09, 0.12, 0.09))
    ph = ((y - (0.86 + jit(0.01))) / 0.05) ** 2 + ((x - 0.5) / 0.07) ** 2 <= 1.0
    lab[ph & (z >= 0.08) & (z <= 0.92) & (lab == 0)] = 7

    # Teeth: 8 per quadrant along the arch, crowns above the lower jaw and below the upper jaw.
    def arch_point(t: float) -> tuple[float, float]:
        return yc - ry * math.cos(t), xc + rx * math.sin(t)

    tooth_z = {"upper": zu - 0.12, "lower": zl + 0.13}
    quadrants = {11: ("upper", -1), 21: ("upper", 1), 31: ("lower", 1), 41: ("lower", -1)}
    tooth_centres: dict[int, tuple[float, float, float]] = {}
    for first, (jaw, side) in quadrants.items():
        for k in range(8):
            t = side * (k + 0.5) / 8 * (math.pi / 2) * 0.93
            cy, cx = arch_point(t)
            size = 0.022 + 0.004 * k  # molars are bigger than incisors
            c = (tooth_z[jaw] + jit(0.008), cy, cx)
            tooth_centres[first + k] = c
            _paint_ellipsoid(lab, first + k, c, (0.06, size * 1.3, size * 1.3))
    # Restorations: a crown capping tooth 36, an implant in the lower jaw under tooth 46 (the tooth is
    # shortened above it), and a bridge bar on the cheek side between teeth 15 and 16.
    c36 = tooth_centres[36]
    _paint_ellipsoid(lab, 9, (c36[0] + 0.05, c36[1], c36[2]), (0.025, 0.045, 0.045))
    c46 = tooth_centres[46]
    _paint_ellipsoid(lab, 10, (zl - 0.01, c46[1], c46[2]), (0.06, 0.022, 0.022))
    a, b = tooth_centres[15], tooth_centres[16]
    mid = tuple((p + q) / 2 for p, q in zip(a, b))
    _paint_ellipsoid(lab, 8, (mid[0] - 0.05, mid[1], mid[2] - 0.045), (0.02, 0.05, 0.02))

    intensity = np.full(256, SOFT, dtype=np.float32)
    intensity[[1, 2]] = BONE
    intensity[[3, 4]] = CANAL
    intensity[[5, 6, 7]] = AIR + 50
    intensity[8], intensity[9], intensity[10] = BRIDGE, CROWN, IMPLANT
    intensity[11:49] = TOOTH
    img = intensity[lab]
    img[~body & (lab == 0)] = AIR
    img += float(rng.normal(0, 60)) * j * (lab == 1)  # per-case bone density
    img = gaussian_filter(img, 0.7)
    if spec.noise > 0:
        img += rng.normal(0, spec.noise, size=shape).astype(np.float32)
    np.clip(img, -1000, 5264, out=img)
    return img.astype(np.float32), lab


def make_phantom(spec: PhantomSpec) -> tuple[sitk.Image, sitk.Image]:
    """(CBCT image, FDI label map) as SimpleITK images with spec's geometry."""
    img, lab = make_phantom_arrays(spec)
    image = sitk.GetImageFromArray(img)
    image = sitk.Cast(image, spec.pixel_type) if spec.pixel_type != sitk.sitkFloat32 else image
    label = sitk.GetImageFromArray(lab)
    for im in (image, label):
        im.SetSpacing([float(s) for s in spec.spacing])
        im.SetOrigin([float(o) for o in spec.origin])
        im.SetDirection([float(d) for d in spec.direction])
    return image, label


def write_raw_dataset(out_dir: Path, n_cases: int, shape: Sequence[int] = (64, 96, 96), seed: int = 0,
                      spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> list[str]:
    """A raw ToothFairy2-style folder: imagesTr/<case>_0000.mha and labelsTr/<case>.mha (FDI values)."""
    out_dir = Path(out_dir)
    (out_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n_cases):
        name = f"ToothFairy2F_{i + 1:03d}"
        image, label = make_phantom(PhantomSpec(shape=shape, spacing=spacing, seed=seed + i))
        sitk.WriteImage(image, str(out_dir / "imagesTr" / f"{name}_0000.mha"), useCompression=True)
        sitk.WriteImage(label, str(out_dir / "labelsTr" / f"{name}.mha"), useCompression=True)
        names.append(name)
    return names
