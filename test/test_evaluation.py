"""cbctseg.evaluation.evaluate against medpy (the ToothFairy2 evaluation container's own metric code)."""
from __future__ import annotations

import argparse
import csv
import json
import re

import numpy as np
import pytest
import SimpleITK as sitk
from medpy.metric import binary  # test-only dependency: the reference implementation
from scipy.ndimage import binary_erosion, gaussian_filter

from cbctseg.evaluation.evaluate import (EvaluationError, add_arguments, evaluate_case, evaluate_folder, format_table, hd95,
                                run_from_args, write_reports)
from cbctseg.training.phantom import PhantomSpec, make_phantom_arrays
from cbctseg.resources import label_map

SHAPE = (40, 64, 64)


def reference(pred: np.ndarray, truth: np.ndarray) -> dict[int, tuple[float, float]]:
    """(dice, hd95) per FDI value, as ToothFairy2/evaluation/evaluation.py computes them with medpy."""
    out = {}
    for v in label_map().fdi:
        p, t = pred == v, truth == v
        d = 1.0 if p.sum() + t.sum() == 0 else binary.dc(p, t)
        if not p.any() and not t.any():
            h = 0.0
        elif not p.any() or not t.any():
            h = np.linalg.norm(p.shape)
        else:
            h = binary.hd95(p, t)
        out[v] = (d, h)
    return out


def perturb(truth: np.ndarray, seed: int) -> np.ndarray:
    """A plausible bad prediction: shifted, eroded, deleted, spurious and border-touching structures."""
    rng = np.random.default_rng(seed)
    pred = truth.copy()
    fdi = list(label_map().fdi)
    rng.shuffle(fdi)
    for v in fdi[:6]:  # shifted by 1-3 voxels
        m = truth == v
        pred[m] = 0
        pred[np.roll(m, int(rng.integers(1, 4)), axis=int(rng.integers(0, 3))) & (pred == 0)] = v
    for v in fdi[6:10]:  # eroded
        m = truth == v
        pred[m & ~binary_erosion(m)] = 0
    for v in fdi[10:13]:  # deleted
        pred[pred == v] = 0
    pred[0:3, 0:4, 0:5] = fdi[13]  # spurious blob in a corner, on the volume border
    pred[-2:, 30:34, -3:] = fdi[14]
    return pred


@pytest.mark.parametrize("seed", [0, 5])
def test_matches_medpy_bit_for_bit_on_perturbed_phantoms(seed):
    _, truth = make_phantom_arrays(PhantomSpec(shape=SHAPE, seed=seed))
    truth = truth.copy()
    truth[-3:, 0:6, 10:14] = 1  # a truth structure on the volume border too
    pred = perturb(truth, seed)
    got = evaluate_case(pred, truth)
    ref = reference(pred, truth)
    for v, (d, h) in ref.items():
        assert got["structures"][v]["dice"] == d, v
        assert got["structures"][v]["hd95"] == h, v
    assert got["mean_dice"] == sum(d for d, _ in ref.values()) / 42
    assert got["mean_hd95"] == sum(h for _, h in ref.values()) / 42
    assert 0.3 < got["mean_dice"] < 1 and got["mean_hd95"] > 0
    # counts (used for missed/spurious) follow the masks
    v = label_map().fdi[0]
    assert got["structures"][v]["truth_voxels"] == int((truth == v).sum())


def test_random_blobs_touching_the_border_match_medpy():
    rng = np.random.default_rng(1)
    for _ in range(6):
        a = gaussian_filter(rng.normal(size=(18, 22, 26)), 2) > 0.05
        b = gaussian_filter(rng.normal(size=(18, 22, 26)), 2) > 0.05
        assert a.any() and b.any() and a[0].any()
        assert hd95(a, b) == binary.hd95(a, b)
        assert hd95(b, a) == binary.hd95(b, a)


def test_empty_structures_follow_the_toothfairy2_conventions():
    _, truth = make_phantom_arrays(PhantomSpec(shape=SHAPE, seed=2))
    empty = np.zeros(SHAPE, dtype=np.uint8)
    diag = float(np.linalg.norm(SHAPE))

    both = evaluate_case(empty, empty)
    assert all(s["dice"] == 1.0 and s["hd95"] == 0.0 for s in both["structures"].values())
    assert both["mean_dice"] == 1.0 and both["mean_hd95"] == 0.0

    for pred, gt in ((empty, truth), (truth, empty)):
        r = evaluate_case(pred, gt)
        assert all(s["dice"] == 0.0 and s["hd95"] == diag for s in r["structures"].values())
        assert r["mean_hd95"] == pytest.approx(diag)
        ref = reference(pred, gt)
        assert all(r["structures"][v]["hd95"] == h and r["structures"][v]["dice"] == d for v, (d, h) in ref.items())

    assert hd95(np.zeros((4, 5, 6), bool), np.zeros((4, 5, 6), bool)) == 0.0
    one = np.zeros((4, 5, 6), bool)
    one[1, 2, 3] = True
    assert hd95(one, np.zeros_like(one)) == float(np.linalg.norm((4, 5, 6)))


