"""Live tensor memory of one forward pass of the ToothFairy2 network on a simulated GPU, on any machine.

The network is built under torch's FakeTensorMode on a fake CUDA device (shapes and dtypes, no data, no
GPU needed) and run once under CUDA fp16 autocast, as the predictor runs it. A dispatch mode counts the bytes
of every tensor storage while it is alive. The peak is what `torch.cuda.max_memory_allocated` would show
*without* cuDNN workspaces and the allocator's rounding, so it is a floor for the GPU's number, not a
replacement: on an H100 the eager pass of nnU-Net's forward measured 7.95 GB above the weights
(results/probes/2026-11-23-nvidia-h100-probe.json) where this model counts about 5.9 GB of tensors.

    python bench/forward_memory.py [--configuration C] [--variants fp32-weights,fp16-weights] [--out FILE]

Variants: fp32-weights (the networks as nnU-Net stores them, fp32 input), fp16-weights (as load_model stores
them on a GPU: `precision.prepare`, fp16 input), fp16-weights-lean (and run by `lean_forward`, as the engine
runs an eager network).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_model import TF2_CONFIGURATION, TF2_DATASET, TF2_PLANS, build_network, plans_with  # noqa: E402

from cbctseg.networks import lean_forward, precision  # noqa: E402
from live_memory import LiveBytes, cuda_autocast_without_a_gpu  # noqa: E402

VARIANTS = ("fp32-weights", "fp16-weights", "fp16-weights-lean")


def measure(variant: str, configuration: str = TF2_CONFIGURATION, batch_size: int = 1) -> dict:
    """Peak live bytes of one forward pass, with the weights and the input counted, in GB."""
    plans = plans_with(TF2_PLANS, configuration)
    dataset = json.loads(TF2_DATASET.read_text())
    patch = plans["configurations"][configuration]["patch_size"]
    device = torch.device("cuda")
    with FakeTensorMode(), device:
        net = build_network(plans, dataset, configuration).eval()
        as_loaded = variant.startswith("fp16-weights")  # what load_model does on a GPU
        if as_loaded:
            precision.prepare(net, device)
        run = lean_forward.lean(net) if variant.endswith("-lean") else net
        dtype = precision.input_dtype(device) if as_loaded else torch.float32
        x = torch.empty((batch_size, 1, *patch), dtype=dtype)
        tracker = LiveBytes()
        for p in net.parameters():
            tracker.track(p, "weights")
        weights = tracker.now
        tracker.track(x, "input")
        before = tracker.now
        with torch.inference_mode(), tracker, cuda_autocast_without_a_gpu():
            y = run(x)
        out_bytes = y.untyped_storage().nbytes()
    return {"variant": variant, "configuration": configuration, "patch": list(patch), "batch_size": batch_size,
            "weights_gb": round(weights / 1e9, 3), "input_gb": round((before - weights) / 1e9, 3),
            "output_gb": round(out_bytes / 1e9, 3), "peak_gb": round(tracker.peak / 1e9, 3),
            "peak_above_weights_gb": round((tracker.peak - weights) / 1e9, 3), "peak_at": tracker.peak_op}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configuration", default=TF2_CONFIGURATION)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", type=Path, help="write the results as JSON here too")
    a = p.parse_args(argv)
    variants = a.variants.split(",")
    if set(variants) - set(VARIANTS):
        p.error(f"unknown variants {set(variants) - set(VARIANTS)}; choose from {VARIANTS}")
    results = [measure(v, a.configuration, a.batch_size) for v in variants]
    for r in results:
        print(f"{r['variant']:14s} weights {r['weights_gb']:.3f} GB, peak {r['peak_gb']:.3f} GB "
              f"({r['peak_above_weights_gb']:.3f} above the weights, at {r['peak_at']}), output {r['output_gb']:.3f} GB")
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
