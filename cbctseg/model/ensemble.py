"""Several model folders as one ensemble: the ensemble file, its checks, and which models a run uses.

An ensemble is a folder (a model tarball unpacked at /opt/ml/model, `weights/`, or a folder given with --weights)
holding `ensemble.json` and its members' model folders below it:

    {"format": 1,
     "models": [{"folder": "fullres", "folds": ["0", "1"], "weight": 1.0},
                {"folder": "coarse"}]}

`folder` is relative to the ensemble folder and stays inside it (no absolute path, no `..`, no symbolic link
leading out); it is a model folder or holds one as a model tarball may (`layout.locate_model`). `folds` (default:
all that the member's checksums.json declares) and `weight` (default 1; a finite number > 0, relative to the
others) are optional; nothing else is accepted, so a misspelt key is an error rather than a silent default.
Each member is a complete model folder with its own checksums.json, verified when it loads, and keeps its own
plans, configuration, preprocessing, spacing, patch, mirroring axes and trainer. The members' label maps must
be the same (`check_same_labels`), which is refused before any case runs.

`python -m cbctseg.model.ensemble DIR` checks an ensemble folder (or a single model folder) without torch.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cbctseg.model.layout import _visible, default_model_folder, gc_model_dir, is_empty, locate_model
from cbctseg.model.manifest import FOLD_NAME, ModelError, _norm

ENSEMBLE = "ensemble.json"
FORMAT = 1
TOP_KEYS = ("format", "models")
MEMBER_KEYS = ("folder", "folds", "weight")


@dataclass(frozen=True)
class Member:
    """One model of an ensemble: its folder, the folds to use (None: all it declares) and its relative weight."""

    folder: Path
    folds: tuple[str, ...] | None = None
    weight: float = 1.0
    name: str | None = None  # the folder as the ensemble file names it; None for a folder given on the command line

    @property
    def fold_list(self) -> list[str] | None:
        """The folds as load_model takes them."""
        return list(self.folds) if self.folds is not None else None

    def describe(self) -> dict:
        """The member in a report."""
        return {"folder": str(self.folder), "folds": self.fold_list, "weight": self.weight}


def normalised_weights(members: Sequence[Member]) -> list[float]:
    """Each member's share of the average (the weights divided by their sum)."""
    total = math.fsum(m.weight for m in members)
    return [m.weight / total for m in members]


def locate_ensemble(root: Path) -> Path | None:
    """The ensemble folder in root: root itself when it holds ensemble.json, else the one folder root holds when
    that one does (`tar czf model.tar.gz myensemble/`); None when there is no ensemble file there."""
    root = Path(root)
    if (root / ENSEMBLE).exists() or (root / ENSEMBLE).is_symlink():
        return root
    try:
        entries = _visible(root)  # packing debris (dot files, __MACOSX/) aside
    except OSError:
        return None
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / ENSEMBLE).exists():
        return entries[0]
    return None


