"""Bad input: a clear message naming the file, an error entry in results.json, no output file, the rest still run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cbctseg.io import gc_io
from cbctseg.model.manifest import build_manifest, write_manifest
from conftest import run_process, write_phantom

OUT_DIR = "images/oral-pharyngeal-segmentation"


def _img(arr: np.ndarray, vector: bool = False) -> sitk.Image:
    return sitk.GetImageFromArray(arr, isVector=vector)


def make_bad_inputs(folder: Path) -> dict[str, str]:
    """Write one file per kind of bad input; returns {file name: a phrase its error message must contain}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    (folder / "garbage.mha").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (folder / "text.mha").write_text("this is not an image\n")
    good = folder / "truncated.mha"
    sitk.WriteImage(_img(rng.normal(0, 100, (32, 40, 40)).astype(np.int16)), str(good))
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    sitk.WriteImage(_img(np.zeros((64, 64), np.int16)), str(folder / "two_d.mha"))
    sitk.WriteImage(_img(np.zeros((3, 16, 16, 16), np.int16)), str(folder / "four_d.mha"))
    sitk.WriteImage(_img(np.zeros((16, 16, 16, 3), np.float32), vector=True), str(folder / "rgb.mha"))
    nan = np.zeros((16, 16, 16), np.float32)
    nan[3, 4, 5] = np.nan
    sitk.WriteImage(_img(nan), str(folder / "nan.mha"))
    inf = np.zeros((16, 16, 16), np.float64)
    inf[1, 1, 1] = np.inf
    sitk.WriteImage(_img(inf), str(folder / "inf.mha"))
    sitk.WriteImage(_img(np.zeros((2, 64, 64), np.int16)), str(folder / "too_thin.mha"))
    return {"garbage.mha": "not a readable image", "text.mha": "not a readable image",
            "truncated.mha": "truncated", "two_d.mha": "2-D", "four_d.mha": "4-D", "rgb.mha": "3 components",
            "nan.mha": "non-finite", "inf.mha": "non-finite", "too_thin.mha": "size"}


def test_read_volume_refuses_each_kind_of_bad_input(tmp_path):
    expected = make_bad_inputs(tmp_path)
    for name, phrase in expected.items():
        with pytest.raises(gc_io.InputError) as e:
            gc_io.read_volume(tmp_path / name)
        assert name in str(e.value) and phrase in str(e.value), (name, str(e.value))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.uint32, np.float32, np.float64])
def test_read_volume_accepts_integer_and_float_types(tmp_path, dtype):
    arr = (np.arange(16 * 16 * 16).reshape(16, 16, 16) % 100).astype(dtype)
    img = _img(arr)
    img.SetSpacing((0.3, 0.4, 0.5))
    sitk.WriteImage(img, str(tmp_path / "x.mha"))
    vol = gc_io.read_volume(tmp_path / "x.mha")
    assert vol.array.dtype == np.float32 and vol.array.shape == (16, 16, 16)
    np.testing.assert_array_equal(vol.array, arr.astype(np.float32))
    assert vol.spacing == pytest.approx((0.3, 0.4, 0.5))


def test_bad_cases_get_error_entries_and_no_output_while_good_ones_run(tmp_path, weights):
    inp = tmp_path / "input" / "images" / "cbct"
    expected = make_bad_inputs(inp)
    write_phantom(inp / "good_uint16.mha", shape=(40, 64, 64), seed=3, pixel_type=sitk.sitkUInt16)
    write_phantom(inp / "good_float64.mha", shape=(40, 64, 64), seed=4, pixel_type=sitk.sitkFloat64)
    out = tmp_path / "output"
    r = run_process("--input", str(tmp_path / "input"), "--output", str(out), "--folds", "0", "--no-mirroring")
    assert r.returncode == 0, r.stderr
    results = {e["inputs"][0]["filename"]: e for e in json.loads((out / "results.json").read_text())}
    assert len(results) == len(expected) + 2
    for name, phrase in expected.items():
        entry = results[name]
        assert entry["outputs"] == [] and len(entry["error_messages"]) == 1
        assert name in entry["error_messages"][0] and phrase in entry["error_messages"][0]
        assert name in r.stderr
        assert not (out / OUT_DIR / name).exists()
    for name in ("good_uint16.mha", "good_float64.mha"):
        assert results[name]["error_messages"] == []
        assert results[name]["outputs"] == [{"type": "metaio_image", "filename": name}]
        assert (out / OUT_DIR / name).is_file()
    # nothing but the finished label maps in the folder grand-challenge reads
    assert sorted(p.name for p in (out / OUT_DIR).iterdir()) == ["good_float64.mha", "good_uint16.mha"]


def test_nothing_processed_exits_non_zero_with_a_message(tmp_path, weights):
    inp = tmp_path / "in"
    make_bad_inputs(inp)
    r = run_process("--input", str(inp), "--output", str(tmp_path / "out"))
    assert r.returncode != 0
    assert "no case was segmented" in r.stderr
    assert not list((tmp_path / "out").rglob("*.mha"))


@pytest.mark.parametrize("setup, phrase", [
    ("empty", "no .mha input found"),
    ("missing", "does not exist"),
])
def test_empty_or_missing_input_exits_non_zero(tmp_path, setup, phrase):
    inp = tmp_path / "in"
    if setup == "empty":
        inp.mkdir()
    r = run_process("--input", str(inp), "--output", str(tmp_path / "out"))
    assert r.returncode != 0 and phrase in r.stderr, r.stderr
    # results.json still says why: one entry with the message, no case
    [entry] = json.loads((tmp_path / "out" / "results.json").read_text())
    assert entry["inputs"] == entry["outputs"] == [] and phrase in entry["error_messages"][0]


def test_missing_or_inconsistent_weights_exit_non_zero(tmp_path, weights):
    import shutil

    inp = tmp_path / "in"
    write_phantom(inp / "a.mha", shape=(32, 48, 48))
    r = run_process("--input", str(inp), "--output", str(tmp_path / "o1"), "--weights", str(tmp_path / "nowhere"))
    assert r.returncode != 0 and "does not exist" in r.stderr

    # a damaged checkpoint whose manifest was written over it (checksums cannot help): torch's error, named
    broken = tmp_path / "broken"
    shutil.copytree(weights, broken)
    (broken / "fold_1" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    write_manifest(broken, build_manifest(broken, ["0", "1"]))
    r = run_process("--input", str(inp), "--output", str(tmp_path / "o2"), "--weights", str(broken))
    assert r.returncode != 0 and "fold_1" in r.stderr and "cannot be loaded" in r.stderr

    other = tmp_path / "other"
    shutil.copytree(weights, other)
    plans = json.loads((other / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres_torchres_tiny"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [8, 16, 32, 48]
    (other / "plans.json").write_text(json.dumps(plans))
    write_manifest(other, build_manifest(other, ["0", "1"]))
    r = run_process("--input", str(inp), "--output", str(tmp_path / "o3"), "--weights", str(other))
    assert r.returncode != 0 and "do not fit" in r.stderr, r.stderr
    for o in ("o1", "o2", "o3"):
        assert not list((tmp_path / o).rglob("*.mha"))
