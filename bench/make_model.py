"""An nnU-Net v2 model folder with random weights for benchmarks: plans.json, dataset.json, fold_*/checkpoint_final.pth
and checksums.json (the manifest the engine verifies before loading).

The default is the ToothFairy2 winner's architecture (`bench/tf2_plans.json`, configuration
3d_fullres_torchres_ps160x320x320_bs2, 43 classes). A configuration missing from the plans is taken from
`resources/plans_configurations.json` (e.g. 3d_fullres_torchres_tiny for CPU smoke runs).

    python bench/make_model.py OUT_DIR [--plans P] [--dataset D] [--configuration C] [--folds 0 1]
                                       [--features 4 8 16 32 32 32 32] [--blocks 1 1 1 1 1 1 1]

--features / --blocks narrow the configuration's network (features and residual blocks per encoder stage)
while keeping its patch, stages and classes: for host-memory measurements on a CPU (`host_memory.py`),
where the sums, the chunks of a window's 43-channel output and finalize do not depend on the width.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TF2_PLANS = BENCH / "tf2_plans.json"
TF2_DATASET = BENCH / "tf2_dataset.json"
TF2_CONFIGURATION = "3d_fullres_torchres_ps160x320x320_bs2"
TRAINER = "nnUNetTrainer_onlyMirror01_1500ep"  # in nnunetv2 itself, so nnUNetPredictor resolves it
MIRROR_AXES = (0, 1)


def plans_with(plans_path: Path, configuration: str) -> dict:
    """The plans, with `configuration` added from resources/plans_configurations.json when they lack it."""
    plans = json.loads(Path(plans_path).read_text())
    if configuration not in plans["configurations"]:
        extra = json.loads((REPO / "resources" / "plans_configurations.json").read_text())["configurations"]
        if configuration not in extra:
            raise ValueError(f"configuration {configuration!r} is neither in {plans_path} nor in "
                             f"resources/plans_configurations.json")
        plans["configurations"][configuration] = extra[configuration]
    return plans


def narrowed(plans: dict, configuration: str, features: list[int] | None = None,
             blocks: list[int] | None = None) -> dict:
    """The plans with the configuration's features and encoder blocks per stage replaced (None: kept)."""
    kw = plans["configurations"][configuration]["architecture"]["arch_kwargs"]
    for key, value in (("features_per_stage", features), ("n_blocks_per_stage", blocks)):
        if value is not None:
            if len(value) != kw["n_stages"]:
                raise ValueError(f"{key}: {len(value)} values for {kw['n_stages']} stages")
            kw[key] = list(value)
    return plans


