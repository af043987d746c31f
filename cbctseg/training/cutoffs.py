"""Per-class volume cutoffs found the way the ToothFairy2 winner did, from cross-validation predictions.

Removing a class whose whole predicted volume is below a cutoff turns a spurious structure (Dice 0,
HD95 = the volume's diagonal, about 535 voxels) into a correct empty one, at the price of losing small
true ones. For each class: the smallest cutoff that maximises the mean Dice over the cases, the
smallest that minimises the mean HD95, and the smaller of the two.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from cbctseg.resources import RESOURCES_DIR, label_map

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassOutcome:
    """One class in one case: predicted volume and the metrics when kept or when removed."""

    volume: int
    dice_kept: float
    hd95_kept: float
    dice_removed: float
    hd95_removed: float


def best_cutoff(outcomes: list[ClassOutcome]) -> int:
    """The smaller of the Dice-optimal and the HD95-optimal cutoff (voxels; 0 removes nothing)."""
    candidates = sorted({0, *(o.volume + 1 for o in outcomes if o.volume > 0)})
    dice, hd = [], []
    for t in candidates:
        removed = [o.volume < t for o in outcomes]
        dice.append(np.mean([o.dice_removed if r else o.dice_kept for o, r in zip(outcomes, removed)]))
        hd.append(np.mean([o.hd95_removed if r else o.hd95_kept for o, r in zip(outcomes, removed)]))
    t_dice = candidates[int(np.argmax(np.round(dice, 9)))]  # argmax/argmin: the first, i.e. smallest, optimum
    t_hd = candidates[int(np.argmin(np.round(hd, 6)))]
    return min(t_dice, t_hd)


def class_outcomes(pred: np.ndarray, truth: np.ndarray, fdi: int) -> ClassOutcome:
    """Metrics of one class kept and removed, as the challenge scores them (HD95 in voxels)."""
    from cbctseg.evaluation.evaluate import dice, hd95

    p, t = pred == fdi, truth == fdi
    empty = np.zeros_like(p)
    return ClassOutcome(int(p.sum()), dice(p, t), hd95(p, t), dice(empty, t), hd95(empty, t))


def _read_fdi(path: Path, contiguous: bool) -> np.ndarray:
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return label_map().to_fdi_lut()[arr] if contiguous else arr


def find_cutoffs(pred_dirs: list[Path], truth_dir: Path, pred_contiguous: bool = True,
                 truth_contiguous: bool = False) -> tuple[dict[int, int], int]:
    """Cutoffs (FDI value -> voxels) from predictions (e.g. nnU-Net's fold_X/validation folders) and truth."""
    pairs = []
    for d in pred_dirs:
        for p in sorted(Path(d).glob("*.mha")):
            t = Path(truth_dir) / p.name
            if not t.is_file():
                raise FileNotFoundError(f"no ground truth {t} for prediction {p}")
            pairs.append((p, t))
    if not pairs:
        raise FileNotFoundError(f"no .mha predictions in {', '.join(map(str, pred_dirs))}")
    lm = label_map()
    outcomes: dict[int, list[ClassOutcome]] = {f: [] for f in lm.fdi}
    for p, t in tqdm(pairs, desc="cutoffs", unit="case"):
        pred, truth = _read_fdi(p, pred_contiguous), _read_fdi(t, truth_contiguous)
        if pred.shape != truth.shape:
            raise ValueError(f"{p.name}: prediction {pred.shape} and truth {truth.shape} differ in size")
        for f in lm.fdi:
            outcomes[f].append(class_outcomes(pred, truth, f))
    return {f: best_cutoff(o) for f, o in outcomes.items()}, len(pairs)


def write_cutoffs(cutoffs: dict[int, int], n_cases: int, out: Path | None = None) -> Path:
    """resources/cutoffs.json (atomically), where inference reads it."""
    out = Path(out or RESOURCES_DIR / "cutoffs.json")
    doc = json.loads(out.read_text()) if out.is_file() else {}
    doc["cutoffs"] = {str(k): int(v) for k, v in sorted(cutoffs.items()) if v > 0}
    doc["source"] = f"cross-validation predictions of {n_cases} cases"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out)
    return out
