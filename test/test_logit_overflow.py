"""Logit sums that cannot overflow where nnU-Net's do not, and a clear failure where logits are not finite.

The model folders here are the bundled weights with every fold's segmentation layer changed so that its
logits are `factor * logits + offset`: every pass's argmax (and softmax, for the offset) is unchanged.

A factor alone does not break a sum of all passes: the winning class overflows first, and +inf still wins
the argmax. A common offset does: the lowest class, background, then overflows too where windows overlap
most, and the argmax of ties of +inf is class 0. The bundled model's sums of all 8 (fold, flip) passes reach
about 4800 in one plain fp16 sum; with logits 40 * logits + 1500 every class's sum overflows there, and
about a fifth of the foreground of the test case turns to background. nnU-Net sums each fold's windows over
the flips' mean: at most about 55000 on the test case, within fp16 (65504), and so must ours. (The factor
keeps the classes' margins large beside the offset, so fp16 rounding decides few voxels.)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cbctseg.model.loading import CHECKPOINT, load_model
from cbctseg.model.manifest import build_manifest, write_manifest
from cbctseg.resources import label_map
from cbctseg.inference.stitching import Accumulator, NonFiniteLogits, Normaliser
from conftest import OBLIQUE, WEIGHTS, process_in_background, run_process, write_phantom

OVERFLOW_FACTOR, OVERFLOW_OFFSET = 40.0, 1500.0
OUT = "images/oral-pharyngeal-segmentation"


def logit_model_folder(dst: Path, factor: float = 1.0, offset: float = 0.0, src: Path = WEIGHTS) -> Path:
    """A model folder at dst: src's model with each fold's logits `factor * logits + offset` (its segmentation
    layers' weights times factor, biases times factor plus offset)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    for fold in sorted(src.glob(f"fold_*/{CHECKPOINT}")):
        ckpt = torch.load(fold, map_location="cpu", weights_only=False)
        weights = ckpt["network_weights"]
        layers = [k for k in weights if k.startswith("decoder.seg_layers.")]
        assert layers, f"{fold}: no segmentation layer"
        for k in layers:
            weights[k] = weights[k] * factor + (offset if k.endswith(".bias") else 0.0)
        (dst / fold.parent.name).mkdir()
        torch.save(ckpt, dst / fold.parent.name / CHECKPOINT)
    write_manifest(dst, build_manifest(dst, ["0", "1"]))  # a model of its own, sealed as the engine requires
    return dst


def nnunet_labels(image: sitk.Image, folder: Path, folds: tuple[int, ...]) -> np.ndarray:
    """nnUNetPredictor's label map (FDI values) for an image with these folds, mirroring, step 0.5 (as test_oracle)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=folds)
    arr = sitk.GetArrayFromImage(image).astype(np.float32)[None]
    # nnU-Net raises on an inf in its own fp16 sums: a reference that returns did not overflow
    seg = predictor.predict_single_npy_array(arr, {"spacing": list(image.GetSpacing())[::-1]})
    return label_map().to_fdi_lut()[seg]


class Sums:
    """One model's passes added to our sums (normalised), to plain fp16 sums as nnU-Net's (optional) and to
    exact fp64 sums (optional: the offset model's exact average follows from the plain one's)."""

    def __init__(self, model, shape, gaussian, windows, passes: int, with_plain: bool, with_exact: bool):
        self.acc = Accumulator(model.num_classes, shape, torch.device("cpu"),
                               normaliser=Normaliser(gaussian, windows, passes))
        self.plain = Accumulator(model.num_classes, shape, torch.device("cpu")) if with_plain else None
        self.num = torch.zeros((model.num_classes, *shape), dtype=torch.float64) if with_exact else None
        self.den = torch.zeros(shape, dtype=torch.float64) if with_exact else None

    def add(self, window, y, gaussian, flip) -> None:
        self.acc.add(window, y, gaussian, flip)
        if self.plain is not None:
            self.plain.add(window, y, gaussian, flip)
        if self.num is not None:
            dims = [a + 1 for a in flip]
            self.num[(slice(None), *window)] += (torch.flip(y, dims) if dims else y) * gaussian
            self.den[window] += gaussian

    @property
    def exact(self) -> torch.Tensor:
        return self.num / self.den


@pytest.fixture(scope="module")
def all_passes(tmp_path_factory):
    """Every pass of every window of the bundled model on the test case, summed for its own logits and for the
    offset model's (`OVERFLOW_FACTOR * logits + OVERFLOW_OFFSET`, what its changed segmentation layer outputs,
    up to fp32 rounding): {"plain": Sums (with exact sums), "offset": Sums (with plain fp16 sums)}. One sweep of
    the network serves both."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    from cbctseg.io import gc_io
    from cbctseg.networks import lean_forward
    from cbctseg.inference.preprocess import preprocess
    from cbctseg.inference.schedule import anytime_passes, sliding_windows

    cpu = torch.device("cpu")
    tmp_path = tmp_path_factory.mktemp("passes")
    model = load_model(WEIGHTS, device=cpu)
    write_phantom(tmp_path / "case.mha", shape=(46, 83, 101), origin=(-12.5, 30.0, 7.25), direction=OBLIQUE, seed=11)
    vol = gc_io.read_volume(tmp_path / "case.mha")
    data = pad_nd_image(preprocess(vol.array, vol.nnunet_properties["spacing"], model, cpu).data, model.patch_size)
    shape = tuple(data.shape[1:])
    gaussian = compute_gaussian(model.patch_size, 1.0 / 8, 10, device=cpu)
    passes = anytime_passes(len(model.networks), model.mirror_axes)
    assert len(passes) == 8
    windows = sliding_windows(shape, model.patch_size, 0.5)
    sums = {"plain": Sums(model, shape, gaussian, windows, len(passes), with_plain=False, with_exact=True),
            "offset": Sums(model, shape, gaussian, windows, len(passes), with_plain=True, with_exact=False)}
    networks = [lean_forward.lean(net) for net in model.networks]  # as the engine runs them
    with torch.inference_mode():
        for window in windows:
            for p in passes:
                dims = [a + 2 for a in p.flip]
                x = data[(slice(None), *window)][None]
                y = networks[p.fold](torch.flip(x, dims) if dims else x)[0]
                sums["plain"].add(window, y, gaussian, p.flip)
                sums["offset"].add(window, y * OVERFLOW_FACTOR + OVERFLOW_OFFSET, gaussian, p.flip)
    return sums


