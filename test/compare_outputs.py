#!/usr/bin/env python3
"""Compare an algorithm's /output with the expected output (used by test.sh and the image tests).

For every expected label map (EXPECTED/images/oral-pharyngeal-segmentation/*.mha, any .mha under
EXPECTED in fact): the output at the same relative path exists, has the same size, spacing, origin and
direction, is a scalar uint8 image, holds only ToothFairy2 FDI values, and reaches a Dice of at least
--min-dice for every structure present in the expected file. grand-challenge reads only the output
interface (the label map); OUTPUT/results.json is legacy (evalutils 0.4's SegmentationAlgorithm wrote it,
the platform and the official evaluation ignore it), so it is not required, but when present it must be a
list that names each output file and carries no error messages. Exit 0 when all holds, 1 otherwise. Needs
SimpleITK and numpy.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

# FDI values of the ToothFairy2 evaluation: background, 10 structures, 4 quadrants of 8 teeth.
ALLOWED = sorted({*range(0, 11), *(q * 10 + t for q in (1, 2, 3, 4) for t in range(1, 9))})
# Geometry written from the input's own header: equal up to float formatting in the .mha text header.
GEOMETRY_TOLERANCE = 1e-5


def _geometry_problems(out: sitk.Image, exp: sitk.Image) -> list[str]:
    problems = []
    if out.GetSize() != exp.GetSize():
        problems.append(f"size {out.GetSize()} != expected {exp.GetSize()}")
    for what in ("Spacing", "Origin", "Direction"):
        a, b = getattr(out, f"Get{what}")(), getattr(exp, f"Get{what}")()
        if not np.allclose(a, b, rtol=GEOMETRY_TOLERANCE, atol=GEOMETRY_TOLERANCE):
            problems.append(f"{what.lower()} {tuple(round(v, 6) for v in a)} != expected "
                            f"{tuple(round(v, 6) for v in b)}")
    return problems


def _dice(out: np.ndarray, exp: np.ndarray, label: int) -> float:
    a, b = out == label, exp == label
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(a & b) / total


def compare_case(out_path: Path, exp_path: Path, min_dice: float) -> list[str]:
    """Problems with one output label map (empty when it passes); prints a summary line."""
    if not out_path.is_file():
        return [f"{out_path}: missing"]
    try:
        out = sitk.ReadImage(str(out_path))
    except RuntimeError as e:
        return [f"{out_path}: unreadable ({str(e).strip().splitlines()[-1]})"]
    exp = sitk.ReadImage(str(exp_path))
    problems = _geometry_problems(out, exp)
    if out.GetPixelID() != sitk.sitkUInt8:
        problems.append(f"pixel type {out.GetPixelIDTypeAsString()}, expected 8-bit unsigned integer")
    if out.GetNumberOfComponentsPerPixel() != 1:
        problems.append(f"{out.GetNumberOfComponentsPerPixel()} components per voxel, expected 1")
    if problems:  # no voxel comparison on a different grid
        return [f"{out_path.name}: {p}" for p in problems]

    out_a, exp_a = sitk.GetArrayViewFromImage(out), sitk.GetArrayViewFromImage(exp)
    allowed = np.zeros(256, dtype=bool)
    allowed[ALLOWED] = True
    bad = ~allowed[out_a]
    if bad.any():
        problems.append(f"values outside the FDI label set: {sorted(np.unique(out_a[bad]).tolist())}")

    expected_labels = [v for v in ALLOWED[1:] if np.any(exp_a == v)]
    dices = {v: _dice(out_a, exp_a, v) for v in expected_labels}
    low = {v: round(d, 4) for v, d in dices.items() if d < min_dice}
    if low:
        problems.append(f"Dice below {min_dice} ({{label: Dice}}): {low}")
    extra = [v for v in ALLOWED[1:] if v not in dices and np.any(out_a == v)]
    worst = min(dices.values(), default=1.0)
    note = f", labels not in the expected file: {extra}" if extra else ""
    print(f"{'FAIL' if problems else 'ok'}   {out_path.name}: {len(dices)} structures, "
          f"lowest Dice {worst:.4f}{note}")
    return [f"{out_path.name}: {p}" for p in problems]


def check_results_json(output: Path, names: list[str]) -> list[str]:
    """Problems with OUTPUT/results.json when there is one (it is legacy: none is no problem)."""
    path = output / "results.json"
    if not path.exists():
        print(f"note: no {path} (legacy, not read by grand-challenge)")
        return []
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return [f"{path}: not JSON ({e})"]
    if not isinstance(results, list):
        return [f"{path}: expected a list of cases, got {type(results).__name__}"]
    problems, listed = [], set()
    for case in results:
        if not isinstance(case, dict):
            problems.append(f"{path}: entry {case!r} is not an object")
            continue
        listed |= {Path(o.get("filename", "")).name for o in case.get("outputs", []) if isinstance(o, dict)}
        if case.get("error_messages"):
            problems.append(f"{path}: error messages {case['error_messages']}")
    problems += [f"{path}: does not list output {n}" for n in names if n not in listed]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="the algorithm's output root (/output)")
    parser.add_argument("--expected", type=Path, required=True, help="expected output root")
    parser.add_argument("--min-dice", type=float, default=0.9, help="lowest Dice per expected structure")
    args = parser.parse_args(argv)

    expected = sorted(args.expected.rglob("*.mha"))
    if not expected:
        print(f"FAIL: no expected .mha files under {args.expected}", file=sys.stderr)
        return 1
    problems = []
    for exp_path in expected:
        problems += compare_case(args.output / exp_path.relative_to(args.expected), exp_path, args.min_dice)
    problems += check_results_json(args.output, [p.name for p in expected])
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    print(f"{len(expected)} case(s): {'FAILED, ' + str(len(problems)) + ' problem(s)' if problems else 'passed'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
