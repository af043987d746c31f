"""Child process of bench.py for the cold-start measurement: import, load the model, run one forward pass.

Prints one JSON line whose `wall_at_first_forward` (time.time()) the parent subtracts from the moment it
spawned this process. Imports happen inside main() so they are part of what is measured.

    python bench/first_forward.py {ours,nnunet} WEIGHTS --device cuda [--compile off|on|auto|aot] [--passes N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("engine", choices=["ours", "nnunet"])
    p.add_argument("weights", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--folds", nargs="+", default=["0", "1"])
    p.add_argument("--compile", default="off", choices=["off", "on", "auto", "aot"],
                   help="on: torch.compile; aot: the AOT package beside the weights; auto: the engine's rule")
    p.add_argument("--passes", type=int, default=216, help="passes the case would need (for --compile auto)")
    p.add_argument("--budget", type=float, default=540.0)
    a = p.parse_args()
    t0 = time.monotonic()
    import torch

    out: dict = {"engine": a.engine}
    device = torch.device(a.device)
    if a.engine == "ours":
        sys.path.insert(0, str(REPO))
        import cbctseg.case  # noqa: F401  (what process.py imports before the first case)
        from cbctseg.networks.compile_cache import maybe_compile
        from cbctseg.model.loading import load_model

        out["import_s"] = time.monotonic() - t0
        t1 = time.monotonic()
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        model = load_model(a.weights, a.folds, device)
        force = {"on": True, "off": False, "auto": None, "aot": True}[a.compile]
        backend = maybe_compile(model.networks, device, a.weights, a.passes, a.budget, force=force,
                                aot=a.compile in ("aot", "auto"))
        out["compile"] = backend.describe()
        net, patch, dtype = backend.networks[0], model.patch_size, model.input_dtype
    else:
        os.environ.setdefault("nnUNet_extTrainer", str(REPO / "cbctseg" / "training" / "nnunet_trainers"))
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        out["import_s"] = time.monotonic() - t0
        t1 = time.monotonic()
        predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=True, perform_everything_on_device=True,
                                    device=device, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(a.weights), use_folds=tuple(a.folds))
        net = predictor.network.to(device).eval()  # nnU-Net moves it at its first sliding window
        patch, dtype = tuple(predictor.configuration_manager.patch_size), torch.float32
    out["load_s"] = time.monotonic() - t1
    t1 = time.monotonic()
    x = torch.randn((1, 1, *patch), device=device, dtype=dtype)
    with torch.inference_mode(), (torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda"
                                  else torch.autocast("cpu", enabled=False)):
        net(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out["wall_at_first_forward"] = time.time()
    out["forward_s"] = time.monotonic() - t1
    out["in_process_s"] = time.monotonic() - t0
    print("FIRST_FORWARD " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
