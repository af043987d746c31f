"""Export a model folder's folds as a Triton model repository (ONNX or TorchScript), checked against PyTorch.

Layout: `<out>/cbctseg_fold_<f>/config.pbtxt` and `<out>/cbctseg_fold_<f>/1/model.onnx` (or `model.pt`).
Tensors travel as fp16, `input` (B, 1, *patch) and `logits` (B, C, *patch); the casts are part of the
exported graph and the network computes in fp32 inside, so fp16 only halves the bytes on the wire. Each
config carries the sha256 of the weights it was made from (`cbctseg_weights_sha256`): the client checks
it before the first request, so a server left on another model version fails loudly, not subtly.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from cbctseg.model.loading import CHECKPOINT, Model, ModelError, load_model

log = logging.getLogger(__name__)

MODEL_PREFIX = "cbctseg_fold_"
HASH_PARAM = "cbctseg_weights_sha256"
VERSION = 1
INPUT, OUTPUT = "input", "logits"
FORMATS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "torchscript": ("pytorch_libtorch", "model.pt")}
ONNX_OPSET = 18  # the lowest the dynamo exporter writes natively; onnxruntime in Triton >= 24.01 reads it
# exported vs PyTorch on the same fp16 input: the output's fp16 rounding (2^-11 relative) plus
# reordered fp32 sums. The check input is noise, where near-ties are common: the argmax bound is loose here
# and the end-to-end test holds the labels of a real case to 99.9 %.
ATOL, RTOL, MIN_ARGMAX_AGREEMENT = 2e-2, 5e-3, 0.99


class ExportError(RuntimeError):
    """The export failed, or the exported model does not reproduce PyTorch's logits."""


def model_name(fold: str) -> str:
    return f"{MODEL_PREFIX}{fold}"


def weights_hash(weights_dir: Path, fold: str) -> str:
    """sha256 of what fixes a fold's function: plans.json (architecture, patch) and the fold's checkpoint bytes."""
    weights_dir, h = Path(weights_dir), hashlib.sha256()
    for path in (weights_dir / "plans.json", weights_dir / f"fold_{fold}" / CHECKPOINT):
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        except FileNotFoundError as e:
            raise ModelError(f"model folder {weights_dir}: missing {path.relative_to(weights_dir)}") from e
    return h.hexdigest()


class Fp16IO(torch.nn.Module):
    """fp16 in, fp16 out, fp32 inside: the exported graph."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002  (Triton's libtorch maps by argument name)
        return self.net(input.float()).half()


def config_text(name: str, fmt: str, patch: tuple[int, ...], num_classes: int, max_batch: int, sha: str,
                fold: str, queue_delay_us: int = 2000) -> str:
    """config.pbtxt; no instance_group, so Triton puts one instance on each GPU, or on the CPU without one."""
    platform, filename = FORMATS[fmt]
    dims = ", ".join(str(p) for p in patch)
    return f"""name: "{name}"
platform: "{platform}"
default_model_filename: "{filename}"
max_batch_size: {max_batch}
version_policy: {{ specific: {{ versions: [{VERSION}] }} }}
input [{{ name: "{INPUT}", data_type: TYPE_FP16, dims: [1, {dims}] }}]
output [{{ name: "{OUTPUT}", data_type: TYPE_FP16, dims: [{num_classes}, {dims}] }}]
dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}
parameters {{ key: "{HASH_PARAM}", value: {{ string_value: "{sha}" }} }}
parameters {{ key: "cbctseg_fold", value: {{ string_value: "{fold}" }} }}
"""


def _export_onnx(module: Fp16IO, example: torch.Tensor, path: Path, max_batch: int) -> None:
    try:
        import onnxscript  # noqa: F401  (torch's dynamo exporter needs it; say so before a long trace)
    except ImportError as e:
        raise ExportError("ONNX export needs onnx and onnxscript: pip install onnx onnxscript "
                          "(or --format torchscript)") from e
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    for name in ("onnx_ir", "onnxscript"):  # one INFO line per deduplicated initializer
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.onnx.export(module, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                      opset_version=ONNX_OPSET, dynamo=True, external_data=False,
                      dynamic_shapes={INPUT: {0: batch}}, verbose=False)


def _run_exported(path: Path, fmt: str, x: torch.Tensor) -> torch.Tensor:
    if fmt == "torchscript":
        return torch.jit.load(str(path), map_location="cpu")(x)
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError("checking the ONNX export needs onnxruntime: pip install onnxruntime (or --no-check)") from e
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0])


def check_export(path: Path, fmt: str, net: torch.nn.Module, patch: tuple[int, ...], seed: int = 0) -> dict:
    """Logits of the exported model vs PyTorch for a batch of 2 (the batch axis is dynamic); raises on disagreement."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 1, *patch), generator=g).half()
    with torch.inference_mode():
        ref = net(x.float())
    got = _run_exported(path, fmt, x).float()
    if got.shape != ref.shape:
        raise ExportError(f"{path}: output shape {tuple(got.shape)}, PyTorch gives {tuple(ref.shape)}")
    err = (got - ref).abs()
    worst = float((err / (ATOL + RTOL * ref.abs())).max())
    agreement = float((got.argmax(1) == ref.argmax(1)).float().mean())
    result = {"max_abs_error": round(float(err.max()), 5), "worst_vs_tolerance": round(worst, 3),
              "argmax_agreement": round(agreement, 6)}
    if worst > 1 or agreement < MIN_ARGMAX_AGREEMENT:
        raise ExportError(f"{path}: exported logits differ from PyTorch beyond fp16 tolerance ({result})")
    return result


