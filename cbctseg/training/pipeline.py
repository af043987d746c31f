"""One resumable command from a raw ToothFairy2 folder to `weights/`, through nnU-Net's own tools.

Every step skips what is already done; an interrupted training resumes from nnU-Net's latest checkpoint.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cbctseg.model.manifest import MANIFEST, build_manifest, write_manifest
from cbctseg.resources import RESOURCES_DIR
from cbctseg.training.convert import DatasetError, convert_dataset, find_cases

log = logging.getLogger(__name__)

PLANNER = "nnUNetPlannerResEncL_torchres"
PLANS = "nnUNetResEncUNetLPlans_torchres"
TRAINER = "nnUNetTrainer_onlyMirror01_1500ep"
CUSTOM_TRAINER = "nnUNetTrainer_onlyMirror01_custom"
TF2_CONFIGURATION = "3d_fullres_torchres_ps160x320x320_bs2"
TRAINERS_DIR = Path(__file__).resolve().parent / "nnunet_trainers"


@dataclass
class TrainOptions:
    """What `process.py train` was asked to do."""

    raw: Path
    work: Path
    weights: Path
    dataset_id: int = 119
    dataset_name: str = "ToothFairy2"
    configuration: str = TF2_CONFIGURATION
    models: tuple[int, ...] = (1, 2)
    num_gpus: int = 1
    device: str | None = None  # None: cuda when available, else cpu (decided when training starts)
    da_workers: int | None = None
    processes: int = 2
    epochs: int | None = None  # None: the recipe's 1500 epochs
    iterations: int | None = None  # per epoch; None: nnU-Net's 250
    save_every: int | None = None
    extra_env: dict = field(default_factory=dict)

    def resolved_device(self) -> str:
        """The device nnU-Net trains on. torch is imported only here, so that a bad dataset fails at once."""
        if self.device is not None:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def dataset(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.dataset_name}"

    @property
    def trainer(self) -> str:
        custom = self.epochs is not None or self.iterations is not None or self.save_every is not None
        return CUSTOM_TRAINER if custom else TRAINER


def nnunet_env(opts: TrainOptions, results: Path | None = None) -> dict[str, str]:
    """Environment for nnU-Net's commands: its folders, process counts, our trainers."""
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(opts.work / "nnUNet_raw"),
        "nnUNet_preprocessed": str(opts.work / "nnUNet_preprocessed"),
        "nnUNet_results": str(results or opts.work / "nnUNet_results_model1"),
        "nnUNet_def_n_proc": str(opts.processes),
        "nnUNet_extTrainer": str(TRAINERS_DIR),
        "nnUNet_compile": env.get("nnUNet_compile", "f" if opts.resolved_device() == "cpu" else "t"),
    })
    for key, value in (("CBCTSEG_EPOCHS", opts.epochs), ("CBCTSEG_ITERS", opts.iterations),
                       ("CBCTSEG_SAVE_EVERY", opts.save_every)):
        if value is not None:
            env[key] = str(value)
    if opts.iterations is not None:
        env["CBCTSEG_VAL_ITERS"] = str(max(1, opts.iterations // 5))
    env.update(opts.extra_env)
    return env


def _nnunet(cmd: str, args: list[str], env: dict[str, str]) -> None:
    exe = Path(sys.executable).parent / cmd
    program = str(exe) if exe.exists() else (shutil.which(cmd) or cmd)
    log.info("running %s %s", cmd, " ".join(args))
    proc = subprocess.run([program, *args], env=env, stdout=sys.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} {' '.join(args)} failed with exit code {proc.returncode}")


def plan(opts: TrainOptions) -> Path:
    """Fingerprint and ResEnc-L torchres plans, then add our configurations from resources/."""
    env = nnunet_env(opts)
    pre = opts.work / "nnUNet_preprocessed" / opts.dataset
    if (pre / "dataset_fingerprint.json").is_file():
        log.info("fingerprint: done before, skipped")
    else:
        _nnunet("nnUNetv2_extract_fingerprint", ["-d", str(opts.dataset_id), "-np", str(opts.processes)], env)
    plans_file = pre / f"{PLANS}.json"
    if plans_file.is_file():
        log.info("plans: done before, skipped")
    else:
        _nnunet("nnUNetv2_plan_experiment", ["-d", str(opts.dataset_id), "-pl", PLANNER], env)
    plans = json.loads(plans_file.read_text())
    added = json.loads((RESOURCES_DIR / "plans_configurations.json").read_text())["configurations"]
    if opts.configuration not in added and opts.configuration not in plans["configurations"]:
        raise ValueError(f"unknown configuration {opts.configuration!r}: not in the plans nor in "
                         f"resources/plans_configurations.json ({', '.join(added)})")
    missing = {k: v for k, v in added.items() if plans["configurations"].get(k) != v}
    if missing:
        plans["configurations"].update(missing)
        tmp = plans_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(plans, indent=1))
        os.replace(tmp, plans_file)
        log.info("plans: added configurations %s", ", ".join(missing))
    return plans_file


def preprocess(opts: TrainOptions, n_cases: int) -> None:
    """nnU-Net's preprocessing of the chosen configuration (skipped when every case is there)."""
    pre = opts.work / "nnUNet_preprocessed" / opts.dataset
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    data_id = PlansManager(plans).get_configuration(opts.configuration).data_identifier
    out = pre / data_id
    done = len(list(out.glob("*.pkl"))) if out.is_dir() else 0
    if done >= n_cases:
        log.info("preprocess: %d cases in %s, skipped", done, out.name)
        return
    _nnunet("nnUNetv2_preprocess", ["-d", str(opts.dataset_id), "-plans_name", PLANS, "-c", opts.configuration,
                                    "-np", str(opts.processes)], nnunet_env(opts))


def model_dir(opts: TrainOptions, model: int) -> Path:
    """nnU-Net's output folder of one model (each model has its own results root)."""
    return (opts.work / f"nnUNet_results_model{model}" / opts.dataset /
            f"{opts.trainer}__{PLANS}__{opts.configuration}")


def train(opts: TrainOptions, model: int) -> Path:
    """Train one model on all cases (fold 'all'), resuming from its latest checkpoint."""
    out = model_dir(opts, model)
    final = out / "fold_all" / "checkpoint_final.pth"
    if final.is_file():
        log.info("train model %d: %s exists, skipped", model, final)
        return final
    args = [str(opts.dataset_id), opts.configuration, "all", "-tr", opts.trainer, "-p", PLANS,
            "-device", opts.resolved_device()]
    if opts.num_gpus > 1:
        args += ["-num_gpus", str(opts.num_gpus)]
    if (out / "fold_all" / "checkpoint_latest.pth").is_file():
        log.info("train model %d: resuming from checkpoint_latest.pth", model)
        args.append("--c")
    env = nnunet_env(opts, opts.work / f"nnUNet_results_model{model}")
    if opts.da_workers is not None:
        # for training only: nnU-Net's planner sets torch's threads to it, and 0 (augmentation in the training
        # process) is no thread count
        env["nnUNet_n_proc_DA"] = str(opts.da_workers)
    _nnunet("nnUNetv2_train", args, env)
    if not final.is_file():
        raise RuntimeError(f"training model {model} ended without {final}")
    return final


def strip_checkpoint(src: Path, dst: Path) -> None:
    """Copy what inference needs from a checkpoint (no optimizer state), atomically."""
    import torch

    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    keep = {k: ckpt[k] for k in ("network_weights", "init_args", "trainer_name", "inference_allowed_mirroring_axes",
                                 "current_epoch") if k in ckpt}
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    torch.save(keep, tmp)
    os.replace(tmp, dst)


def assemble(opts: TrainOptions) -> Path:
    """weights/: plans.json, dataset.json, fold_0 and fold_1 from the two `fold_all` runs, provenance.json and
    checksums.json (the manifest: the two folds and the sha256 of each file inference reads)."""
    import nnunetv2
    import torch

    dirs = [model_dir(opts, m) for m in (1, 2)]
    finals = [d / "fold_all" / "checkpoint_final.pth" for d in dirs]
    missing = [str(f) for f in finals if not f.is_file()]
    if missing:
        raise RuntimeError(f"cannot assemble weights: missing {', '.join(missing)} (train both models first)")
    w = Path(opts.weights)
    w.mkdir(parents=True, exist_ok=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copyfile(dirs[0] / name, w / name)
    for fold, final in enumerate(finals):
        strip_checkpoint(final, w / f"fold_{fold}" / "checkpoint_final.pth")
    ckpt = torch.load(finals[0], map_location="cpu", weights_only=False)
    provenance = {
        "dataset": opts.dataset, "cases": json.loads((dirs[0] / "dataset.json").read_text()).get("numTraining"),
        "configuration": opts.configuration, "plans": PLANS, "trainer": ckpt["trainer_name"],
        "epochs": ckpt.get("current_epoch"), "iterations_per_epoch": opts.iterations or 250,
        "folds": {"fold_0": "model 1, fold all", "fold_1": "model 2, fold all"},
        "nnunetv2": nnunetv2.__version__ if hasattr(nnunetv2, "__version__") else _pkg_version("nnunetv2"),
        "torch": torch.__version__, "date": _dt.date.today().isoformat(),
    }
    (w / "provenance.json").write_text(json.dumps(provenance, indent=1))
    # the manifest every run verifies: the two folds, and the sha256 of what was just written
    write_manifest(w, build_manifest(w, ["0", "1"], configuration=opts.configuration, trainer=ckpt["trainer_name"]))
    log.info("assemble: weights in %s (%s written)", w, MANIFEST)
    return w


def _pkg_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def run(opts: TrainOptions, assemble_weights: bool = True) -> dict:
    """All steps in order; returns a summary with the time of each step."""
    times: dict[str, float] = {}

    def step(name, fn, *a):
        t0 = time.perf_counter()
        r = fn(*a)
        times[name] = round(time.perf_counter() - t0, 1)
        log.info("step %s: %.1f s", name, times[name])
        return r

    raw_out = opts.work / "nnUNet_raw" / opts.dataset
    cases = find_cases(opts.raw)
    step("convert", convert_dataset, opts.raw, raw_out)
    step("plan", plan, opts)
    step("preprocess", preprocess, opts, len(cases))
    for m in opts.models:
        step(f"train_model{m}", train, opts, m)
    if assemble_weights and set(opts.models) >= {1, 2} or all(
            (model_dir(opts, m) / "fold_all" / "checkpoint_final.pth").is_file() for m in (1, 2)):
        step("assemble", assemble, opts)
    return {"dataset": opts.dataset, "cases": len(cases), "configuration": opts.configuration,
            "trainer": opts.trainer, "models": list(opts.models), "weights": str(opts.weights), "seconds": times}


__all__ = ["TrainOptions", "run", "DatasetError"]
