"""The label map is on the input's exact grid, uint8, with only the challenge's FDI values."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from cbctseg.resources import label_map
from conftest import OBLIQUE, run_process, write_phantom

ALLOWED = set(range(0, 11)) | set(range(11, 19)) | set(range(21, 29)) | set(range(31, 39)) | set(range(41, 49))


def test_output_grid_equals_input_and_labels_are_fdi(tmp_path, weights):
    image, _ = write_phantom(tmp_path / "in" / "images" / "cbct" / "oblique.mha", shape=(40, 61, 90),
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
    assert set(label_map().fdi) == ALLOWED - {0}


def test_fdi_values_reach_the_file_for_every_structure(tmp_path):
    """Every contiguous label the network can emit arrives as its FDI value, on the input grid."""
    import torch

    from cbctseg.io import gc_io
    from cbctseg.inference.postprocess import to_fdi

    image, truth = write_phantom(tmp_path / "x.mha", shape=(24, 32, 32), direction=OBLIQUE, seed=2)
    vol = gc_io.read_volume(tmp_path / "x.mha")
    contiguous = torch.as_tensor(label_map().to_contiguous_lut()[sitk.GetArrayFromImage(truth)], dtype=torch.uint8)
    fdi, _ = to_fdi(contiguous, label_map())
    gc_io.write_label_map(fdi.numpy(), vol, tmp_path / "out" / "x.mha")
    out = sitk.ReadImage(str(tmp_path / "out" / "x.mha"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(truth))
    assert set(np.unique(sitk.GetArrayFromImage(out)).tolist()) == ALLOWED
    assert out.GetDirection() == image.GetDirection() and out.GetOrigin() == image.GetOrigin()