def test_non_fdi_values_are_ignored_and_counted():
    _, truth = make_phantom_arrays(PhantomSpec(shape=SHAPE, seed=3))
    pred = truth.astype(np.int16)
    pred[0, 0, :7] = 19  # 19 is no FDI value
    r = evaluate_case(pred, truth)
    assert r["other_voxels"] == 7
    assert r["mean_dice"] == 1.0


def test_size_mismatch_is_a_clear_error():
    with pytest.raises(EvaluationError, match=r"prediction shape \(40, 64, 64\) != truth shape \(40, 64, 65\)"):
        evaluate_case(np.zeros(SHAPE, np.uint8), np.zeros((40, 64, 65), np.uint8))


def test_a_prediction_off_the_truth_grid_fails_that_case_only(tmp_path, capsys):
    """One bad prediction (other size, other spacing, unreadable) is scored as empty and flagged; the rest score."""
    _, truth = make_phantom_arrays(PhantomSpec(shape=(16, 24, 24), seed=4))
    for name in ("good", "small", "moved", "broken"):
        _write(truth, tmp_path / "truth" / f"{name}.mha")
    _write(truth, tmp_path / "pred" / "good.mha")
    _write(truth[:, :, :-1], tmp_path / "pred" / "small.mha")
    moved = sitk.GetImageFromArray(truth)
    moved.SetSpacing((0.3, 0.3, 0.6))
    sitk.WriteImage(moved, str(tmp_path / "pred" / "moved.mha"))
    (tmp_path / "pred" / "broken.mha").write_bytes(b"ObjectType = Image\nNDims = 3\n")

    result = evaluate_folder(tmp_path / "pred", tmp_path / "truth")
    cases = result["cases"]
    assert cases["good"]["status"] == "ok" and cases["good"]["mean_dice"] == 1.0
    assert cases["small"]["status"] == "invalid"
    assert re.search(r"pred/small\.mha: size \(23, 24, 16\) != truth size \(24, 24, 16\)", cases["small"]["error"])
    assert cases["moved"]["status"] == "invalid" and "spacing" in cases["moved"]["error"]
    assert cases["broken"]["status"] == "invalid" and "unreadable" in cases["broken"]["error"]
    empty = evaluate_case(np.zeros_like(truth), truth)
    assert all(cases[n]["mean_dice"] == empty["mean_dice"] for n in ("small", "moved", "broken"))
    assert result["aggregates"]["invalid_predictions"] == ["broken", "moved", "small"]

    args = _parse(["--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"), "--out", str(tmp_path / "o")])
    assert run_from_args(args) == 1  # scored and reported, but not a clean run
    captured = capsys.readouterr()
    assert "error: moved: " in captured.err and "invalid predictions (scored empty): broken, moved, small" in captured.out
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["cases"]["small"]["status"] == "invalid"


def test_predictions_named_after_the_images_pair_with_their_truth(tmp_path):
    """nnU-Net-style names: imagesTr/X_0000.mha -> prediction X_0000.mha, truth labelsTr/X.mha."""
    _, truth = make_phantom_arrays(PhantomSpec(shape=(16, 24, 24), seed=5))
    for name in ("a", "b"):
        _write(truth, tmp_path / "labelsTr" / f"{name}.mha")
        _write(truth, tmp_path / "pred" / f"{name}_0000.mha")
    _write(truth, tmp_path / "pred" / "c_0000.mha")  # no truth c: listed, ignored
    result = evaluate_folder(tmp_path / "pred", tmp_path / "labelsTr")
    assert {n: c["status"] for n, c in result["cases"].items()} == {"a": "ok", "b": "ok"}
    assert result["cases"]["a"]["pred_file"].endswith("a_0000.mha") and result["cases"]["a"]["mean_dice"] == 1.0
    assert result["unmatched_predictions"] == ["c_0000"]