def _folds(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ModelError(f"{where}: 'folds' must be a non-empty list of fold names such as [\"0\", \"1\"]")
    folds = []
    for f in value:
        if isinstance(f, int) and not isinstance(f, bool) and f >= 0:
            f = str(f)
        if not isinstance(f, str) or not FOLD_NAME.match(f):
            raise ModelError(f"{where}: fold {f!r} is not a fold name (letters, digits, '_' or '-', e.g. \"0\")")
        if f in folds:
            raise ModelError(f"{where}: fold {f!r} is listed twice")
        folds.append(f)
    return tuple(folds)


def _weight(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelError(f"{where}: 'weight' must be a number, not {value!r}")
    weight = float(value)
    if not math.isfinite(weight) or weight <= 0:
        raise ModelError(f"{where}: 'weight' must be a finite number > 0, not {value!r}")
    return weight


def _member_folder(root: Path, folder: object, where: str) -> Path:
    """The member's model folder below root; refuses paths that lead out of root, by name or by a link."""
    if not isinstance(folder, str) or not folder.strip():
        raise ModelError(f"{where}: 'folder' must be a path relative to {root}, not {folder!r}")
    rel = Path(folder)
    if rel.is_absolute() or folder.startswith(("/", "\\")):
        raise ModelError(f"{where}: folder {folder!r} is absolute; it must be relative to {root} and inside it")
    if ".." in rel.parts or "\\" in folder:
        raise ModelError(f"{where}: folder {folder!r} leads outside {root} ('..' or '\\' in it)")
    if rel.parts in ((), (".",)):
        raise ModelError(f"{where}: folder {folder!r} is the ensemble folder itself; each member sits in a folder "
                         f"below it")
    path = root / rel
    inside = root.resolve()
    if not path.resolve().is_relative_to(inside):
        raise ModelError(f"{where}: folder {folder!r} leads outside {root} (a symbolic link to {path.resolve()})")
    if not path.is_dir():
        raise ModelError(f"{where}: folder {folder!r} does not exist in {root}")
    if locate_ensemble(path) is not None:
        raise ModelError(f"{where}: folder {folder!r} is an ensemble itself; list its models instead")
    located = locate_model(path)  # the model itself, or the one model below it; else what it holds
    if not located.resolve().is_relative_to(inside):
        raise ModelError(f"{where}: the model in {folder!r} leads outside {root} (a symbolic link to "
                         f"{located.resolve()})")
    return located


def parse_ensemble(data: object, root: Path, where: str | None = None) -> list[Member]:
    """The members an ensemble file's JSON object describes, each checked; raises ModelError naming the problem."""
    root = Path(root)
    where = where or str(root / ENSEMBLE)
    if not isinstance(data, dict):
        raise ModelError(f"{where}: not a JSON object with a 'models' list")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ModelError(f"{where}: unknown key {unknown[0]!r} (an ensemble file has {', '.join(TOP_KEYS)})")
    if "format" in data and (isinstance(data["format"], bool) or data["format"] != FORMAT):
        raise ModelError(f"{where}: format {data['format']!r}, this engine reads format {FORMAT}")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ModelError(f"{where}: 'models' must be a non-empty list of {{\"folder\": ...}} objects")
    members: list[Member] = []
    seen: dict[Path, str] = {}
    for i, entry in enumerate(models):
        at = f"{where}: models[{i}]"
        if not isinstance(entry, dict):
            raise ModelError(f"{at} must be an object such as {{\"folder\": \"model_a\"}}")
        unknown = sorted(set(entry) - set(MEMBER_KEYS))
        if unknown:
            raise ModelError(f"{at}: unknown key {unknown[0]!r} (a member has {', '.join(MEMBER_KEYS)})")
        if "folder" not in entry:
            raise ModelError(f"{at}: no 'folder'")
        folds = _folds(entry["folds"], at) if "folds" in entry else None
        weight = _weight(entry["weight"], at) if "weight" in entry else 1.0
        folder = _member_folder(root, entry["folder"], at)
        key = folder.resolve()
        if key in seen:
            raise ModelError(f"{at}: folder {entry['folder']!r} is the same model as {seen[key]!r}; list a model "
                             f"once (its 'weight' counts it more)")
        seen[key] = entry["folder"]
        members.append(Member(folder, folds, weight, entry["folder"]))
    return members


def read_ensemble(root: Path) -> list[Member] | None:
    """The members of root's ensemble.json, checked (see the module); None when root holds no ensemble.json."""
    root = Path(root)
    path = root / ENSEMBLE
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_file():
        raise ModelError(f"{path}: not a regular file")
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8
        raise ModelError(f"{path}: unreadable as JSON ({e})") from None
    return parse_ensemble(data, root, str(path))


def ensemble_json(root: Path, members: Sequence[Member]) -> dict:
    """The ensemble file's object for members whose folders lie below root."""
    root = Path(root)
    models = []
    for m in members:
        folder = Path(m.folder)
        if folder.is_relative_to(root):
            folder = folder.relative_to(root)
        elif folder.resolve().is_relative_to(root.resolve()):
            folder = folder.resolve().relative_to(root.resolve())
        entry = {"folder": folder.as_posix()}
        if m.folds is not None:
            entry["folds"] = list(m.folds)
        entry["weight"] = m.weight
        models.append(entry)
    return {"format": FORMAT, "models": models}


def write_ensemble(root: Path, members: Sequence[Member]) -> Path:
    """Write root/ensemble.json for members below root (checked first, as a run reads it); atomically."""
    root = Path(root)
    data = ensemble_json(root, members)
    parse_ensemble(data, root, f"ensemble for {root}")
    path = root / ENSEMBLE
    tmp = path.with_name(f".{ENSEMBLE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def _labels_by_value(dataset_json: dict) -> dict[str, list[str]]:
    """label value (as JSON, so that a region's list compares too) -> the names with it."""
    labels = dataset_json.get("labels")
    out: dict[str, list[str]] = {}
    for name, value in (labels.items() if isinstance(labels, dict) else ()):
        if name == "ignore":  # nnU-Net's ignore label has no output channel: models with and without it agree
            continue
        out.setdefault(json.dumps(value), []).append(str(name))
    return {k: sorted(v, key=_norm) for k, v in out.items()}


def _value_order(key: str) -> tuple:
    value = json.loads(key)
    return (0, value, "") if isinstance(value, int) and not isinstance(value, bool) else (1, 0, key)


def check_same_labels(datasets: Sequence[tuple[str, dict]]) -> None:
    """Every member's dataset.json labels are the first member's: the same values with the same names (compared
    without regard to case and spacing; nnU-Net's `ignore` label aside, as it has no output channel).
    datasets: (where, dataset.json object) per member. Raises a ModelError naming both members and the first
    differing label value."""
    if len(datasets) < 2:
        return
    first_where, first = datasets[0]
    a = _labels_by_value(first)
    for where, ds in datasets[1:]:
        b = _labels_by_value(ds)
        for key in sorted(set(a) | set(b), key=_value_order):
            na, nb = a.get(key), b.get(key)
            if [_norm(n) for n in na or ()] == [_norm(n) for n in nb or ()]:
                continue
            if na and nb:
                detail = f"label {key} is {' / '.join(na)!r} in {first_where} but {' / '.join(nb)!r} in {where}"
            else:
                has, lacks = (first_where, where) if na else (where, first_where)
                detail = f"label {key} ({' / '.join(na or nb)!r}) is in {has} but not in {lacks}"
            raise ModelError(f"the ensemble's models label differently: {detail}; all must have the same labels")
        if first.get("regions_class_order") != ds.get("regions_class_order"):
            raise ModelError(f"the ensemble's models label differently: regions_class_order of {first_where} and "
                             f"{where} differ; all must have the same labels")


def _dataset_of(member: Member) -> tuple[str, dict]:
    try:
        folder = locate_model(member.folder)
    except ModelError:
        folder = Path(member.folder)  # load_model says what is wrong with it
    path = folder / "dataset.json"
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ModelError(f"model folder {folder}: missing dataset.json") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: unreadable as JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: not a JSON object")
    return str(path), data


def check_member_labels(members: Sequence[Member]) -> None:
    """The members' dataset.json labels agree (read before any network loads; load_model verifies each file's
    checksum and its labels against resources/labels.json afterwards)."""
    check_same_labels([_dataset_of(m) for m in members])


def _distinct(members: list[Member]) -> list[Member]:
    seen: dict[Path, Path] = {}
    for m in members:
        key = Path(m.folder).resolve()
        if key in seen:
            raise ModelError(f"--weights {m.folder} names the same model as --weights {seen[key]}; give a model once")
        seen[key] = m.folder
    return members


def _from_file(folder: Path, folds: Sequence[str] | None) -> list[Member]:
    if folds:
        raise ModelError(f"{folder} is an ensemble ({ENSEMBLE} lists its models and their folds); --folds applies "
                         f"to model folders given with --weights, not to an ensemble")
    members = read_ensemble(folder)
    assert members is not None
    return members


def members_for(weights: Sequence[Path] | Path | None, app_weights: Path,
                folds: Sequence[str] | None = None) -> list[Member]:
    """The models a run uses, each with its folds and weight:

    - several --weights: each folder is a member, weight 1, with --folds when given (an ensemble folder cannot be
      one of them);
    - one --weights folder: its ensemble.json's members when it holds one (also inside one folder), else that
      model;
    - no --weights: the same for the unpacked model tarball (gc_model_dir) when it holds something, else for the
      app's weights (`layout.default_model_folder`).
    The folders of single models are returned as given: `verify.verify_model` locates or refuses them.
    """
    if isinstance(weights, (str, Path)):
        weights = [Path(weights)]
    folds = tuple(str(f) for f in folds) if folds else None
    if not weights:
        place = Path(app_weights) if is_empty(gc_model_dir()) else gc_model_dir()
        ensemble = locate_ensemble(place)
        if ensemble is not None:
            return _from_file(ensemble, folds)
        return [Member(default_model_folder(Path(app_weights)), folds)]
    weights = [Path(w) for w in weights]
    if len(weights) == 1:
        ensemble = locate_ensemble(weights[0])
        if ensemble is not None:
            return _from_file(ensemble, folds)
        return [Member(weights[0], folds)]
    for w in weights:
        if locate_ensemble(w) is not None:
            raise ModelError(f"--weights {w} is an ensemble ({ENSEMBLE}); an ensemble cannot be one model of "
                             f"another: give it alone, or its models' folders with --weights each")
    return _distinct([Member(w, folds) for w in weights])


def main(argv: list[str] | None = None) -> int:
    """Check an ensemble folder (each member's manifest, files and labels, and that they agree) without torch; a
    folder without ensemble.json is checked as one model (`python -m cbctseg.model.manifest`)."""
    from cbctseg.model import manifest

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m cbctseg.model.ensemble FOLDER", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    try:
        ensemble = locate_ensemble(folder)
        if ensemble is None:
            return manifest.main([str(folder)])
        members = read_ensemble(ensemble)
        check_member_labels(members)
        for m in members:
            if manifest.main([str(m.folder)]) != 0:
                return 2
    except ModelError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    print(f"ensemble {ensemble}: {len(members)} models, weights "
          f"{', '.join(f'{m.name} {w:.3g}' for m, w in zip(members, normalised_weights(members)))}; labels agree",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
