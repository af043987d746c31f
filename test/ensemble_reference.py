"""nnU-Net's own answer for an ensemble of model folders, and a second model for one from the demo weights.

`make_second_configuration` copies a model folder under a new configuration of the same network whose spacing is
coarser, with the same trained checkpoints: a model that resamples where the first may not, so that an ensemble of
the two needs each model's prediction brought back to the input grid before averaging.

`nnunet_ensemble_reference` is what nnU-Net's own tools give for that ensemble: nnUNetPredictor per model folder
writing its probabilities as `nnUNetv2_predict --save_probabilities` does (the image as `case_0000.mha`, read and
written by nnU-Net's SimpleITKIO), then nnunetv2's ensembling of those files (`merge_files`, the per-case function
that `nnUNetv2_ensemble` / `ensemble_folders` runs in a process pool; called here in this process to spare starting
one). Arrays are ZYX, as `sitk.GetArrayFromImage` of the input gives them.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from cbctseg.model.manifest import CHECKPOINT, read_manifest
from cbctseg.resources import label_map

REPO = Path(__file__).resolve().parent.parent
# nnU-Net resolves the demo's trainer class by name when it loads a checkpoint
os.environ.setdefault("nnUNet_extTrainer", str(REPO / "cbctseg" / "training" / "nnunet_trainers"))
for _var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
    os.environ.setdefault(_var, "/tmp/nnunet_unused")
CASE = "case"
# A small case for an ensemble of the demo weights and their coarse copy: at the demo's spacing (1 mm), so that
# the first model predicts on the input grid (two windows) and only the coarse one resamples (one window); an
# oblique direction as a scanner may store it. 2 models x 2 folds x 4 flips x 3 windows = 24 passes.
ENSEMBLE_CASE = dict(shape=(48, 64, 90), spacing=(1.0, 1.0, 1.0), origin=(-12.5, 30.0, 7.25),
                     direction=(0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0), seed=11)


def make_second_configuration(src: Path, dst: Path, spacing_factor: float = 1.5, suffix: str = "_coarse") -> Path:
    """A copy of the model folder src at dst whose checkpoints use a new configuration `<theirs><suffix>`: the
    same network and preprocessing with the target spacing multiplied by spacing_factor on every axis.

    The trained weights are unchanged (so the model still segments, at a coarser grid); plans.json gains the
    configuration, each checkpoint's init_args name it, and a fresh checksums.json is sealed with src's folds and
    demo flag (the model must load to be sealed). Returns dst.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from cbctseg.model.loading import seal_model

    src, dst = Path(src), Path(dst)
    manifest = read_manifest(src)
    dst.mkdir(parents=True)
    shutil.copy2(src / "dataset.json", dst / "dataset.json")
    plans = json.loads((src / "plans.json").read_text())
    first = torch.load(src / f"fold_{manifest.folds[0]}" / CHECKPOINT, map_location="cpu", weights_only=False)
    source_name = first["init_args"]["configuration"]
    name = source_name + suffix
    spacing = PlansManager(plans).get_configuration(source_name).spacing
    plans["configurations"][name] = {"inherits_from": source_name,
                                     "spacing": [float(s) * spacing_factor for s in spacing]}
    (dst / "plans.json").write_text(json.dumps(plans, indent=1))
    for fold in manifest.folds:
        ckpt = torch.load(src / f"fold_{fold}" / CHECKPOINT, map_location="cpu", weights_only=False)
        ckpt["init_args"]["configuration"] = name
        if "plans" in ckpt["init_args"]:
            ckpt["init_args"]["plans"] = copy.deepcopy(plans)
        (dst / f"fold_{fold}").mkdir()
        torch.save(ckpt, dst / f"fold_{fold}" / CHECKPOINT)
    seal_model(dst, manifest.folds, demo=manifest.demo)
    return dst


@dataclass
class Reference:
    """nnU-Net's answer for one image: the ensemble and each model alone (ZYX arrays on the input grid)."""

    labels: np.ndarray  # the ensemble's label map, FDI values (uint8)
    margin: np.ndarray  # top-two margin of the averaged probabilities (float32)
    model_labels: list[np.ndarray] = field(default_factory=list)  # each model alone, FDI values
    model_configurations: list[str] = field(default_factory=list)
    preprocessed_shapes: list[tuple[int, ...]] = field(default_factory=list)  # each model's grid (after resampling)
    seconds: dict = field(default_factory=dict)  # where the reference's time went