def test_no_prediction_matching_any_truth_is_an_error(tmp_path, capsys):
    _, truth = make_phantom_arrays(PhantomSpec(shape=(16, 24, 24), seed=6))
    _write(truth, tmp_path / "labelsTr" / "a.mha")
    _write(truth, tmp_path / "pred" / "other.mha")
    with pytest.raises(EvaluationError, match=r"none of the 1 predictions .* matches a truth file"):
        evaluate_folder(tmp_path / "pred", tmp_path / "labelsTr")
    assert run_from_args(_parse(["--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "labelsTr")])) == 2
    assert "none of the 1 predictions" in capsys.readouterr().err


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def _write(array: np.ndarray, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((0.3, 0.3, 0.3))
    sitk.WriteImage(img, str(path), useCompression=True)


def test_folder_reports_and_cli(tmp_path, capsys):
    truths, preds = {}, {}
    for i, name in enumerate(("case_a", "case_b", "case_c")):
        image, truth = make_phantom_arrays(PhantomSpec(shape=(32, 48, 48), seed=10 + i))
        truths[name] = truth
        _write(truth, tmp_path / "labelsTr" / f"{name}.mha")
        _write(image.astype(np.int16), tmp_path / "imagesTr" / f"{name}_0000.mha")
    preds["case_a"] = truths["case_a"]
    preds["case_b"] = perturb(truths["case_b"], 1)
    for name, pred in preds.items():
        _write(pred, tmp_path / "pred" / f"{name}.mha")
    _write(truths["case_a"], tmp_path / "pred" / "stray.mha")  # no truth: listed, ignored

    result = evaluate_folder(tmp_path / "pred", tmp_path / "labelsTr")
    cases = result["cases"]
    assert list(cases) == ["case_a", "case_b", "case_c"]
    assert result["unmatched_predictions"] == ["stray"]
    assert cases["case_a"]["mean_dice"] == 1.0 and cases["case_a"]["mean_hd95"] == 0.0
    assert cases["case_c"]["status"] == "missing"
    assert cases["case_c"] == {**evaluate_case(np.zeros_like(truths["case_c"]), truths["case_c"]),
                               "status": "missing", "pred_file": "", "truth_file": cases["case_c"]["truth_file"]}
    expected_b = reference(preds["case_b"], truths["case_b"])
    agg = result["aggregates"]
    assert agg["cases"] == 3 and agg["missing_predictions"] == ["case_c"]
    assert agg["mean_dice"] == pytest.approx(np.mean([c["mean_dice"] for c in cases.values()]))
    for v in label_map().fdi:  # case_c misses everything; case_b whatever perturb() deleted
        missed = 1 + int(not (preds["case_b"] == v).any() and (truths["case_b"] == v).any())
        assert agg["structures"][v]["missed"] == missed and agg["structures"][v]["truth_cases"] == 3

    csv_path, json_path = write_reports(result, tmp_path / "out")
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 42
    for row in rows:
        if row["case"] == "case_b":
            d, h = expected_b[int(row["fdi"])]
            assert float(row["dice"]) == d and float(row["hd95"]) == h
        assert row["name"] == label_map().name_of_fdi(int(row["fdi"]))
    assert {r["status"] for r in rows if r["case"] == "case_c"} == {"missing"}
    data = json.loads(json_path.read_text())
    assert data["aggregates"]["mean_hd95"] == pytest.approx(agg["mean_hd95"])
    assert data["cases"]["case_b"]["structures"]["1"]["dice"] == expected_b[1][0]

    table = format_table(result)
    assert "Lower Jawbone" in table and "mean over 3 cases" in table and "case_c" in table

    # the CLI glue: workers, reports and pictures (CT found in imagesTr beside labelsTr)
    out = tmp_path / "cli"
    args = _parse(["--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "labelsTr"), "--out", str(out),
                   "--pictures", "--workers", "2"])
    assert run_from_args(args) == 0
    assert "mean over 3 cases" in capsys.readouterr().out
    assert (out / "metrics.csv").is_file() and (out / "metrics.json").is_file()
    assert sorted(p.name for p in (out / "pictures").glob("*.png")) == ["case_a.png", "case_b.png", "case_c.png"]
    cli = json.loads((out / "metrics.json").read_text())
    assert cli["aggregates"] == data["aggregates"]


def test_bad_folders_give_exit_code_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_from_args(_parse(["--pred", str(tmp_path / "nope"), "--truth", str(tmp_path / "empty")])) == 2
    assert "prediction folder" in capsys.readouterr().err
    assert run_from_args(_parse(["--pred", str(tmp_path / "empty"), "--truth", str(tmp_path / "empty")])) == 2
    assert "no *.mha files in the truth folder" in capsys.readouterr().err