def build_network(plans: dict, dataset: dict, configuration: str) -> torch.nn.Module:
    """The configuration's network as nnU-Net builds it (He initialisation, no deep supervision)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import,
                                  determine_num_input_channels(pm, cm, dataset),
                                  pm.get_label_manager(dataset).num_segmentation_heads,
                                  allow_init=True, deep_supervision=False)


def fit_network(net: torch.nn.Module, plans: dict, configuration: str, steps: int, device: torch.device,
                seed: int = 0, log=print) -> list[float]:
    """A few optimiser steps of cross-entropy on random patches of one phantom, so the logits have real margins.

    A random network's 43 logits are nearly tied everywhere, which makes any two engines' rounding disagree on
    about 1 % of voxels; a short fit makes them decisive where the phantom's anatomy is clear. Returns the losses.
    """
    if str(REPO) not in sys.path:  # run as a script, the engine's package is beside bench/
        sys.path.insert(0, str(REPO))
    from cbctseg.training.phantom import PhantomSpec, make_phantom_arrays
    from cbctseg.inference.preprocess import ct_normalize_
    from cbctseg.resources import label_map

    cfg = plans["configurations"][configuration]
    patch = tuple(cfg["patch_size"])
    # a configuration's own spacing first, else the one it inherits (the ToothFairy2 one inherits 3d_fullres's)
    spacing = cfg.get("spacing") or plans["configurations"][cfg["inherits_from"]]["spacing"]
    shape = tuple(int(p * 1.1) for p in patch)
    image, fdi = make_phantom_arrays(PhantomSpec(shape=shape, spacing=tuple(spacing[::-1]), seed=seed))
    x_all = ct_normalize_(torch.from_numpy(image.astype(np.float32)), plans["foreground_intensity_properties_per_channel"]["0"])
    y_all = torch.from_numpy(label_map().to_contiguous_lut()[fdi].astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    net.train().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=3e-4)
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda")
    losses = []
    for step in range(steps):
        start = [int(torch.randint(0, s - p + 1, (1,), generator=gen)) for s, p in zip(shape, patch)]
        sl = tuple(slice(a, a + p) for a, p in zip(start, patch))
        x, y = x_all[sl][None, None].to(device), y_all[sl][None].to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(round(loss.item(), 4))
    log(f"fitted {steps} steps: loss {losses[0] if losses else None} -> {losses[-1] if losses else None}")
    net.eval().cpu()
    return losses


def make_model_folder(out: Path, plans_path: Path = TF2_PLANS, dataset_path: Path = TF2_DATASET,
                      configuration: str = TF2_CONFIGURATION, folds: tuple[int, ...] = (0, 1),
                      seed: int = 0, fit_steps: int = 0, device: torch.device = torch.device("cpu"),
                      features: list[int] | None = None, blocks: list[int] | None = None) -> Path:
    """Write a model folder with one randomly initialised network per fold (seeded, so reruns are identical),
    each fitted for `fit_steps` steps to a phantom when asked (see fit_network)."""
    out = Path(out)
    plans = narrowed(plans_with(plans_path, configuration), configuration, features, blocks)
    dataset = json.loads(Path(dataset_path).read_text())
    out.mkdir(parents=True, exist_ok=True)
    (out / "plans.json").write_text(json.dumps(plans, indent=1))
    (out / "dataset.json").write_text(json.dumps(dataset, indent=1))
    for fold in folds:
        torch.manual_seed(seed + fold)  # distinct folds, so the ensemble average is a real average
        net = build_network(plans, dataset, configuration)
        losses = fit_network(net, plans, configuration, fit_steps, device, seed + fold) if fit_steps else []
        ckpt = {"network_weights": net.state_dict(), "init_args": {"configuration": configuration, "fold": fold},
                "trainer_name": TRAINER, "inference_allowed_mirroring_axes": MIRROR_AXES, "current_epoch": 0,
                "fit_losses": losses}
        path = out / f"fold_{fold}" / "checkpoint_final.pth"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    what = f"random, fitted {fit_steps} steps to a phantom" if fit_steps else "random"
    if features or blocks:
        what += f", narrowed (features {features}, blocks {blocks})"
    (out / "provenance.json").write_text(json.dumps({"weights": what, "made_by": "bench/make_model.py", "seed": seed,
                                                     "configuration": configuration, "trainer": TRAINER}, indent=1))
    if str(REPO) not in sys.path:  # run as a script, the engine's package is beside bench/
        sys.path.insert(0, str(REPO))
    from cbctseg.model.manifest import build_manifest, write_manifest

    write_manifest(out, build_manifest(out, [str(f) for f in folds], configuration=configuration, trainer=TRAINER))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="model folder to write")
    p.add_argument("--plans", type=Path, default=TF2_PLANS)
    p.add_argument("--dataset", type=Path, default=TF2_DATASET)
    p.add_argument("--configuration", default=TF2_CONFIGURATION)
    p.add_argument("--folds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit-steps", type=int, default=0, help="fit each fold to a phantom for this many steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--features", type=int, nargs="+", default=None, help="features per stage (narrow network)")
    p.add_argument("--blocks", type=int, nargs="+", default=None, help="encoder blocks per stage")
    a = p.parse_args(argv)
    out = make_model_folder(a.out, a.plans, a.dataset, a.configuration, tuple(a.folds), a.seed, a.fit_steps,
                            torch.device(a.device), a.features, a.blocks)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
