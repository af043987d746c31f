"""grand-challenge I/O: find the input cases, read and check a CBCT volume, write label maps and results.json."""
from __future__ import annotations

import json
import os
import signal
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
import SimpleITK as sitk

from cbctseg.io import metaimage
from cbctseg.resources import task

MAX_VOXELS = 1024**3
MIN_SIZE = 8
ACCEPTED_PIXEL_IDS = {
    sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32,
    sitk.sitkUInt64, sitk.sitkInt64, sitk.sitkFloat32, sitk.sitkFloat64,
}


# temporary files in the output folders: short, unique per call and process, never a name a reader takes
TEMP_PREFIX = ".cbctseg-"
_UMASK = os.umask(0o022)  # read once (os.umask only reads by setting)
os.umask(_UMASK)
_temporary_files: set[str] = set()
results_written = False  # whether this process wrote a results.json


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

    def without_voxels(self) -> Volume:
        """The same shape and geometry, holding no voxels (array: a read-only zero-strided view of one zero): all
        that writing the label map needs once the image has been preprocessed."""
        return replace(self, array=np.broadcast_to(np.zeros((), dtype=np.float32), self.array.shape))

    @property
    def nnunet_properties(self) -> dict:
        """The properties dict nnU-Net's SimpleITKIO would give for this image."""
        return {"sitk_stuff": {"spacing": self.spacing, "origin": self.origin, "direction": self.direction},
                "spacing": list(self.spacing)[::-1]}


def _read_inputs_json(path: Path) -> object:
    """The parsed inputs.json; anything that is not a readable UTF-8 JSON file raises InputError."""
    try:
        fd = metaimage.open_regular(path)
    except metaimage.MetaImageError as e:
        raise InputError(f"{path}: {e}") from e
    try:
        with os.fdopen(fd, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from e
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    except RecursionError as e:
        raise InputError(f"{path}: nested too deeply to be grand-challenge's list of inputs") from e


def _json_kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _relative_folder(root: Path, where: str, value: object) -> Path:
    """root / value for an interface's relative_path that stays inside root; else InputError."""
    if not isinstance(value, str):
        raise InputError(f"{where}: relative_path is {_json_kind(value)}, expected a string")
    rel = PurePosixPath(value)
    if "\x00" in value or "\\" in value or rel.is_absolute() or ".." in rel.parts:
        raise InputError(f"{where}: relative_path {value!r} leads outside {root}; only folders inside it are read")
    return root / rel


def _inputs_json_folders(root: Path) -> list[Path]:
    """Folders named by /input/inputs.json for our image interfaces (newer grand-challenge templates)."""
    path = root / "inputs.json"
    entries = _read_inputs_json(path)
    if not isinstance(entries, list):
        raise InputError(f"{path}: {_json_kind(entries)}, expected a list of inputs")
    slugs = set(task()["input_slugs"])
    folders: list[Path] = []
    for i, entry in enumerate(entries):
        where = f"{path}: input {i}"
        if not isinstance(entry, dict):
            raise InputError(f"{where} is {_json_kind(entry)}, expected an object")
        interface = entry.get("interface", {})
        if not isinstance(interface, dict):
            raise InputError(f"{where}: interface is {_json_kind(interface)}, expected an object")
        for key in ("slug", "kind"):
            if not isinstance(interface.get(key, ""), str):
                raise InputError(f"{where}: interface {key} is {_json_kind(interface[key])}, expected a string")
        if interface.get("slug") in slugs or (interface.get("kind") == "Image" and len(entries) == 1):
            folder = _relative_folder(root, where, interface.get("relative_path", task()["input_folder"]))
            if folder not in folders:
                folders.append(folder)
    if not folders:
        raise InputError(f"{path}: no input with interface {sorted(slugs)}")
    return folders


def find_cases(input_root: Path, output_root: Path) -> list[Case]:
    """The cases to process: inputs.json when present, else images/cbct/*.mha, else *.mha in the folder.

    Every *.mha found is a case, also one that is not a regular file: reading it fails with a message.
    """
    input_root, output_root = Path(input_root), Path(output_root)
    out_dir = output_root / task()["output_folder"]
    if input_root.is_file():
        files = [input_root]
    elif not input_root.is_dir():
        if os.path.lexists(input_root):
            raise InputError(f"input {input_root} is neither a regular file nor a folder")
        raise InputError(f"input {input_root} does not exist")
    elif os.path.lexists(input_root / "inputs.json"):
        files = [f for d in _inputs_json_folders(input_root) for f in sorted(d.glob("*.mha"))]
    elif (input_root / task()["input_folder"]).is_dir():
        files = sorted((input_root / task()["input_folder"]).glob("*.mha"))
    else:
        files = sorted(input_root.glob("*.mha"))
    if not files:
        raise InputError(f"no .mha input found in {input_root} (looked for inputs.json, "
                         f"{task()['input_folder']}/*.mha and *.mha)")
    return [Case(f.name, f, out_dir / f.name) for f in files]


def check_header(path: Path) -> metaimage.MetaHeader:
    """The MetaImage header of `path`, checked before SimpleITK opens anything: a regular file, voxel data only in
    it or in a regular file beside it, a plausible 3-D single-component size (computed without overflow), and
    data at least as large as the header says. Raises InputError naming the file."""
    path = Path(path)
    try:
        header, file_size = metaimage.read_header(path)
    except metaimage.MetaImageError as e:
        raise InputError(f"{path.name}: {e}") from e
    if header.ndims != 3:
        raise InputError(f"{path.name}: a {header.ndims}-D image; a CBCT volume is 3-D")
    if header.channels != 1:
        raise InputError(f"{path.name}: {header.channels} components per voxel; a CBCT volume has one")
    if min(header.dim_size) < MIN_SIZE or header.voxels > MAX_VOXELS:
        raise InputError(f"{path.name}: size {header.dim_size} is not a plausible CBCT volume "
                         f"(at least {MIN_SIZE} voxels per axis, at most {MAX_VOXELS} in all)")
    if header.element_type not in metaimage.ELEMENT_BYTES:
        raise InputError(f"{path.name}: pixel type {header.element_type} is not an integer or real scalar")
    try:
        metaimage.check_data(header, file_size)
    except metaimage.MetaImageError as e:
        raise InputError(f"{path.name}: {e}") from e
    return header


def read_volume(path: Path) -> Volume:
    """Read and check one CBCT volume; anything that cannot be one raises InputError naming the file."""
    path = Path(path)
    check_header(path)
    try:
        reader = sitk.ImageFileReader()
        reader.SetImageIO("MetaImageIO")  # the format whose header was checked, whatever else the bytes could be
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
    voxels = 1
    for s in size:
        voxels *= int(s)
    if min(size) < MIN_SIZE or voxels > MAX_VOXELS:
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


def temporary_file(folder: Path, suffix: str) -> Path:
    """A new empty file with a short unique hidden name in `folder` (on the same file system as the final name,
    so a rename finishes it). It is listed for `remove_temporary_files` until `release_temporary_file`; SIGTERM
    and SIGINT are held while it is made, so no signal falls between its creation and that list."""
    held = {signal.SIGTERM, signal.SIGINT}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=suffix)
        os.close(fd)
        _temporary_files.add(name)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return Path(name)


