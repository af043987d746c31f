"""A model folder's manifest, `checksums.json`: its folds, the sha256 of every file inference reads, demo or not.

Written when the weights are assembled (`process.py train`) or sealed (`process.py seal --weights DIR`), and
checked before any checkpoint is unpickled, so that a damaged, incomplete or swapped model never runs:

    {"format": 1, "demo": false, "folds": ["0", "1"],
     "configuration": "3d_fullres_...", "trainer": "nnUNetTrainer_...",
     "files": {"plans.json": {"sha256": "...", "bytes": 16877}, "dataset.json": {...},
               "fold_0/checkpoint_final.pth": {...}, "fold_1/checkpoint_final.pth": {...}}}

`folds` is what the model declares: every one must be present. `configuration` and `trainer` are for people
(the checkpoints say the same). Other files in the folder (provenance.json, compile_cache/) are not covered.
The labels of dataset.json are checked against resources/labels.json here too (`check_labels`).

`python -m cbctseg.model.manifest DIR` checks a folder without torch (the image build runs it on its weights).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "checksums.json"
FORMAT = 1
CHECKPOINT = "checkpoint_final.pth"
SMALL_FILES = ("plans.json", "dataset.json")
FOLD_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # fold_<name>/ stays inside the model folder
SEAL_HINT = "process.py seal --weights {folder}"
DEMO_WARNING = ("model folder {folder} holds DEMO weights ({manifest} says \"demo\": true), not for patients: the "
                "bundled ones were trained on synthetic phantoms and segment phantoms at best. Real use needs real "
                "weights (README, 'The demo weights').")


class ModelError(ValueError):
    """The model folder is missing, incomplete, damaged or inconsistent."""


@dataclass
class Manifest:
    """What a model folder declares: its folds, and the size and sha256 of each file inference reads."""

    folds: list[str]
    files: dict[str, dict]  # relative path -> {"sha256": hex, "bytes": size}
    demo: bool = False
    configuration: str | None = None
    trainer: str | None = None
    extra: dict = field(default_factory=dict)  # unknown keys of a newer writer, kept on rewrite

    def to_json(self) -> dict:
        return {"format": FORMAT, "demo": self.demo, "folds": self.folds, "configuration": self.configuration,
                "trainer": self.trainer, "files": self.files, **self.extra}


def checkpoint_of(fold: str) -> str:
    """A fold's checkpoint, relative to the model folder."""
    return f"fold_{fold}/{CHECKPOINT}"


def sha256_file(path: Path) -> str:
    """sha256 of a file, streamed (about 0.8 GB/s on one CPU core)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def build_manifest(folder: Path, folds: list[str], demo: bool = False, configuration: str | None = None,
                   trainer: str | None = None) -> Manifest:
    """Hash plans.json, dataset.json and each fold's checkpoint as they are now."""
    folder = Path(folder)
    folds = [str(f) for f in folds]
    if not folds:
        raise ModelError(f"model folder {folder}: no fold_*/{CHECKPOINT} to record")
    files = {}
    for name in (*SMALL_FILES, *(checkpoint_of(f) for f in folds)):
        path = folder / name
        if not path.is_file():
            raise ModelError(f"model folder {folder}: missing {name}")
        files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return Manifest(folds, files, demo, configuration, trainer)


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write `checksums.json` atomically (a temporary name, then a rename)."""
    path = Path(folder) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(folder: Path) -> Manifest:
    """The folder's manifest; a missing or malformed one is a ModelError that says how to make one."""
    folder = Path(folder)
    path = folder / MANIFEST
    hint = SEAL_HINT.format(folder=folder)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ModelError(f"model folder {folder} has no {MANIFEST} (its folds and their sha256), so it cannot be "
                         f"checked: once you know its weights are the ones to run, write one with `{hint}`") from None
    except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8
        raise ModelError(f"{path}: unreadable ({e}); write it again with `{hint}`") from None
    try:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TypeError(f"format {data.get('format') if isinstance(data, dict) else None!r}, expected {FORMAT}")
        folds = data["folds"]
        files = data["files"]
        if not (isinstance(folds, list) and folds and all(isinstance(f, str) and FOLD_NAME.match(f) for f in folds)
                and len(set(folds)) == len(folds)):
            raise TypeError("'folds' must be a non-empty list of distinct fold names such as \"0\" or \"all\"")
        if not isinstance(files, dict):
            raise TypeError("'files' must be an object")
        for name, entry in files.items():
            if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                    and isinstance(entry.get("bytes"), int)):
                raise TypeError(f"files[{name!r}] must be {{'sha256': hex, 'bytes': int}}")
        for name in (*SMALL_FILES, *(checkpoint_of(f) for f in folds)):
            if name not in files:
                raise TypeError(f"no checksum of {name}")
        if not isinstance(data.get("demo", False), bool):
            raise TypeError("'demo' must be true or false")
    except (KeyError, TypeError) as e:
        raise ModelError(f"{path}: not a model manifest ({e}); write it again with `{hint}`") from None
    known = {"format", "demo", "folds", "configuration", "trainer", "files"}
    return Manifest(folds, files, data.get("demo", False), data.get("configuration"), data.get("trainer"),
                    {k: v for k, v in data.items() if k not in known})


def select_folds(folder: Path, manifest: Manifest, requested: list[str] | None) -> list[str]:
    """The folds to load: all the model declares, or those asked for, each of which it must declare."""
    if not requested:
        return list(manifest.folds)
    requested = [str(f) for f in requested]
    unknown = [f for f in requested if f not in manifest.folds]
    if unknown:
        raise ModelError(f"model folder {folder}: fold {unknown[0]} is not one of its folds "
                         f"({', '.join(manifest.folds)}, as {MANIFEST} declares)")
    return requested


