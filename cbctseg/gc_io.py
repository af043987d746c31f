"""grand-challenge I/O: find the input cases, read and check a CBCT volume, write label maps and results.json."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .resources import task

MAX_VOXELS = 1024**3
MIN_SIZE = 8
ACCEPTED_PIXEL_IDS = {
    sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32,
    sitk.sitkUInt64, sitk.sitkInt64, sitk.sitkFloat32, sitk.sitkFloat64,
}


class InputError(ValueError):
    """A case that cannot be a CBCT volume; the message names the file."""


@dataclass(frozen=True)
class Case:
    """One input volume and where its label map goes."""

    name: str  # file name, e.g. "abc.mha"
    path: Path
    output_path: Path


@dataclass
class Volume:
    """A checked CBCT volume: array (z, y, x) float32 and its SimpleITK geometry (x, y, z order)."""

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @property
    def nnunet_properties(self) -> dict:
        """The properties dict nnU-Net's SimpleITKIO would give for this image."""
        return {"sitk_stuff": {"spacing": self.spacing, "origin": self.origin, "direction": self.direction},
                "spacing": list(self.spacing)[::-1]}


def _inputs_json_folders(root: Path) -> list[Path]:
    """Folders named by /input/inputs.json for our image interfaces (newer grand-challenge templates)."""
    try:
        entries = json.loads((root / "inputs.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{root / 'inputs.json'}: cannot be read as JSON ({e})") from e
    slugs = set(task()["input_slugs"])
    folders = []
    for entry in entries if isinstance(entries, list) else []:
        interface = entry.get("interface", {}) if isinstance(entry, dict) else {}
        if interface.get("slug") in slugs or (interface.get("kind") == "Image" and len(entries) == 1):
            folders.append(root / interface.get("relative_path", task()["input_folder"]))
    if not folders:
        raise InputError(f"{root / 'inputs.json'}: no input with interface {sorted(slugs)}")
    return folders


def find_cases(input_root: Path, output_root: Path) -> list[Case]:
    """The cases to process: inputs.json when present, else images/cbct/*.mha, else *.mha in the folder."""
    input_root, output_root = Path(input_root), Path(output_root)
    out_dir = output_root / task()["output_folder"]
    if input_root.is_file():
        files = [input_root]
    elif not input_root.is_dir():
        raise InputError(f"input {input_root} does not exist")
    elif (input_root / "inputs.json").is_file():
        files = [f for d in _inputs_json_folders(input_root) for f in sorted(d.glob("*.mha"))]
    elif (input_root / task()["input_folder"]).is_dir():
        files = sorted((input_root / task()["input_folder"]).glob("*.mha"))
    else:
        files = sorted(input_root.glob("*.mha"))
    if not files:
        raise InputError(f"no .mha input found in {input_root} (looked for inputs.json, "
                         f"{task()['input_folder']}/*.mha and *.mha)")
    return [Case(f.name, f, out_dir / f.name) for f in files]


def read_volume(path: Path) -> Volume:
    """Read and check one CBCT volume; anything that cannot be one raises InputError naming the file."""
    path = Path(path)
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        dim, ncomp = reader.GetDimension(), reader.GetNumberOfComponents()
        size = reader.GetSize()
    except RuntimeError as e:
        raise InputError(f"{path.name}: not a readable image ({_first_line(e)})") from e
    if dim != 3:
        raise InputError(f"{path.name}: a {dim}-D image; a CBCT volume is 3-D")
    if ncomp != 1:
        raise InputError(f"{path.name}: {ncomp} components per voxel; a CBCT volume has one")
    if min(size) < MIN_SIZE or int(np.prod(size, dtype=np.int64)) > MAX_VOXELS:
        raise InputError(f"{path.name}: size {tuple(size)} is not a plausible CBCT volume "
                         f"(at least {MIN_SIZE} voxels per axis, at most {MAX_VOXELS} in all)")
    if reader.GetPixelID() not in ACCEPTED_PIXEL_IDS:
        raise InputError(f"{path.name}: pixel type {sitk.GetPixelIDValueAsString(reader.GetPixelID())} "
                         "is not an integer or real scalar")
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise InputError(f"{path.name}: image data cannot be read, the file may be truncated ({_first_line(e)})") from e
    spacing = tuple(float(s) for s in img.GetSpacing())
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise InputError(f"{path.name}: invalid spacing {spacing}")
    arr = sitk.GetArrayFromImage(img)
    if arr.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise InputError(f"{path.name}: {bad} non-finite voxel(s) (NaN or infinity)")
    return Volume(arr.astype(np.float32, copy=False), spacing, tuple(img.GetOrigin()), tuple(img.GetDirection()))


def _first_line(e: Exception) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return lines[-1] if lines else type(e).__name__


def write_label_map(labels: np.ndarray, like: Volume, path: Path) -> None:
    """Write a uint8 label map on the input's exact grid, atomically: only a complete file ever has the name."""
    if labels.shape != like.array.shape:
        raise ValueError(f"label map shape {labels.shape} differs from the input's {like.array.shape}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(labels, dtype=np.uint8))
    img.SetSpacing(like.spacing)
    img.SetOrigin(like.origin)
    img.SetDirection(like.direction)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with tempfile.TemporaryDirectory(prefix="cbctseg-") as tmp:
        # SimpleITK picks the format from the extension, so write a .mha elsewhere, then copy under a name no
        # reader picks up and rename on the output file system.
        tmp_file = Path(tmp) / path.name
        sitk.WriteImage(img, str(tmp_file), useCompression=True)
        shutil.copyfile(tmp_file, partial)
    os.replace(partial, path)


def case_result(case: Case, error: str | None = None) -> dict:
    """One entry of results.json, as evalutils 0.4.2's SegmentationAlgorithm writes it."""
    return {
        "outputs": [] if error else [{"type": "metaio_image", "filename": case.output_path.name}],
        "inputs": [{"type": "metaio_image", "filename": case.name}],
        "error_messages": [error] if error else [],
    }


def write_results(results: list[dict], output_root: Path) -> Path:
    """/output/results.json, written atomically."""
    output_root = Path(output_root)
    output_root.mkdir(parents=True, exist_ok=True)
    path = output_root / "results.json"
    tmp = output_root / ".results.json.partial"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)
    return path
