"""`process.py ensemble`: assemble an ensemble folder from model folders, ready to pack as a model tarball.

    process.py ensemble --out ENSEMBLE --member A [--folds 0 1] [--weight 2] --member B ...

Each member is verified first as a run verifies it, without torch (its checksums.json, every file's sha256, its
labels against resources/labels.json), and the members' labels must agree. Then each is copied to
`ENSEMBLE/<its folder name>/` with plans.json, dataset.json, the chosen folds' checkpoints, provenance.json when
there is one, and its manifest restricted to those folds (the recorded sha256 unchanged, checked again on the
copy); `ENSEMBLE/ensemble.json` lists them with their folds and weights. The folder is built under a temporary
name beside it and renamed, so an interrupted build leaves no half ensemble. Pack it with
`tar -C ENSEMBLE -czf model.tar.gz .`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from cbctseg.model.ensemble import ENSEMBLE, Member, check_same_labels, locate_ensemble, write_ensemble
from cbctseg.model.layout import is_empty, locate_model
from cbctseg.model.manifest import (SMALL_FILES, Manifest, ModelError, checkpoint_of, verify_folder,
                                    write_manifest)

log = logging.getLogger(__name__)
EXTRA_FILES = ("provenance.json",)  # copied when present; not covered by the manifest


@dataclass
class MemberSpec:
    """A model folder to put in the ensemble, with its folds (None: all it declares) and weight."""

    source: Path
    folds: list[str] | None = None
    weight: float = 1.0


def _name(folder: Path, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", folder.resolve().name).strip("._") or "model"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


def _copy_member(folder: Path, manifest: Manifest, folds: list[str], dest: Path) -> None:
    """The files a run reads for these folds, and the manifest restricted to them (same sha256)."""
    names = [*SMALL_FILES, *(checkpoint_of(f) for f in folds)]
    for name in [*names, *(n for n in EXTRA_FILES if (folder / n).is_file())]:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / name, dest / name)
    write_manifest(dest, Manifest(list(folds), {n: manifest.files[n] for n in names}, manifest.demo,
                                  manifest.configuration, manifest.trainer, manifest.extra))
    verify_folder(dest, folds)  # the copies hash as recorded


def build_ensemble(out: Path, specs: list[MemberSpec]) -> list[Member]:
    """Verify the members, copy them below `out` and write its ensemble.json; returns the members written.

    `out` must not exist or be empty. Raises ModelError (nothing left behind) when a member is not a verified
    model, an ensemble itself, given twice, or labels differently from the others.
    """
    out = Path(out)
    if not specs:
        raise ModelError("an ensemble needs at least one --member")
    if out.exists() and not (out.is_dir() and is_empty(out)):
        raise ModelError(f"{out} exists and is not an empty folder; the ensemble goes to a new folder")
    checked, seen, labels = [], {}, []
    for spec in specs:
        if locate_ensemble(spec.source) is not None:
            raise ModelError(f"--member {spec.source} is an ensemble ({ENSEMBLE}); give its models instead")
        folder = locate_model(spec.source)
        key = folder.resolve()
        if key in seen:
            raise ModelError(f"--member {spec.source} is the same model as --member {seen[key]}; give a model once "
                             f"(--weight counts it more)")
        seen[key] = spec.source
        manifest, folds = verify_folder(folder, spec.folds)
        labels.append((str(folder / "dataset.json"), json.loads((folder / "dataset.json").read_bytes())))
        checked.append((spec, folder, manifest, folds))
    check_same_labels(labels)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        taken: set[str] = set()
        members = []
        for spec, folder, manifest, folds in checked:
            name = _name(folder, taken)
            _copy_member(folder, manifest, folds, tmp / name)
            members.append(Member(tmp / name, tuple(folds), spec.weight, name))
        write_ensemble(tmp, members)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [Member(out / m.name, m.folds, m.weight, m.name) for m in members]


class _MemberAction(argparse.Action):
    """--member starts a member; --folds and --weight after it belong to it."""

    def __call__(self, parser, namespace, values, option_string=None):
        members = list(getattr(namespace, "members", None) or [])
        if self.dest == "source":
            members.append(MemberSpec(Path(values)))
        elif not members:
            parser.error(f"{option_string} belongs to a --member: give it after that --member")
        elif self.dest == "folds":
            members[-1].folds = [str(v) for v in values]
        else:
            members[-1].weight = values
        namespace.members = members


def _weight(value: str) -> float:
    try:
        w = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not (w > 0 and w != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, not {value!r}")
    return w


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `ensemble` subcommand's arguments."""
    p.add_argument("--out", type=Path, required=True, help="the ensemble folder to write (new or empty)")
    p.add_argument("--member", dest="source", action=_MemberAction, required=True, metavar="MODEL_FOLDER",
                   help="a model folder (with its checksums.json), or a folder holding one; repeat for each model")
    p.add_argument("--folds", dest="folds", nargs="+", action=_MemberAction, metavar="FOLD",
                   help="after a --member: the folds of that model to use (default: all it declares)")
    p.add_argument("--weight", dest="weight", type=_weight, action=_MemberAction,
                   help="after a --member: its weight in the average (default 1; relative to the others)")
    p.set_defaults(members=[])


def run_from_args(args: argparse.Namespace) -> int:
    """Build the ensemble; 0 and a JSON summary on stdout, 2 and a message when a member is refused."""
    try:
        members = build_ensemble(args.out, args.members)
    except ModelError as e:
        log.error("ensemble: %s", e)
        return 2
    except OSError as e:
        log.error("ensemble: cannot write %s: %s", args.out, e)
        return 2
    log.info("ensemble: %s written with %d models (%s); pack it with `tar -C %s -czf model.tar.gz .`",
             args.out / ENSEMBLE, len(members), ", ".join(m.name for m in members), args.out)
    print(json.dumps({"ensemble": str(args.out), "models": [m.describe() for m in members]}))
    return 0
