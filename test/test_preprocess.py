"""Our preprocessing (torch, on the device) against nnU-Net's DefaultPreprocessor on the same image, and the way
back (finalize) under plans that resample with nnU-Net's default functions."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from cbctseg.inference import preprocess as P
from cbctseg.inference.finalize import finalize
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


def _under_default_resampling(model):
    """The model under the plans nnU-Net's default planner writes: scipy resampling (numpy in and out)."""
    plans = copy.deepcopy(model.plans_manager.plans)
    config = plans["configurations"][model.configuration_name]
    for kind, order in (("data", 3), ("probabilities", 1)):
        config[f"resampling_fn_{kind}"] = "resample_data_or_seg_to_shape"
        config[f"resampling_fn_{kind}_kwargs"] = {"is_seg": False, "order": order, "order_z": 0,
                                                  "force_separate_z": None}
    pm = PlansManager(plans)
    return dataclasses.replace(model, plans_manager=pm, configuration=pm.get_configuration(model.configuration_name))


def test_plans_with_nnunets_default_resampling_preprocess_and_finalize_as_nnunet(model):
    scipy_model = _under_default_resampling(model)
    image, _ = make_phantom_arrays(PhantomSpec(shape=(30, 41, 45), seed=6))
    spacing = [1.35, 0.8, 1.0]  # resampled both ways
    pre = P.preprocess(image, spacing, scipy_model, torch.device("cpu"))
    ref, props = _nnunet(image, spacing, scipy_model)
    np.testing.assert_allclose(pre.data.numpy(), ref, rtol=1e-5, atol=1e-5)
    logits = (3 * torch.randn((scipy_model.num_classes, *pre.data.shape[1:]),
                              generator=torch.Generator().manual_seed(2))).half()
    ours = finalize(logits, pre, scipy_model, torch.device("cpu"))
    expected = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits.float(), scipy_model.plans_manager, scipy_model.configuration,
        scipy_model.plans_manager.get_label_manager(scipy_model.dataset_json), props)
    assert ours.shape == image.shape
    assert float((ours.numpy() == expected).mean()) >= 0.999  # random logits of 43 classes: near-ties
