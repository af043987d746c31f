"""nnU-Net's own ensemble of two model folders with different spacings means something as an oracle.

The reference (test/ensemble_reference.py) is nnUNetPredictor per model with probabilities saved, then nnunetv2's
ensembling; the second model is the demo weights under a coarser configuration. Here: the coarse model resamples
and the other does not, both segment structures, the ensemble differs from each model alone, and nnU-Net's
single-model label map from this path agrees with our engine's on the same model (same ZYX axes and grid).
Run alone with `pytest -m ensemble_reference`.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_process, write_phantom
from ensemble_reference import ENSEMBLE_CASE, make_second_configuration, nnunet_reference

pytestmark = pytest.mark.ensemble_reference


def structures(labels: np.ndarray) -> list[int]:
    return sorted(int(v) for v in np.unique(labels) if v)


def test_reference_ensemble_of_two_spacings(tmp_path, weights):
    coarse = make_second_configuration(weights, tmp_path / "coarse", spacing_factor=1.5)
    image, _ = write_phantom(tmp_path / "in" / "case.mha", **ENSEMBLE_CASE)
    shape = sitk.GetArrayFromImage(image).shape
    ref = nnunet_reference(image, [weights, coarse], (0, 1), tmp_path / "ref", preprocessed_shapes=True)

    assert ref.model_configurations == ["3d_fullres_torchres_tiny", "3d_fullres_torchres_tiny_coarse"]
    # the first model predicts on the input grid, the coarse one on a grid 1.5 times coarser
    assert ref.preprocessed_shapes[0] == shape
    assert ref.preprocessed_shapes[1] == tuple(round(s / 1.5) for s in shape)
    assert ref.labels.shape == ref.margin.shape == shape
    assert ref.margin.min() >= 0 and ref.margin.max() <= 1

    agreements = [float((m == ref.labels).mean()) for m in ref.model_labels]
    small_margin = float((ref.margin < 0.01).mean())
    print(f"nnU-Net reference: {ref.seconds}; structures: ensemble {structures(ref.labels)}, models "
          f"{[structures(m) for m in ref.model_labels]}; foreground: ensemble {float((ref.labels > 0).mean()):.4f}, "
          f"models {[round(float((m > 0).mean()), 4) for m in ref.model_labels]}; agreement of each model with the "
          f"ensemble {[round(a, 6) for a in agreements]}; margin < 0.01 on {small_margin:.6f} of the voxels")
    for labels in (ref.labels, *ref.model_labels):
        assert len(structures(labels)) >= 2 and float((labels > 0).mean()) >= 0.01
    # each model alone differs from the ensemble: an engine that ran one model only would fail the oracle
    assert all(a < 0.999 for a in agreements)
    # where nnU-Net's ensemble is decided (margin >= 0.01) neither model alone decides it everywhere
    decided = ref.margin >= 0.01
    assert all(bool((m[decided] != ref.labels[decided]).any()) for m in ref.model_labels)

    # the reference's arrays are on the input grid in our output's axes: our engine on the first model alone
    r = run_process("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--weights", str(weights),
                    "--folds", "0", "1", "--step-size", "0.5")
    assert r.returncode == 0, r.stderr
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out/images/oral-pharyngeal-segmentation/case.mha")))
    agreement = float((ours == ref.model_labels[0]).mean())
    print(f"our engine on the first model against nnU-Net's: voxel agreement {agreement:.6f}")
    assert agreement >= 0.999
