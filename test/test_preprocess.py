"""Our preprocessing (torch, on the device) against nnU-Net's DefaultPreprocessor on the same image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

from cbctseg.inference import preprocess as P
from cbctseg.model.loading import load_model
from cbctseg.training.phantom import PhantomSpec, make_phantom_arrays
from conftest import WEIGHTS


@pytest.fixture(scope="module")
def model():
    return load_model(WEIGHTS, ["0"])


def _nnunet(image: np.ndarray, spacing_zyx: list[float], model) -> tuple[np.ndarray, dict]:
    pre = DefaultPreprocessor(verbose=False)
    data, _, props = pre.run_case_npy(image[None].copy(), None, {"spacing": list(spacing_zyx)}, model.plans_manager,
                                      model.configuration, model.dataset_json)
    return data, props


@pytest.mark.parametrize("spacing_zyx", [[1.0, 1.0, 1.0], [1.35, 0.8, 1.0]])
def test_device_preprocessing_equals_nnunet(model, spacing_zyx):
    image, _ = make_phantom_arrays(PhantomSpec(shape=(40, 57, 63), seed=3))
    image = np.round(image).astype(np.float32)
    # a zero frame around the head, as some scanners write it: nnU-Net crops it away
    image[:3], image[:, -5:], image[:, :, :2] = 0, 0, 0
    assert P._on_device_ok(model)
    before = image.copy()
    ours = P.preprocess(image, spacing_zyx, model, torch.device("cpu"))
    np.testing.assert_array_equal(image, before)  # the caller's array is untouched
    ref, props = _nnunet(image, spacing_zyx, model)
    assert ours.bbox == [list(map(int, b)) for b in props["bbox_used_for_cropping"]]
    assert ours.shape_before_cropping == tuple(props["shape_before_cropping"])
    assert ours.shape_after_cropping == tuple(props["shape_after_cropping_and_before_resampling"])
    assert tuple(ours.data.shape) == ref.shape
    # the same float32 arithmetic up to the last bit of a division
    np.testing.assert_allclose(ours.data.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_other_normalisation_takes_nnunets_path(model, monkeypatch):
    image, _ = make_phantom_arrays(PhantomSpec(shape=(32, 40, 44), seed=4))
    monkeypatch.setattr(P, "_on_device_ok", lambda m: False)
    ours = P.preprocess(image, [1.0, 1.0, 1.0], model, torch.device("cpu"))
    ref, _ = _nnunet(image, [1.0, 1.0, 1.0], model)
    np.testing.assert_array_equal(ours.data.numpy(), ref)


def test_nonzero_bbox_of_an_empty_image_is_the_whole_image():
    assert P.nonzero_bbox(torch.zeros((1, 4, 5, 6))) == [[0, 4], [0, 5], [0, 6]]
