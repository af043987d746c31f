"""A run's models checked before anything is unpickled, and before torch and nnU-Net are imported.

Which folders the run uses (`ensemble.members_for`), that an ensemble's members label alike, and for each model
where it is, its manifest, every declared fold present, every file's sha256 and the labels
(`manifest.verify_folder`). None of it needs torch, so a missing, damaged or foreign model stops a run in a
fraction of a second instead of after the seconds the engine takes to import.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cbctseg.model.ensemble import check_member_labels, members_for
from cbctseg.model.layout import locate_model
from cbctseg.model.manifest import MANIFEST, Manifest, ModelError, undeclared_folds, verify_folder

log = logging.getLogger(__name__)
APP_WEIGHTS = Path(__file__).resolve().parents[2] / "weights"  # the weights bundled with the app


@dataclass(frozen=True)
class VerifiedModel:
    """A model folder whose files match its manifest: the folds to load."""

    folder: Path
    folds: list[str]
    manifest: Manifest


@dataclass(frozen=True)
class VerifiedMember:
    """One model of a run, verified, with its ensemble weight."""

    model: VerifiedModel
    weight: float = 1.0


def verify_model(folder: Path, folds: Sequence[str] | None = None, manifest: Manifest | None = None) -> VerifiedModel:
    """Check a model folder (against `manifest` instead of its checksums.json when given, as sealing does).

    Raises ModelError naming what is wrong: no such folder, a folder that holds the model one level down, or
    anything `manifest.verify_folder` finds."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist")
    if manifest is None and not (folder / "plans.json").is_file() and not (folder / MANIFEST).is_file():
        located = locate_model(folder)  # no model, or two: the error says what the folder holds
        if located != folder:
            raise ModelError(f"{folder} is not a model folder: it holds one in {located}; pass that folder")
    manifest, chosen = verify_folder(folder, list(folds) if folds else None, manifest)
    extra = undeclared_folds(folder, manifest)
    if extra:
        log.warning("model %s: fold(s) %s have checkpoints but %s does not declare them: not used", folder,
                    ", ".join(extra), MANIFEST)
    return VerifiedModel(folder, chosen, manifest)


def verify_members(weights: Sequence[Path] | Path | None, folds: Sequence[str] | None = None,
                   app_weights: Path = APP_WEIGHTS) -> list[VerifiedMember]:
    """The run's models (`ensemble.members_for`: --weights, an ensemble file, the bundled weights), their label
    maps compared first when there are several, then each verified. Raises ModelError."""
    specs = members_for(weights, app_weights, folds)
    if len(specs) > 1:  # a single model's labels are checked with the messages of a bad folder
        check_member_labels(specs)
    return [VerifiedMember(verify_model(spec.folder, spec.fold_list), spec.weight) for spec in specs]
