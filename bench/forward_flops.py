"""Arithmetic of one forward pass of the ToothFairy2 network, counted without a GPU, and what a measured pass
time means against it.

torch's FlopCounterMode counts the multiply-adds (as 2 flops) of every convolution while the network runs on
fake tensors (shapes only), so the count is exact for the plans and takes seconds on any machine. Dividing it
by a measured pass time gives the arithmetic rate the GPU achieved, which says how far a pass is from what the
GPU's tensor cores could do, and where the flops are (by encoder and decoder stage).

    python bench/forward_flops.py [--configuration C] [--batch-size 1] [--seconds-per-pass 0.066]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_model import TF2_CONFIGURATION, TF2_DATASET, TF2_PLANS, build_network, plans_with  # noqa: E402


def _stage(module_path: str) -> str | None:
    """'Global.encoder.stages.2' -> 'encoder.stages.2': the groups a U-Net's flops are reported in, else None.

    Groups are encoder.stem, encoder.stages.N, decoder.stages.N, decoder.transpconvs.N, decoder.seg_layers.N;
    parents (encoder, decoder) and the decoder's second name for the encoder (decoder.encoder) are not groups.
    """
    parts = module_path.split(".")[1:]
    if parts == ["encoder", "stem"]:
        return "encoder.stem"
    if len(parts) == 3 and parts[0] in ("encoder", "decoder") and parts[1] != "encoder" and parts[2].isdigit():
        return ".".join(parts)
    return None


def count(configuration: str = TF2_CONFIGURATION, batch_size: int = 1, plans_path: Path = TF2_PLANS,
          dataset_path: Path = TF2_DATASET) -> dict:
    """Flops of one forward pass of `batch_size` windows: the total and by stage (convolutions only)."""
    plans = plans_with(plans_path, configuration)
    dataset = json.loads(Path(dataset_path).read_text())
    patch = plans["configurations"][configuration]["patch_size"]
    with FakeTensorMode():
        net = build_network(plans, dataset, configuration).eval()
        x = torch.empty((batch_size, 1, *patch))
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            net(x)
    by_stage: dict[str, int] = defaultdict(int)
    for path, ops in counter.get_flop_counts().items():
        stage = _stage(path)
        if stage is not None:
            by_stage[stage] += sum(ops.values())
    total = counter.get_total_flops()
    return {"configuration": configuration, "patch": list(patch), "batch_size": batch_size,
            "tflop_per_pass": _sig(total / 1e12),
            "tflop_by_stage": {k: _sig(v / 1e12) for k, v in by_stage.items()},
            "tflop_in_stages": _sig(sum(by_stage.values()) / 1e12)}


def achieved_tflops(tflop_per_pass: float, seconds_per_pass: float | None) -> float | None:
    """The arithmetic rate a measured pass time stands for (TFLOP/s)."""
    return _sig(tflop_per_pass / seconds_per_pass) if seconds_per_pass else None


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configuration", default=TF2_CONFIGURATION)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--plans", type=Path, default=TF2_PLANS)
    p.add_argument("--dataset", type=Path, default=TF2_DATASET)
    p.add_argument("--seconds-per-pass", type=float, help="a measured pass time, to report the achieved rate")
    p.add_argument("--out", type=Path, help="write the result as JSON here too")
    a = p.parse_args(argv)
    r = count(a.configuration, a.batch_size, a.plans, a.dataset)
    if a.seconds_per_pass:
        r["seconds_per_pass"] = a.seconds_per_pass
        r["achieved_tflops"] = achieved_tflops(r["tflop_per_pass"], a.seconds_per_pass)
    print(json.dumps(r, indent=1))
    if a.out:
        a.out.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
