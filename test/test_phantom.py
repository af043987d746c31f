"""The phantom generator: deterministic, seedable, all 42 structures, any geometry."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from cbctseg.training.phantom import PhantomSpec, make_phantom, make_phantom_arrays
from cbctseg.resources import label_map
from conftest import OBLIQUE


def test_same_seed_same_phantom_other_seed_other_phantom():
    a = make_phantom_arrays(PhantomSpec(shape=(40, 64, 64), seed=7))
    b = make_phantom_arrays(PhantomSpec(shape=(40, 64, 64), seed=7))
    c = make_phantom_arrays(PhantomSpec(shape=(40, 64, 64), seed=8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_all_42_structures_at_their_fdi_values_with_ct_intensities():
    img, lab = make_phantom_arrays(PhantomSpec(shape=(64, 96, 96), seed=1))
    assert set(np.unique(lab).tolist()) == {0, *label_map().fdi}
    assert img.min() >= -1000 and img.max() <= 5264
    assert np.median(img[lab == 1]) > 1000  # bone
    assert np.median(img[lab == 7]) < -800  # air in the pharynx
    assert np.median(img[(lab >= 11) & (lab <= 48)]) > 2000  # enamel and dentine


def test_left_and_right_are_anatomical():
    _, lab = make_phantom_arrays(PhantomSpec(shape=(48, 80, 80), seed=0, jitter=0))
    x = np.arange(lab.shape[2])[None, None, :]
    for left, right in ((3, 4), (5, 6), (21, 11), (31, 41)):
        assert (x * (lab == left)).sum() / (lab == left).sum() > 40 > (x * (lab == right)).sum() / (lab == right).sum()


def test_geometry_is_applied():
    image, label = make_phantom(PhantomSpec(shape=(20, 30, 40), spacing=(0.3, 0.4, 0.5), origin=(1, 2, 3),
                                            direction=OBLIQUE, pixel_type=sitk.sitkFloat32))
    for im in (image, label):
        assert im.GetSize() == (40, 30, 20)
        assert im.GetSpacing() == (0.3, 0.4, 0.5) and im.GetOrigin() == (1, 2, 3) and im.GetDirection() == OBLIQUE
    assert label.GetPixelID() == sitk.sitkUInt8 and image.GetPixelID() == sitk.sitkFloat32
