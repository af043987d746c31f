"""Where the model sits in an unpacked model tarball (grand-challenge unpacks one at /opt/ml/model).

Recognised: the model's files at the root (`tar -C mymodel -czf model.tar.gz .`, what export.sh writes); one
folder holding them (`tar czf model.tar.gz mymodel/`, the most common way to pack one); nnU-Net's results
layout (`DatasetXXX_Name/Trainer__Plans__Configuration/fold_*`, also inside one more folder). A folder with
two models, or none, is refused with what was found, never replaced by the bundled weights.
"""
from __future__ import annotations

import os
from pathlib import Path

from cbctseg.model.manifest import CHECKPOINT, MANIFEST, ModelError

GC_MODEL_DIR = Path("/opt/ml/model")
MODEL_DIR_ENV = "CBCTSEG_MODEL_DIR"  # another place for the unpacked tarball (tests, other platforms)
MAX_DEPTH = 3  # mymodel/ is 1, DatasetXXX/Trainer__Plans__Config/ 2, nnUNet_results/DatasetXXX/... 3
ROOT_MARKERS = ("plans.json", "dataset.json", MANIFEST)


def gc_model_dir() -> Path:
    """Where a model tarball is unpacked: $CBCTSEG_MODEL_DIR, else /opt/ml/model."""
    return Path(os.environ.get(MODEL_DIR_ENV) or GC_MODEL_DIR)


def _visible(folder: Path) -> list[Path]:
    """Entries that are not packing debris (dot files such as macOS's ._*, __MACOSX/)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX")


def is_empty(folder: Path) -> bool:
    """True when the folder is absent or holds nothing but packing debris."""
    try:
        return not _visible(Path(folder))
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:  # there but unreadable: load_model says so
        return False


def holds_model_files(folder: Path) -> bool:
    """The folder itself holds model files (plans.json, dataset.json, checksums.json or a fold_* folder)."""
    folder = Path(folder)
    return any((folder / m).is_file() for m in ROOT_MARKERS) or any(p.is_dir() for p in folder.glob("fold_*"))


def _is_model(folder: Path) -> bool:
    return (folder / "plans.json").is_file() and (
        (folder / MANIFEST).is_file() or any(folder.glob(f"fold_*/{CHECKPOINT}")))


def find_models(root: Path, max_depth: int = MAX_DEPTH) -> list[Path]:
    """Model folders (plans.json with a manifest or a fold checkpoint) below root, at most max_depth down."""
    found, level = [], [Path(root)]
    for _ in range(max_depth):
        nxt = []
        for d in level:
            try:
                subs = [p for p in _visible(d) if p.is_dir() and not p.name.startswith("fold_")]
            except OSError:
                continue
            for s in subs:
                (found if _is_model(s) else nxt).append(s)
        level = nxt
    return sorted(found)


def _listing(root: Path, limit: int = 12) -> str:
    """What the folder holds, two levels deep, for an error message."""
    names = []
    for p in _visible(root):
        names.append(p.name + ("/" if p.is_dir() else ""))
        if p.is_dir():
            try:
                names += [f"{p.name}/{q.name}" + ("/" if q.is_dir() else "") for q in _visible(p)[:4]]
            except OSError:
                pass
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "nothing"


def locate_model(root: Path) -> Path:
    """The model folder in root: root itself when it holds model files, else the one model below it.

    Raises ModelError naming what was found when there is no model or more than one.
    """
    root = Path(root)
    if holds_model_files(root):
        return root
    try:
        found = find_models(root)
        if len(found) == 1:
            return found[0]
        if found:
            names = ", ".join(str(p.relative_to(root)) + "/" for p in found)
            raise ModelError(f"{root} holds {len(found)} models ({names}); it must hold one, or an ensemble.json "
                             f"at its root listing them (README, 'Ensembles')")
        listing = _listing(root)
    except OSError as e:
        raise ModelError(f"{root}: cannot be read ({e})") from None
    raise ModelError(f"{root} holds no model: found {listing}. Expected plans.json, dataset.json, {MANIFEST} and "
                     f"fold_*/{CHECKPOINT} at its root, in one folder, or in nnU-Net's results layout "
                     f"(DatasetXXX_Name/Trainer__Plans__Configuration/fold_*)")


def default_model_folder(app_weights: Path) -> Path:
    """The model of an unpacked tarball (gc_model_dir) when there is one, the app's weights when that place is
    absent or empty. A tarball that holds no model or two is returned as is, for load_model to refuse with
    what it found: never the bundled weights in its stead."""
    root = gc_model_dir()
    if is_empty(root):
        return Path(app_weights)
    try:
        return locate_model(root)
    except ModelError:
        return root
