"""Raw ToothFairy2 folder (FDI label values) -> nnU-Net raw dataset with contiguous labels 0..42."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from cbctseg.resources import label_map

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """The raw dataset is missing or malformed."""


def find_cases(raw_dir: Path) -> list[tuple[str, Path, Path]]:
    """(case name, image path, label path) for every case of a raw ToothFairy2 folder, sorted by name."""
    raw_dir = Path(raw_dir)
    images_dir, labels_dir = raw_dir / "imagesTr", raw_dir / "labelsTr"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise DatasetError(f"{raw_dir}: missing folder {d.name}/ (expected imagesTr/*_0000.mha and labelsTr/*.mha)")
    images = {p.name[: -len("_0000.mha")]: p for p in images_dir.glob("*_0000.mha")}
    labels = {p.name[: -len(".mha")]: p for p in labels_dir.glob("*.mha")}
    if not images:
        raise DatasetError(f"{images_dir}: no *_0000.mha images")
    if images.keys() != labels.keys():
        missing = sorted(images.keys() ^ labels.keys())[:5]
        raise DatasetError(f"{raw_dir}: images and labels do not pair up, e.g. {missing}")
    return [(name, images[name], labels[name]) for name in sorted(images)]


def convert_label(label_path: Path, out_path: Path) -> None:
    """Map one FDI label file to contiguous labels; unknown values raise an error naming file and values."""
    lut = label_map().to_contiguous_lut()
    img = sitk.ReadImage(str(label_path))
    arr = sitk.GetArrayViewFromImage(img)
    values = np.unique(arr)
    unknown = [int(v) for v in values if v < 0 or v > 255 or lut[int(v)] < 0]
    if unknown:
        raise DatasetError(f"{label_path}: unknown label values {unknown} (expected 0 and the FDI values of "
                           "resources/labels.json)")
    out = sitk.GetImageFromArray(lut[arr.astype(np.int64)].astype(np.uint8))
    out.CopyInformation(img)
    _write_atomic(out, out_path)


def _write_atomic(img: sitk.Image, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.mha")
    sitk.WriteImage(img, str(tmp), useCompression=True)
    os.replace(tmp, path)


def dataset_json(num_training: int) -> dict:
    """nnU-Net's dataset.json for the contiguous ToothFairy2 labels."""
    lm = label_map()
    labels = {"background": 0, **{name: lab for name, lab in zip(lm.names, lm.labels)}}
    return {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": num_training, "file_ending": ".mha",
            "name": "ToothFairy2 (contiguous labels; FDI 21-28 -> 19-26, 31-38 -> 27-34, 41-48 -> 35-42)"}


def convert_dataset(raw_dir: Path, out_dir: Path) -> Path:
    """Write the nnU-Net raw dataset to out_dir (skipped when complete; resumes a partial conversion)."""
    out_dir = Path(out_dir)
    cases = find_cases(raw_dir)
    if (out_dir / "dataset.json").is_file():
        n = json.loads((out_dir / "dataset.json").read_text())["numTraining"]
        if n == len(cases):
            log.info("convert: %s already holds %d cases, skipped", out_dir, n)
            return out_dir
        raise DatasetError(f"{out_dir} holds {n} cases but {raw_dir} has {len(cases)}: remove it to convert again")
    partial = out_dir.with_name(out_dir.name + ".partial")
    (partial / "imagesTr").mkdir(parents=True, exist_ok=True)
    (partial / "labelsTr").mkdir(parents=True, exist_ok=True)
    for name, image, label in tqdm(cases, desc="convert", unit="case"):
        out_img, out_lab = partial / "imagesTr" / f"{name}_0000.mha", partial / "labelsTr" / f"{name}.mha"
        if not out_lab.exists():
            convert_label(label, out_lab)
        if not out_img.exists():
            try:
                os.link(image, out_img)
            except OSError:
                shutil.copyfile(image, out_img)
    (partial / "dataset.json").write_text(json.dumps(dataset_json(len(cases)), indent=1))
    os.replace(partial, out_dir)
    log.info("convert: %d cases -> %s", len(cases), out_dir)
    return out_dir
