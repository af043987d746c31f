"""The ensemble's band-by-band combination against the whole-volume one nnU-Net's ensembling computes: each
model's logits resampled to the input's cropped grid with the model's own resampling function, softmax,
weighted sum, argmax, un-cropped. Logits are random (no network runs), models are the demo weights and their
coarse copy, one of them with other axis orders and nnU-Net's default (scipy) resampling."""
from __future__ import annotations

import copy
import dataclasses
import functools

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from cbctseg.inference.band_resampling import BandResampler, axis_modes
from cbctseg.inference.ensemble import BandEnsemble
from cbctseg.inference.preprocess import preprocess
from cbctseg.model.loading import load_model
from conftest import write_phantom
from ensemble_reference import make_second_configuration

CPU = torch.device("cpu")


def torch_resampling(**kw):
    return functools.partial(resample_torch_fornnunet, is_seg=False, memefficient_seg_resampling=False, **kw)


@pytest.mark.parametrize("shape, target, current, new, separate", [
    ((7, 13, 17, 19), (20, 26, 28), [1.5] * 3, [1.0] * 3, False),  # upsampling, every axis linear
    ((7, 13, 17, 19), (9, 11, 30), [1.5] * 3, [2.0, 2.0, 1.0], None),  # down on two axes, up on one
    ((5, 6, 20, 21), (24, 30, 31), [4.0, 1.0, 1.0], [1.0, 0.7, 0.7], None),  # anisotropic: nearest along axis 0
    ((5, 20, 6, 21), (30, 24, 31), [1.0, 4.0, 1.0], [0.7, 1.0, 0.7], None),  # ... along an in-plane axis
    ((5, 13, 17, 19), (13, 17, 19), [1.0] * 3, [1.0] * 3, None),  # the same grid
])
def test_bands_equal_nnunets_whole_volume_resampling(shape, target, current, new, separate):
    fn = torch_resampling(force_separate_z=separate)
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(0)).half()
    whole = fn(logits, target, current, new).float()
    resampler = BandResampler(logits, target, axis_modes(fn, current, new))
    bands = torch.cat([resampler.band(z, min(z + 3, target[0]), CPU) for z in range(0, target[0], 3)], 1)
    assert bands.shape == whole.shape
    assert float((bands - whole).abs().max()) < 1e-5


def test_only_resampling_reproduced_exactly_is_done_by_bands():
    assert axis_modes(torch_resampling(force_separate_z=False), [1.0] * 3, [2.0] * 3) == ["linear"] * 3
    assert axis_modes(torch_resampling(force_separate_z=None), [4.0, 1.0, 1.0], [1.0] * 3)[0] == "nearest-exact"
    default = functools.partial(resample_data_or_seg_to_shape, is_seg=False, order=1, order_z=0)
    assert axis_modes(default, [1.0] * 3, [2.0] * 3) is None
    assert axis_modes(torch_resampling(force_separate_z=False, mode="cubic"), [1.0] * 3, [2.0] * 3) is None


def _with_other_axes_and_scipy_resampling(model):
    """The model under plans that transpose its axes and resample its probabilities with nnU-Net's default
    (scipy) function: the path where the ensemble resamples the model whole."""
    plans = copy.deepcopy(model.plans_manager.plans)
    plans["transpose_forward"], plans["transpose_backward"] = [2, 0, 1], [1, 2, 0]
    config = plans["configurations"][model.configuration_name]
    config["resampling_fn_probabilities"] = "resample_data_or_seg_to_shape"
    config["resampling_fn_probabilities_kwargs"] = {"is_seg": False, "order": 1, "order_z": 0,
                                                    "force_separate_z": None}
    pm = PlansManager(plans)
    return dataclasses.replace(model, plans_manager=pm, configuration=pm.get_configuration(model.configuration_name))


@pytest.fixture(scope="module")
def case(tmp_path_factory, weights):
    root = tmp_path_factory.mktemp("band_ensemble")
    coarse = make_second_configuration(weights, root / "coarse", spacing_factor=1.5)
    fine, coarse = load_model(weights, device=CPU), load_model(coarse, device=CPU)
    # black margins, so that every model crops the image
    image, _ = write_phantom(root / "case.mha", shape=(30, 40, 52), spacing=(1.0, 1.0, 1.0), seed=5)
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array[:3], array[:, :, -4:] = 0, 0
    return array, [fine, coarse, _with_other_axes_and_scipy_resampling(coarse)]


def _whole_volume(array, parts):
    """nnU-Net's combination: resampled whole, softmax, weighted sum on the input grid, argmax."""
    total = None
    for model, pre, logits, weight in parts:
        res = model.configuration.resampling_fn_probabilities(
            logits.float().numpy() if "data_or_seg" in str(model.configuration.resampling_fn_probabilities)
            else logits.float(), tuple(pre.shape_after_cropping), pre.target_spacing, pre.spacing_transposed)
        p = torch.softmax(torch.as_tensor(np.asarray(res)).float(), 0) * weight
        full = torch.zeros((p.shape[0], *pre.shape_before_cropping))
        full[(slice(None), *(slice(a, b) for a, b in pre.bbox))] = p
        full = full.permute(0, *[a + 1 for a in model.plans_manager.transpose_backward])
        total = full if total is None else total + full
    top2 = torch.topk(total, 2, dim=0).values
    return total.argmax(0), top2[0] - top2[1]


@pytest.mark.parametrize("streamed", [True, False])
def test_band_ensemble_equals_the_whole_volume_combination(case, streamed):
    array, models = case
    gen = torch.Generator().manual_seed(3)
    parts = []
    for model, weight in zip(models, (1.0, 0.6, 1.4)):
        pre = preprocess(array, [1.0, 1.0, 1.0], model, CPU)
        logits = (3 * torch.randn((model.num_classes, *pre.data.shape[1:]), generator=gen)).half()
        parts.append((model, pre, logits, weight))
    fine, pre, logits, weight = parts[0]
    assert tuple(pre.data.shape[1:]) == tuple(pre.shape_after_cropping) != tuple(pre.shape_before_cropping)
    assert tuple(parts[1][1].data.shape[1:]) != tuple(pre.shape_after_cropping)  # the coarse ones resample
    ensemble = BandEnsemble(fine, pre, fine.num_classes)
    for model, p, lg, w in parts[1:]:
        ensemble.keep(lg, p, model, w, CPU)
    if streamed:
        sink = ensemble.sink(weight, CPU)
        for z in range(0, logits.shape[1], 4):  # bands as the streamed sums finish them
            sink(z, logits[:, z:z + 4])
    else:
        ensemble.keep(logits, pre, fine, weight, CPU)
    ours = ensemble.result(CPU)
    expected, margin = _whole_volume(array, parts)
    assert ours.shape == expected.shape == array.shape
    # random logits of 43 classes tie far more often than a network's; the resampled copy the scipy model keeps
    # is fp16, one rounding more than nnU-Net's float32 (the bands of torch-resampled models add none)
    assert float((ours == expected).float().mean()) >= 0.999
    assert bool((ours == expected)[margin >= 1e-3].all())
    assert bool((ours[:3] == 0).all())  # outside the crop: background