def export_repository(weights_dir: Path, out_dir: Path, fmt: str = "onnx", max_batch: int = 4,
                      folds: list[str] | None = None, check: bool = True) -> dict[str, dict]:
    """Write one Triton model per fold into out_dir; returns {model name: {hash, file, check}}.

    Models already in out_dir are replaced; each one's files appear under their final names only once complete.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: one of {sorted(FORMATS)}")
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    model: Model = load_model(Path(weights_dir), folds, torch.device("cpu"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    patch = model.patch_size
    summary = {}
    for fold, net in zip(model.folds, model.networks):
        t0 = time.monotonic()
        name = model_name(fold)
        sha = weights_hash(weights_dir, fold)
        tmp = out_dir / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / str(VERSION)).mkdir(parents=True)
        path = tmp / str(VERSION) / FORMATS[fmt][1]
        module = Fp16IO(net).eval()
        example = torch.zeros((min(2, max_batch), 1, *patch), dtype=torch.half)
        with torch.inference_mode():
            if fmt == "onnx":
                _export_onnx(module, example, path, max_batch)
            else:
                torch.jit.save(torch.jit.trace(module, example, check_trace=False), str(path))
        checked = check_export(path, fmt, net, patch) if check else None
        (tmp / "config.pbtxt").write_text(config_text(name, fmt, patch, model.num_classes, max_batch, sha, fold))
        shutil.rmtree(out_dir / name, ignore_errors=True)
        os.replace(tmp, out_dir / name)
        summary[name] = {"weights_sha256": sha, "file": str(out_dir / name / str(VERSION) / path.name),
                         "check": checked, "seconds": round(time.monotonic() - t0, 1)}
        log.info("exported fold %s -> %s (%s, check %s) in %.1f s", fold, out_dir / name, fmt, checked,
                 time.monotonic() - t0)
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the `export-triton` subcommand."""
    p.add_argument("--weights", type=Path, required=True, help="nnU-Net model folder (plans.json, fold_*/)")
    p.add_argument("--out", type=Path, required=True, help="Triton model repository to write")
    p.add_argument("--format", choices=sorted(FORMATS), default="onnx",
                   help="onnx (Triton's onnxruntime backend, default) or torchscript (its pytorch backend)")
    p.add_argument("--folds", nargs="+", default=None, help="folds to export (default: all in the model folder)")
    p.add_argument("--max-batch", type=int, default=4, help="max_batch_size of the Triton models")
    p.add_argument("--no-check", action="store_true", help="skip comparing the exported logits with PyTorch's")


def run_from_args(args: argparse.Namespace) -> int:
    """The `export-triton` subcommand; 0 when every fold was exported (and checked)."""
    try:
        summary = export_repository(args.weights, args.out, args.format, args.max_batch, args.folds,
                                    check=not args.no_check)
    except (ModelError, ExportError, ValueError) as e:
        log.error("export-triton: %s", e)
        return 1
    for name, s in summary.items():
        print(f"{name}: {s['file']} sha256 {s['weights_sha256'][:12]} check {s['check']}")
    return 0

