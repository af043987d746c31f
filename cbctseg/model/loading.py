"""An nnU-Net v2 model folder: plans, dataset, folds, mirroring axes and the networks, verified before loading.

Before any checkpoint is unpickled the folder is checked against its manifest (`verify.verify_model`: every
declared fold present, every file's sha256, the labels of resources/labels.json); `seal_model` writes that
manifest.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from cbctseg.networks import precision
from cbctseg.model.layout import locate_model
from cbctseg.model.manifest import (CHECKPOINT, DEMO_WARNING, MANIFEST, Manifest, ModelError, build_manifest,
                                    write_manifest)
from cbctseg.model.verify import VerifiedModel, verify_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Model:
    """What inference needs from a trained model folder, networks loaded on `device` in eval mode.

    Never changed after loading: how the networks run (compiled, on Triton) is a `networks.backend.Backend`
    kept beside the model."""

    folder: Path
    folds: list[str]
    plans_manager: PlansManager
    configuration_name: str
    configuration: ConfigurationManager
    dataset_json: dict
    trainer_name: str
    mirror_axes: tuple[int, ...]
    networks: tuple[torch.nn.Module, ...]
    input_dtype: torch.dtype = torch.float32  # what preprocessing hands the networks (precision.input_dtype)
    demo: bool = False  # the manifest marks these as demo weights

    def describe(self) -> dict:
        """The model in a case report: where it came from, which folds, whether it is the demo."""
        return {"folder": str(self.folder), "folds": list(self.folds), "configuration": self.configuration_name,
                "demo": self.demo}

    @property
    def num_classes(self) -> int:
        return self.plans_manager.get_label_manager(self.dataset_json).num_segmentation_heads

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(self.configuration.patch_size)


def available_folds(folder: Path) -> list[str]:
    """Fold names (e.g. '0', '1', 'all') that have a final checkpoint, numeric folds first."""
    names = [p.parent.name[len("fold_"):] for p in Path(folder).glob(f"fold_*/{CHECKPOINT}")]
    return sorted(names, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ModelError(f"model folder {path.parent}: missing {path.name}") from e
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from e


def load_model(folder: Path, folds: list[str] | None = None, device: torch.device = torch.device("cpu"),
               expected_classes: int | None = None, manifest: Manifest | None = None,
               verified: VerifiedModel | None = None) -> Model:
    """Verify the model folder (unless `verified` says it was, `verify.verify_model`), then load plans, dataset
    and each fold's network; checks that the folds agree with each other and the plans.

    Verified first (nothing unpickled before): the folder's checksums.json (or `manifest`, when sealing), every
    fold it declares present (`folds` picks some of them), each file's sha256, dataset.json's labels against
    resources/labels.json. On a GPU the networks are stored as they compute there (`precision.prepare`: fp16
    convolutions).
    """
    if verified is None:
        verified = verify_model(folder, folds, manifest)
    folder, folds, manifest = verified.folder, verified.folds, verified.manifest
    plans = _load_json(folder / "plans.json")
    dataset_json = _load_json(folder / "dataset.json")
    plans_manager = PlansManager(plans)
    checkpoints = []
    for f in folds:
        path = folder / f"fold_{f}" / CHECKPOINT
        try:
            checkpoints.append(torch.load(path, map_location="cpu", weights_only=False))
        except Exception as e:  # torch raises many kinds for a damaged file
            raise ModelError(f"{path}: cannot be loaded ({e})") from e
    first = checkpoints[0]
    try:
        configuration_name = first["init_args"]["configuration"]
        trainer_name = first["trainer_name"]
    except (KeyError, TypeError) as e:
        raise ModelError(f"{folder}/fold_{folds[0]}/{CHECKPOINT}: not an nnU-Net v2 checkpoint") from e
    for f, c in zip(folds, checkpoints):
        if c.get("init_args", {}).get("configuration") != configuration_name:
            raise ModelError(f"{folder}: fold_{f} was trained with configuration "
                             f"{c.get('init_args', {}).get('configuration')!r}, fold_{folds[0]} with {configuration_name!r}")
    if configuration_name not in plans["configurations"]:
        raise ModelError(f"{folder}/plans.json has no configuration {configuration_name!r} (used by the checkpoints)")
    configuration = plans_manager.get_configuration(configuration_name)
    label_manager = plans_manager.get_label_manager(dataset_json)
    num_classes = label_manager.num_segmentation_heads
    if expected_classes is not None and num_classes != expected_classes:
        raise ModelError(f"{folder}/dataset.json has {num_classes} classes, resources/labels.json {expected_classes}")
    mirror = first.get("inference_allowed_mirroring_axes")
    networks = []
    for f, c in zip(folds, checkpoints):
        net = get_network_from_plans(
            configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
            configuration.network_arch_init_kwargs_req_import,
            determine_num_input_channels(plans_manager, configuration, dataset_json), num_classes,
            allow_init=False, deep_supervision=False)
        try:
            net.load_state_dict(c["network_weights"])
        except (RuntimeError, KeyError) as e:
            raise ModelError(f"{folder}/fold_{f}: weights do not fit the plans' network ({_short(e)})") from e
        net = net.to(device).eval()
        precision.prepare(net, device)
        networks.append(net)
    log.info("model %s: configuration %s, trainer %s, folds %s, mirroring axes %s, checksums verified", folder,
             configuration_name, trainer_name, folds, mirror)
    if manifest.demo:
        log.warning(DEMO_WARNING.format(folder=folder, manifest=MANIFEST))
    return Model(folder, folds, plans_manager, configuration_name, configuration, dataset_json, trainer_name,
                 tuple(mirror) if mirror is not None else (), tuple(networks), precision.input_dtype(device),
                 demo=manifest.demo)


def seal_model(folder: Path, folds: list[str] | None = None, demo: bool = False) -> tuple[Path, Manifest]:
    """Write checksums.json for a model folder (or a folder holding one, as locate_model finds it): its folds
    (default: every fold_* with a checkpoint) and their sha256. The model must load first, labels included,
    so that a broken model is never sealed. Returns the model folder and the manifest written."""
    folder = locate_model(Path(folder))
    folds = [str(f) for f in folds] if folds else available_folds(folder)
    if not folds:
        raise ModelError(f"model folder {folder}: no fold_*/{CHECKPOINT}")
    manifest = build_manifest(folder, folds, demo)
    model = load_model(folder, folds, torch.device("cpu"), manifest=manifest)
    manifest.configuration, manifest.trainer = model.configuration_name, model.trainer_name
    write_manifest(folder, manifest)
    return folder, manifest


def _short(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__