def release_temporary_file(tmp: Path, renamed: bool = False) -> None:
    """Forget `tmp`, removing it unless it was renamed to its final name (then its name may be another's now)."""
    if not renamed:
        Path(tmp).unlink(missing_ok=True)
    _temporary_files.discard(str(tmp))


def remove_temporary_files() -> None:
    """Remove every temporary file of this process still in an output folder (after an interruption)."""
    for name in list(_temporary_files):
        release_temporary_file(Path(name))


def _finish(tmp: Path, path: Path) -> bool:
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; the output gets the mode a plain open() would give
    os.replace(tmp, path)
    return True


def write_label_map(labels: np.ndarray, like: Volume, path: Path) -> None:
    """Write a uint8 label map on the input's exact grid, atomically: only a complete file ever has the name.

    The file is written under a temporary name in the output folder, then renamed: no temporary folder elsewhere
    is needed, any input name length works, and processes sharing the folder never share a temporary name.
    """
    if labels.shape != like.array.shape:
        raise ValueError(f"label map shape {labels.shape} differs from the input's {like.array.shape}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(labels, dtype=np.uint8))
    img.SetSpacing(like.spacing)
    img.SetOrigin(like.origin)
    img.SetDirection(like.direction)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # MetaImageIO writes one file with the data inline only for a name ending in .mha (else .mhd + .zraw)
    tmp, renamed = temporary_file(path.parent, ".partial.mha"), False
    try:
        writer = sitk.ImageFileWriter()
        writer.SetImageIO("MetaImageIO")
        writer.SetFileName(str(tmp))
        writer.UseCompressionOn()
        writer.Execute(img)
        renamed = _finish(tmp, path)
    finally:
        release_temporary_file(tmp, renamed)


def case_result(case: Case, error: str | None = None) -> dict:
    """One entry of results.json, as evalutils 0.4.2's SegmentationAlgorithm writes it."""
    return {
        "outputs": [] if error else [{"type": "metaio_image", "filename": case.output_path.name}],
        "inputs": [{"type": "metaio_image", "filename": case.name}],
        "error_messages": [error] if error else [],
    }


def run_error_result(error: str) -> dict:
    """The one entry of results.json when the run failed before it knew its cases (e.g. a bad inputs.json)."""
    return {"outputs": [], "inputs": [], "error_messages": [error]}


def write_results(results: list[dict], output_root: Path) -> Path:
    """/output/results.json, written atomically."""
    output_root = Path(output_root)
    output_root.mkdir(parents=True, exist_ok=True)
    path = output_root / "results.json"
    tmp, renamed = temporary_file(output_root, ".json.partial"), False
    try:
        tmp.write_text(json.dumps(results, indent=2))
        renamed = _finish(tmp, path)
    finally:
        release_temporary_file(tmp, renamed)
    global results_written
    results_written = True
    return path