def check_present(folder: Path, manifest: Manifest, names: list[str]) -> None:
    """Every named file is present with the recorded size (cheap: no file is read)."""
    folder = Path(folder)
    for name in names:
        path = folder / name
        if not path.is_file():
            raise ModelError(f"model folder {folder}: missing {name}; the model declares folds "
                             f"{', '.join(manifest.folds)} ({MANIFEST})")
        size, recorded = path.stat().st_size, manifest.files[name]["bytes"]
        if size != recorded:
            raise ModelError(f"model folder {folder}: {name} has {size} bytes, {MANIFEST} recorded {recorded}: "
                             f"the file is damaged or not the one the model was sealed with")


def check_hashes(folder: Path, manifest: Manifest, names: list[str]) -> None:
    """Every named file has the recorded sha256."""
    folder = Path(folder)
    for name in names:
        digest, recorded = sha256_file(folder / name), manifest.files[name]["sha256"]
        if digest != recorded:
            raise ModelError(f"model folder {folder}: {name} does not match {MANIFEST} (sha256 {digest[:16]}..., "
                             f"recorded {recorded[:16]}...): the file is damaged or not the one the model was "
                             f"sealed with")


def _norm(name: str) -> str:
    return " ".join(str(name).split()).casefold()


def check_labels(dataset_json: dict, where: str) -> None:
    """dataset.json's labels are resources/labels.json's, one value per structure, in its order (names compared
    without regard to case and spacing); raises a ModelError naming the first mismatch."""
    from cbctseg.resources import label_map

    lm = label_map()
    if "regions_class_order" in dataset_json:
        raise ModelError(f"{where}: a region-based model (regions_class_order); this engine needs one label value "
                         f"per structure, as in resources/labels.json")
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict):
        raise ModelError(f"{where}: no 'labels' object")
    got = []
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise ModelError(f"{where}: label {name!r} is a region {list(value)}; this engine needs one label value "
                             f"per structure, as in resources/labels.json")
        if not isinstance(value, int) or isinstance(value, bool):
            raise ModelError(f"{where}: label {name!r} has value {value!r}, not an integer")
        got.append((value, name))
    got.sort()
    expected = [(0, "background"), *zip(lm.labels, lm.names)]
    ignore = [(v, n) for v, n in got if n == "ignore"]
    if ignore and ignore[0][0] != len(expected):
        raise ModelError(f"{where}: the 'ignore' label is {ignore[0][0]}, expected {len(expected)} (after the "
                         f"{len(expected) - 1} structures of resources/labels.json)")
    got = [(v, n) for v, n in got if n != "ignore"]
    for i, (value, name) in enumerate(expected):
        if i >= len(got):
            raise ModelError(f"{where}: no label {value} ({name!r} in resources/labels.json); the model has "
                             f"{len(got) - 1} structures, resources/labels.json {len(expected) - 1}")
        g_value, g_name = got[i]
        if g_value != value:
            raise ModelError(f"{where}: no label {value} ({name!r} in resources/labels.json); the next label is "
                             f"{g_value} ({g_name!r})")
        if _norm(g_name) != _norm(name):
            raise ModelError(f"{where}: label {value} is {g_name!r}, resources/labels.json names it {name!r}")
    if len(got) > len(expected):
        value, name = got[len(expected)]
        raise ModelError(f"{where}: label {value} ({name!r}) is not in resources/labels.json "
                         f"({len(expected) - 1} structures)")


def verify_folder(folder: Path, folds: list[str] | None = None, manifest: Manifest | None = None
                  ) -> tuple[Manifest, list[str]]:
    """All checks that need no unpickling, cheapest first: the manifest, the folds it declares (or those asked
    for), every file present with its size, plans.json and dataset.json hashed, the labels, then the checkpoints
    hashed. Returns the manifest and the folds to load."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    folds = select_folds(folder, manifest, folds)
    checkpoints = [checkpoint_of(f) for f in folds]
    check_present(folder, manifest, [*SMALL_FILES, *checkpoints])
    check_hashes(folder, manifest, list(SMALL_FILES))
    try:
        dataset_json = json.loads((folder / "dataset.json").read_bytes())
    except ValueError as e:
        raise ModelError(f"{folder / 'dataset.json'}: not valid JSON ({e})") from None
    if not isinstance(dataset_json, dict):
        raise ModelError(f"{folder / 'dataset.json'}: not a JSON object")
    check_labels(dataset_json, str(folder / "dataset.json"))
    check_hashes(folder, manifest, checkpoints)
    return manifest, folds


def undeclared_folds(folder: Path, manifest: Manifest) -> list[str]:
    """Folds with a checkpoint in the folder that the manifest does not declare (they are not used)."""
    found = [p.parent.name[len("fold_"):] for p in Path(folder).glob(f"fold_*/{CHECKPOINT}")]
    return sorted(f for f in found if f not in manifest.folds)


def main(argv: list[str] | None = None) -> int:
    """Check a model folder's manifest, files and labels (no torch needed); a loud banner for demo weights."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m cbctseg.model.manifest MODEL_FOLDER", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    try:
        manifest, folds = verify_folder(folder)
    except ModelError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    print(f"model {folder}: folds {', '.join(folds)} match {MANIFEST}; labels match resources/labels.json",
          file=sys.stderr)
    if manifest.demo:
        bar = "#" * 100
        print(f"{bar}\nWARNING: {DEMO_WARNING.format(folder=folder, manifest=MANIFEST)}\n{bar}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

