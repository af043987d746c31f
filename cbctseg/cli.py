"""Command line: predict (the default, what grand-challenge runs), train, compile, phantom and the rest."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cbctseg import options

log = logging.getLogger("cbctseg")

SUBCOMMANDS = ("predict", "train", "phantom", "evaluate", "cutoffs", "compile", "export-triton", "cohort", "seal",
               "ensemble")
APP_DIR = Path(__file__).resolve().parent.parent


def _budget(value: str) -> float:
    from cbctseg.io.preflight import PreflightError, budget_seconds

    try:
        return budget_seconds(value)
    except PreflightError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _predict_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", type=Path, default=Path("/input"),
                   help="grand-challenge input root (inputs.json or images/cbct/*.mha) or a folder of .mha files")
    p.add_argument("--output", type=Path, default=Path("/output"), help="output root (default /output)")
    p.add_argument("--weights", type=Path, action="append", default=None,
                   help="nnU-Net model folder, or an ensemble folder (ensemble.json); give it several times to "
                        "ensemble models with different plans (default: /opt/ml/model when it holds a model, "
                        "else weights/)")
    options.add_device_arguments(p, "auto (CUDA when available), cuda, cuda:N or cpu")
    p.add_argument("--folds", nargs="+", default=None, help="folds to ensemble (default: all in the model folder)")
    p.add_argument("--step-size", type=options.step_size, default=0.5, help="sliding-window step as a fraction of the patch")
    p.add_argument("--no-mirroring", action="store_true", help="skip test-time mirroring (4x fewer passes)")
    p.add_argument("--accumulate", default="auto", choices=options.ACCUMULATIONS,
                   help="where logits accumulate (auto: a case at the plans' spacing streams bands of slices, on "
                        "the GPU when one fits, else on the CPU; one that resamples keeps the whole image, on the "
                        "GPU when it fits, else on the CPU)")
    p.add_argument("--batch-size", type=options.positive_int, default=1, help="windows per forward pass")
    p.add_argument("--compile", default="auto", choices=options.COMPILE_MODES,
                   help="compiled networks: an AOT package beside the weights for this device is used unless "
                        "'off'; else auto runs torch.compile on a GPU when it pays within the budget (a compile "
                        "cache beside the weights makes it cheaper). Make either with "
                        "process.py compile [--aot]")
    p.add_argument("--time-budget", type=_budget, default=None,
                   help="seconds per case (finite, >= 0), counted from process start for the first case (default: "
                        "the ToothFairy2 limit of resources/task.json minus 60 s); 0 disables the guard")
    p.add_argument("--pictures", type=Path, default=None,
                   help="also write a PNG per case (axial, coronal, sagittal slices with the labels) to this folder")
    p.add_argument("--report", type=Path, default=None,
                   help="write the per-case JSON reports to this file (default: stderr only)")
    options.add_backend_arguments(p)


def _train_parser(p: argparse.ArgumentParser) -> None:
    from cbctseg.training.pipeline import TF2_CONFIGURATION

    p.add_argument("--raw", type=Path, required=True, help="raw ToothFairy2 folder: imagesTr/, labelsTr/ (FDI values)")
    p.add_argument("--work", type=Path, required=True, help="working folder for nnU-Net's raw, preprocessed, results")
    p.add_argument("--weights", type=Path, default=APP_DIR / "weights", help="where to assemble the model folder")
    p.add_argument("--configuration", default=TF2_CONFIGURATION,
                   help="nnU-Net configuration (resources/plans_configurations.json; 3d_fullres_torchres_tiny for "
                        "CPU smoke runs)")
    p.add_argument("--models", type=int, nargs="+", default=[1, 2], choices=[1, 2],
                   help="which of the two models to train here (to split them across machines)")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs per model (nnU-Net's DDP)")
    p.add_argument("--da-workers", type=int, default=None, help="data-augmentation worker processes (nnUNet_n_proc_DA)")
    p.add_argument("--processes", type=int, default=2, help="processes for fingerprint and preprocessing")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's 1500 epochs")
    p.add_argument("--iterations", type=int, default=None, help="override nnU-Net's 250 iterations per epoch")
    p.add_argument("--save-every", type=int, default=None, help="epochs between checkpoint_latest saves")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dataset-id", type=int, default=119)


def _phantom_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder to write")
    p.add_argument("--cases", type=int, default=1)
    p.add_argument("--shape", type=int, nargs=3, default=[64, 96, 96], metavar=("Z", "Y", "X"))
    p.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0], metavar=("X", "Y", "Z"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", action="store_true",
                   help="write a raw training dataset (imagesTr/, labelsTr/) instead of input images")


def _cutoffs_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", type=Path, nargs="+", required=True,
                   help="cross-validation prediction folders (e.g. nnU-Net's fold_X/validation)")
    p.add_argument("--truth", type=Path, required=True, help="ground-truth label folder (same file names)")
    p.add_argument("--pred-labels", choices=["contiguous", "fdi"], default="contiguous",
                   help="label values of the predictions (nnU-Net's validation output: contiguous)")
    p.add_argument("--truth-labels", choices=["contiguous", "fdi"], default="fdi",
                   help="label values of the truth (a raw ToothFairy2 labelsTr: fdi)")
    p.add_argument("--out", type=Path, default=None, help="cutoffs file to write (default resources/cutoffs.json)")


def _seal_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", type=Path, required=True,
                   help="the model folder (or a folder holding one, e.g. nnU-Net's results layout)")
    p.add_argument("--folds", nargs="+", default=None,
                   help="the folds the model declares (default: every fold_* with a checkpoint_final.pth)")
    p.add_argument("--demo", action="store_true", help="mark the weights as a demo: every run warns")


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    from cbctseg.evaluation.evaluate import add_arguments

    add_arguments(p)


def _compile_arguments(p: argparse.ArgumentParser) -> None:
    from cbctseg.networks import compile_cache

    compile_cache.add_arguments(p)


def _export_arguments(p: argparse.ArgumentParser) -> None:
    from cbctseg.networks import triton_export

    triton_export.add_arguments(p)


def _cohort_arguments(p: argparse.ArgumentParser) -> None:
    from cbctseg import cohort

    cohort.add_arguments(p)


def _ensemble_arguments(p: argparse.ArgumentParser) -> None:
    from cbctseg.model import ensemble_build

    ensemble_build.add_arguments(p)


# each subcommand: its help and what adds its arguments (which may import torch: only the command run needs its own)
COMMANDS = {
    "predict": ("segment CBCT volumes (default)", _predict_parser),
    "train": ("raw ToothFairy2 dataset -> weights/ (resumable)", _train_parser),
    "phantom": ("write synthetic CBCT phantoms", _phantom_parser),
    "evaluate": ("Dice and HD95 per structure, as the challenge scores them", _evaluate_arguments),
    "cutoffs": ("per-class volume cutoffs from cross-validation predictions", _cutoffs_parser),
    "compile": ("networks compiled ahead of time for this device: an AOT package or a compile cache",
                _compile_arguments),
    "export-triton": ("model folder -> Triton model repository (ONNX or TorchScript), checked", _export_arguments),
    "cohort": ("many cases, K in flight, resumable (local or Triton)", _cohort_arguments),
    "seal": ("write a model folder's checksums.json (its folds and their sha256), which every run verifies before "
             "loading", _seal_parser),
    "ensemble": ("model folders -> an ensemble folder (ensemble.json and its models), to pack as a model tarball",
                 _ensemble_arguments),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; with a command, only that subcommand gets its arguments (the others' may import torch)."""
    parser = argparse.ArgumentParser(prog="process.py", description=(
        "ToothFairy2 CBCT segmentation (nnU-Net v2 ensemble). Without a subcommand: predict."))
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command")
    for name, (help_text, add_arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if command is None or command == name:
            add_arguments(p)
    return parser


def cmd_predict(args: argparse.Namespace) -> int:
    from cbctseg.termination import Terminated, raising_on_signals

    # a signal while torch is imported (seconds), before predict_main handles signals itself, still gets a report
    with raising_on_signals():
        try:
            from cbctseg.run import predict_main

            return predict_main(args)
        except Terminated as t:
            _report_not_started(args, t)
            return t.exit_code


def _report_not_started(args: argparse.Namespace, t: BaseException) -> None:
    """results.json for a run stopped before any case started, unless the run wrote one itself."""
    loaded = sys.modules.get("cbctseg.io.gc_io")
    if loaded is not None and loaded.results_written:
        return
    log.error("%s before the run started", t)
    try:
        from cbctseg.io import gc_io

        message = f"not started: {t}"
        try:
            entries = [gc_io.case_result(c, f"{c.name}: {message}") for c in gc_io.find_cases(args.input, args.output)]
        except gc_io.InputError:
            entries = [gc_io.run_error_result(message)]
        gc_io.write_results(entries, args.output)
    except Exception as e:  # the report is best effort here: the process is being stopped
        log.error("cannot write results.json: %s", e)


def cmd_train(args: argparse.Namespace) -> int:
    from cbctseg.training.pipeline import DatasetError, TrainOptions, run

    opts = TrainOptions(raw=args.raw, work=args.work, weights=args.weights, dataset_id=args.dataset_id,
                        configuration=args.configuration, models=tuple(args.models), num_gpus=args.num_gpus,
                        da_workers=args.da_workers, processes=args.processes, epochs=args.epochs,
                        iterations=args.iterations, save_every=args.save_every)
    if args.device:
        opts.device = args.device
    try:
        summary = run(opts)
    except (DatasetError, RuntimeError, ValueError) as e:
        log.error("train: %s", e)
        return 1
    print(json.dumps(summary))
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    import SimpleITK as sitk

    from cbctseg.training.phantom import PhantomSpec, make_phantom, write_raw_dataset

    if args.dataset:
        names = write_raw_dataset(args.out, args.cases, shape=args.shape, seed=args.seed, spacing=args.spacing)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        names = []
        for i in range(args.cases):
            image, label = make_phantom(PhantomSpec(shape=args.shape, spacing=args.spacing, seed=args.seed + i))
            name = f"phantom_{args.seed + i:03d}"
            sitk.WriteImage(image, str(args.out / f"{name}.mha"), useCompression=True)
            sitk.WriteImage(label, str(args.out / f"{name}_label.mha"), useCompression=True)
            names.append(name)
    log.info("phantom: wrote %d case(s) to %s", len(names), args.out)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cbctseg.evaluation.evaluate import run_from_args

    return run_from_args(args)


def cmd_cutoffs(args: argparse.Namespace) -> int:
    from cbctseg.training.cutoffs import find_cutoffs, write_cutoffs

    try:
        found, n = find_cutoffs(args.pred, args.truth, args.pred_labels == "contiguous",
                                args.truth_labels == "contiguous")
    except (FileNotFoundError, ValueError) as e:
        log.error("cutoffs: %s", e)
        return 2
    path = write_cutoffs(found, n, args.out)
    log.info("cutoffs: %d classes with a cutoff, from %d cases -> %s", sum(v > 0 for v in found.values()), n, path)
    print(json.dumps({str(k): v for k, v in found.items()}))
    return 0


def cmd_seal(args: argparse.Namespace) -> int:
    from cbctseg.model.loading import ModelError, seal_model
    from cbctseg.model.manifest import MANIFEST

    try:
        folder, manifest = seal_model(args.weights, args.folds, args.demo)
    except ModelError as e:
        log.error("seal: %s", e)
        return 2
    log.info("seal: %s written: folds %s%s", folder / MANIFEST, ", ".join(manifest.folds),
             " (marked as demo weights)" if manifest.demo else "")
    print(json.dumps({"folder": str(folder), **manifest.to_json()}))
    return 0


def _run_compile(args: argparse.Namespace) -> int:
    from cbctseg.networks import compile_cache

    return compile_cache.run_from_args(args)


def _run_export(args: argparse.Namespace) -> int:
    from cbctseg.networks import triton_export

    return triton_export.run_from_args(args)


def _run_cohort(args: argparse.Namespace) -> int:
    from cbctseg import cohort

    return cohort.run_from_args(args)


def _run_ensemble(args: argparse.Namespace) -> int:
    from cbctseg.model import ensemble_build

    return ensemble_build.run_from_args(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS + ("-h", "--help", "-v", "--verbose"):
        argv.insert(0, "predict")
    args = build_parser(argv[0] if argv[0] in SUBCOMMANDS else None).parse_args(argv)
    if args.command is None:
        args = build_parser("predict").parse_args(["predict", *argv])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    commands = {"predict": cmd_predict, "train": cmd_train, "phantom": cmd_phantom, "evaluate": cmd_evaluate,
                "cutoffs": cmd_cutoffs, "compile": _run_compile, "export-triton": _run_export,
                "cohort": _run_cohort, "seal": cmd_seal, "ensemble": _run_ensemble}
    return commands[args.command](args)
