"""The label map is on the input's exact grid, uint8, with only the challenge's FDI values."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from cbctseg.resources import label_map
from conftest import OBLIQUE, run_process, write_phantom

ALLOWED = set(range(0, 11)) | set(range(11, 19)) | set(range(21, 29)) | set(range(31, 39)) | set(range(41, 49))


def test_output_grid_equals_input_and_labels_are_fdi(tmp_path, weights):
    image, truth = write_phantom(tmp_path / "in" / "images" / "cbct" / "oblique.mha", shape=(52, 77, 90),
                                 spacing=(0.9, 1.1, 1.2), origin=(100.0, -50.5, 3.0), direction=OBLIQUE, seed=5)
    r = run_process("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--folds", "0",
                    "--no-mirroring")
    assert r.returncode == 0, r.stderr
    out = sitk.ReadImage(str(tmp_path / "out/images/oral-pharyngeal-segmentation/oblique.mha"))
    assert out.GetSize() == image.GetSize()
    assert out.GetSpacing() == image.GetSpacing()
    assert out.GetOrigin() == image.GetOrigin()
    assert out.GetDirection() == image.GetDirection()
    assert out.GetPixelID() == sitk.sitkUInt8 and out.GetNumberOfComponentsPerPixel() == 1
    arr = sitk.GetArrayFromImage(out)
    values = set(np.unique(arr).tolist())
    assert values <= ALLOWED, values - ALLOWED
    assert values & {1, 2}, "the jaws are found"
    assert set(label_map().fdi) == ALLOWED - {0}
    # the label map is anatomy, not noise: jaws overlap the phantom's jaws
    t = sitk.GetArrayFromImage(truth)
    for fdi in (1, 2):
        dice = 2 * np.sum((arr == fdi) & (t == fdi)) / (np.sum(arr == fdi) + np.sum(t == fdi))
        assert dice > 0.5, (fdi, dice)
