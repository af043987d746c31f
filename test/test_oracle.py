"""Our engine against nnU-Net's own nnUNetPredictor on the same weights, folds, mirroring and step."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from cbctseg.resources import label_map
from conftest import OBLIQUE, WEIGHTS, run_process, write_phantom


def nnunet_reference(image: sitk.Image) -> np.ndarray:
    """nnUNetPredictor's label map for an image (FDI values), read the way nnU-Net's SimpleITKIO reads it."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(WEIGHTS), use_folds=(0, 1))
    assert predictor.allowed_mirroring_axes == (0, 1)
    arr = sitk.GetArrayFromImage(image).astype(np.float32)[None]
    props = {"spacing": list(image.GetSpacing())[::-1]}
    seg = predictor.predict_single_npy_array(arr, props)
    return label_map().to_fdi_lut()[seg]


def test_label_map_agrees_with_nnunet_predictor(tmp_path, weights):
    # anisotropic spacing that needs resampling, a non-identity direction, a size no multiple of the patch
    image, _ = write_phantom(tmp_path / "in" / "case.mha", shape=(46, 83, 101), spacing=(1.0, 1.0, 1.35),
                             origin=(-12.5, 30.0, 7.25), direction=OBLIQUE, seed=11)
    r = run_process("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--folds", "0", "1",
                    "--step-size", "0.5")
    assert r.returncode == 0, r.stderr
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out/images/oral-pharyngeal-segmentation/case.mha")))
    ref = nnunet_reference(image)
    assert ours.shape == ref.shape
    agreement = float((ours == ref).mean())
    structures = sorted(int(v) for v in np.unique(ref) if v)
    print(f"voxel agreement with nnUNetPredictor: {agreement:.6f}; nnU-Net's structures {structures}, "
          f"foreground {float((ref > 0).mean()):.4f}")
    assert agreement >= 0.999
    # the agreement means something only where the model segments: structures, not background everywhere
    assert len(structures) >= 2 and float((ref > 0).mean()) >= 0.01
    # trained weights (nnU-Net's training ran epochs on them), not a random initialisation
    for fold in (0, 1):
        ckpt = torch.load(WEIGHTS / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        assert ckpt["current_epoch"] > 0