def top_two_margin(probabilities: np.ndarray) -> np.ndarray:
    """Per voxel, the largest class probability minus the second largest (probabilities: C, Z, Y, X)."""
    top2 = np.partition(probabilities, -2, axis=0)[-2:]
    return (top2[1] - top2[0]).astype(np.float32)


def _write_input(image: Path | sitk.Image, folder: Path) -> Path:
    folder.mkdir(parents=True)
    path = folder / f"{CASE}_0000.mha"
    if isinstance(image, sitk.Image):
        sitk.WriteImage(image, str(path))
    else:
        shutil.copyfile(image, path)
    return path


def nnunet_reference(image: Path | sitk.Image, folders: list[Path], folds: tuple = (0, 1), tmp: Path | None = None,
                     preprocessed_shapes: bool = False) -> Reference:
    """nnU-Net's prediction of each model folder with probabilities saved, and nnunetv2's ensembling of them.

    Settings of the oracle test: tile step 0.5, Gaussian weighting, mirroring on the checkpoints' axes, on the
    CPU. `preprocessed_shapes` also runs each model's preprocessor to report the grid it predicts on.
    """
    from nnunetv2.ensembling.ensemble import average_probabilities, merge_files
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if tmp is None:
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="nnunet-ensemble-"))
    tmp = Path(tmp)
    source = _write_input(image, tmp / "input")
    lut = label_map().to_fdi_lut()
    ref = Reference(labels=np.zeros(0, np.uint8), margin=np.zeros(0, np.float32))
    prob_files = []
    for i, folder in enumerate(folders):
        t0 = time.monotonic()
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                    perform_everything_on_device=False, device=torch.device("cpu"),
                                    allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(folder), use_folds=tuple(folds))
        out = tmp / f"model_{i}"
        out.mkdir()
        # what nnUNetv2_predict -chk ... --save_probabilities writes: case.mha, case.npz, case.pkl
        predictor.predict_from_files_sequential([[str(source)]], [str(out / CASE)], save_probabilities=True)
        ref.seconds[f"model_{i}"] = time.monotonic() - t0
        ref.model_configurations.append(read_manifest(folder).configuration)
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{CASE}.mha")))
        ref.model_labels.append(lut[seg])
        prob_files.append(str(out / f"{CASE}.npz"))
        if preprocessed_shapes:
            pre = predictor.configuration_manager.preprocessor_class(verbose=False)
            data, _, _ = pre.run_case([str(source)], None, predictor.plans_manager, predictor.configuration_manager,
                                      predictor.dataset_json)
            ref.preprocessed_shapes.append(tuple(int(s) for s in data.shape[1:]))
    t0 = time.monotonic()
    first = Path(folders[0])
    plans_manager = PlansManager(json.loads((first / "plans.json").read_text()))
    dataset_json = json.loads((first / "dataset.json").read_text())
    ens = tmp / "ensemble"
    ens.mkdir()
    merge_files(prob_files, str(ens / CASE), dataset_json["file_ending"], plans_manager.image_reader_writer_class(),
                plans_manager.get_label_manager(dataset_json), save_probabilities=False)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(ens / f"{CASE}{dataset_json['file_ending']}")))
    ref.labels = lut[seg]
    probabilities = average_probabilities(prob_files)  # the average merge_files took its argmax of
    ref.margin = top_two_margin(probabilities)
    ref.seconds["ensemble"] = time.monotonic() - t0
    if probabilities.shape[1:] != seg.shape or not np.array_equal(probabilities.argmax(0), seg):
        raise AssertionError("nnU-Net's ensembled label map is not the argmax of its averaged probabilities")
    return ref


def nnunet_ensemble_reference(image: Path | sitk.Image, folders: list[Path], folds: tuple = (0, 1),
                              tmp: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """nnU-Net's ensemble label map (FDI values) and the top-two margin of its averaged probabilities, ZYX."""
    ref = nnunet_reference(image, folders, folds, tmp)
    return ref.labels, ref.margin