def test_normalised_sums_hold_logits_that_overflow_a_plain_fp16_sum(all_passes):
    """Unnormalised, the offset model's passes overflow fp16; normalised, they give the passes' exact weighted
    average at every voxel, the image's corners included."""
    s = all_passes["offset"]
    with pytest.raises(NonFiniteLogits, match="logits are not finite"):
        s.plain.average()
    avg = s.acc.average().double()
    # a weighted average of the offset logits is the offset of the plain logits' weighted average
    exact = all_passes["plain"].exact * OVERFLOW_FACTOR + OVERFLOW_OFFSET
    # fp16 sums (the same tolerance as test_budget's partial ensemble)
    torch.testing.assert_close(avg, exact, rtol=1e-2, atol=0.05)
    assert float((avg.argmax(0) == exact.argmax(0)).double().mean()) >= 0.999


def test_voxels_covered_only_by_window_rims_get_the_exact_answer(all_passes):
    """Along the image's edges and in its corners the windows' Gaussian weights are 1e-5 to 1e-8 (subnormal
    fp16): plain fp16 sums there keep a few bits, the normalised ones fp16's full precision. Every voxel whose
    exact top-two logit margin is at least 0.01 gets the exact answer's class."""
    s = all_passes["plain"]
    avg, exact, den = s.acc.average().double(), s.exact, s.den
    rims = den < 1e-3
    top2 = exact.topk(2, dim=0).values
    decided = rims & (top2[0] - top2[1] >= 0.01)
    assert int(decided.sum()) >= 1000  # the case has such voxels, along its 12 edges and in its 8 corners
    assert torch.equal(avg.argmax(0)[decided], exact.argmax(0)[decided])
    torch.testing.assert_close(avg[:, rims], exact[:, rims], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("spacing, accumulation", [((1.0, 1.0, 1.35), "device"), ((1.0, 1.0, 1.0), "streamed")])
def test_logits_too_large_for_one_fp16_sum_give_nnunets_answer(tmp_path, weights, spacing, accumulation):
    # the oracle's case: an oblique direction, a size no multiple of the patch; anisotropic spacing resamples
    # (the whole volume's sums), isotropic spacing does not (streamed bands, the ToothFairy2 case). One fold:
    # nnU-Net's sums of its windows over the flips' mean stay as large as with two, a plain sum of the 4 flips'
    # passes is 4 times larger and overflows
    model = logit_model_folder(tmp_path / "model", OVERFLOW_FACTOR, OVERFLOW_OFFSET)
    image, _ = write_phantom(tmp_path / "in" / "case.mha", shape=(46, 83, 101), spacing=spacing,
                             origin=(-12.5, 30.0, 7.25), direction=OBLIQUE, seed=11)
    # nnU-Net's answer is computed while process.py runs
    with process_in_background("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--weights",
                               str(model), "--device", "cpu", "--folds", "0", "--report",
                               str(tmp_path / "report.json")) as result:
        ref = nnunet_labels(image, model, folds=(0,))
        r = result()
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "report.json").read_text())[0]
    assert report["prediction"]["accumulation"] == accumulation and not report["prediction"]["skipped"]
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / OUT / "case.mha")))
    agreement = float((ours == ref).mean())
    structures = sorted(int(v) for v in np.unique(ref) if v)
    print(f"logits * {OVERFLOW_FACTOR} + {OVERFLOW_OFFSET}, {accumulation}: agreement with nnUNetPredictor "
          f"{agreement:.6f}, structures {structures}, foreground {float((ref > 0).mean()):.4f}")
    assert agreement >= 0.999
    assert len(structures) >= 2 and float((ref > 0).mean()) >= 0.01


@pytest.mark.parametrize("factor, spacing", [(float("nan"), (1.0, 1.0, 1.0)), (1e4, (1.0, 1.0, 1.35))],
                         ids=["nan-weights-streamed", "overflow-resampled"])
def test_non_finite_logits_fail_the_case_clearly(tmp_path, weights, factor, spacing):
    model = logit_model_folder(tmp_path / "model", factor)
    write_phantom(tmp_path / "in" / "case.mha", shape=(40, 64, 64), spacing=spacing, seed=5)
    r = run_process("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--weights", str(model),
                    "--device", "cpu", "--no-mirroring", "--folds", "0")
    assert r.returncode == 1, r.stderr
    assert "logits are not finite" in r.stderr and "Traceback" not in r.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results) == 1 and not results[0]["outputs"]
    assert "logits are not finite" in results[0]["error_messages"][0]
    assert not list((tmp_path / "out").rglob("*.mha"))
