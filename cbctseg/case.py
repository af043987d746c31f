"""One case through the engine: read -> preprocess -> sliding window -> finalize -> post-process -> write, with one
model or an ensemble; and the run's models, loaded and verified."""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from cbctseg.io import gc_io
from cbctseg.networks.device import describe, free_memory, peak_memory_gb, peak_reserved_gb
from cbctseg.inference.finalize import finalize
from cbctseg.model.loading import Model, ModelError, load_model
from cbctseg.model.verify import VerifiedMember, verify_members
from cbctseg.options import CaseOptions
from cbctseg.inference.postprocess import to_fdi
from cbctseg.inference.ensemble import BandEnsemble, LoadedModel
from cbctseg.inference.predictor import Accumulation, predict
from cbctseg.inference.preprocess import Preprocessed, preprocess
from cbctseg.resources import cutoffs, label_map
from cbctseg.networks.backend import Backend, BackendSlot
from cbctseg.networks.compile_cache import maybe_compile
from cbctseg.inference.schedule import Budget, CasePlan, plan_case
from cbctseg.networks.triton_backend import triton_backend

log = logging.getLogger("cbctseg")


def forward_bytes(model: Model, batch_size: int = 1) -> int:
    """Rough peak memory of one forward pass: the full-resolution stage's activations (about 8 tensors of its
    width; the ToothFairy2 network measured 7.3 GB compiled, 8.0 GB eager on an H100) and the fp16 output."""
    f0 = model.configuration.network_arch_init_kwargs.get("features_per_stage", [32])[0]
    return int(batch_size * np.prod(model.patch_size) * 2 * (8 * f0 + model.num_classes))


def choose_accumulation(model: Model, shape: tuple[int, ...], needs_resampling: bool, device: torch.device,
                        requested: str = "auto", batch_size: int = 1) -> Accumulation:
    """Where the logits accumulate. A case that needs no resampling streams bands: on the GPU when a band fits
    (the least GPU memory at the same speed), else on the CPU (half the host memory of the whole volume's sums).
    A case that resamples keeps the whole volume: on the GPU when it fits in free memory, else on the CPU.

    On the CPU: streamed bands when the case needs no resampling (the ToothFairy2 case: a band of one patch's
    slices instead of the whole volume's fp16 sums, 3.6 GB instead of 6.7 GB on the largest case), else the
    whole volume, which the resampling back needs."""
    if requested != "auto":
        return Accumulation(requested)
    free = free_memory(device)
    if free is None:
        return Accumulation.DEVICE if needs_resampling else Accumulation.STREAMED
    # the sums cover the image without the padding to the patch size (stitching.Accumulator)
    per_slice = int(np.prod(shape[1:])) * (2 * model.num_classes + 4)
    margin = forward_bytes(model, batch_size) + 1024**3
    if not needs_resampling:
        fits = per_slice * min(model.patch_size[0], shape[0]) + margin < free
        return Accumulation.STREAMED if fits else Accumulation.STREAMED_CPU
    if per_slice * shape[0] + margin < free:
        return Accumulation.DEVICE
    return Accumulation.CPU


def finalize_reserve_s(voxels: int, num_classes: int, device: torch.device) -> float:
    """Projected seconds for finalize and writing after the last window (argmax over all classes dominates)."""
    per_voxel_class = 1e-10 if device.type == "cuda" else 1.5e-8  # measured order of magnitude
    return 2.0 + voxels * num_classes * per_voxel_class + voxels * 5e-8


def choose_backend(model: Model, device: torch.device, options: CaseOptions, forwards: int,
                   budget: Budget) -> Backend:
    """How the model's networks run here: compiled when that pays for a case of `forwards` window forwards
    (`compile_cache.maybe_compile`), else eager."""
    force = {"auto": None, "on": True, "off": False}[options.compile]
    return maybe_compile(model.networks, device, model.folder, forwards, budget.left(), force=force,
                         batch_size=options.batch_size, patch=model.patch_size)


def predict_case(case: gc_io.Case, members: list[LoadedModel], device: torch.device, options: CaseOptions,
                 budget: Budget) -> dict:
    """Segment one case with one model or an ensemble of several and write its label map; returns the case
    report (raises on failure).

    Each member's backend (how its networks run) is shared by the run's cases; the first case that finds it
    empty chooses it (`choose_backend`)."""
    t: dict[str, float] = {}
    t0 = time.monotonic()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    vol = gc_io.read_volume(case.path)
    t["read"] = time.monotonic() - t0
    num_classes = members[0].model.num_classes
    # every model's finalize (one for a single model) after its last window
    budget.reserve_s = len(members) * finalize_reserve_s(int(np.prod(vol.array.shape)), num_classes, device)
    pres = [_preprocessed(vol, m.model, device, t) for m in members]
    if not options.pictures:
        vol = vol.without_voxels()  # the largest case's image is 0.3 GB that the windows need no more
    if len(members) == 1:
        labels, parts = _predict_one(pres[0], members[0], device, options, budget, t)
    else:
        labels, parts = _predict_ensemble(pres, members, device, options, budget, t)
    t1 = time.monotonic()
    fdi, removed = to_fdi(labels, label_map(), cutoffs())
    del labels
    fdi = fdi.cpu().numpy()
    t["finalize"] = t.get("finalize", 0.0) + time.monotonic() - t1
    t1 = time.monotonic()
    gc_io.write_label_map(fdi, vol, case.output_path)
    if options.pictures:
        from cbctseg.evaluation.pictures import render_case

        render_case(vol.array, fdi, Path(options.pictures) / f"{Path(case.name).stem}.png", title=case.name)
    t["write"] = time.monotonic() - t1
    t["total"] = time.monotonic() - t0
    present = sorted(int(v) for v in np.unique(fdi) if v)
    return {
        "case": case.name, "status": "ok", "output": str(case.output_path), "model": parts["model"],
        "shape_zyx": list(vol.array.shape), "spacing_xyz": list(vol.spacing),
        "network_input_shape": parts["network_input_shape"], "device": describe(device),
        "seconds": {k: round(v, 3) for k, v in t.items()}, "prediction": parts["prediction"],
        "compile": parts["compile"], "structures_present": present, "removed_by_cutoffs": removed,
        "peak_gpu_memory_gb": peak_memory_gb(device), "peak_gpu_reserved_gb": peak_reserved_gb(device),
    }


def _preprocessed(vol: gc_io.Volume, model: Model, device: torch.device, t: dict[str, float]) -> Preprocessed:
    t1 = time.monotonic()
    pre = preprocess(vol.array, vol.nnunet_properties["spacing"], model, device)
    t["preprocess"] = t.get("preprocess", 0.0) + time.monotonic() - t1
    return pre


def _accumulation(model: Model, pre: Preprocessed, device: torch.device, options: CaseOptions) -> Accumulation:
    needs_resampling = tuple(pre.data.shape[1:]) != tuple(pre.shape_after_cropping)
    accumulation = choose_accumulation(model, tuple(pre.data.shape[1:]), needs_resampling, device,
                                       options.accumulate, options.batch_size)
    if accumulation.streams and needs_resampling:
        raise ValueError(f"--accumulate {accumulation.value} needs a case at the plans' spacing (no resampling)")
    return accumulation


def _plan(member: LoadedModel, pre: Preprocessed, options: CaseOptions) -> CasePlan:
    model = member.model
    return plan_case(tuple(pre.data.shape[1:]), model.patch_size, options.step_size, len(model.folds),
                     model.mirror_axes, options.mirroring)


def _backend(member: LoadedModel, pre: Preprocessed, device: torch.device, options: CaseOptions, budget: Budget,
             t: dict[str, float], plan: CasePlan | None = None) -> Backend:
    """The member's backend, chosen now (timed as "compile") when this is the run's first case; `plan`: the
    case's plan for this model when the caller has it."""
    if member.backend.chosen is not None:
        return member.backend.chosen
    model = member.model
    forwards = len((plan or _plan(member, pre, options)).items)
    t1 = time.monotonic()
    backend = member.backend.get(lambda: choose_backend(model, device, options, forwards, budget))
    # loading a package; torch.compile's warm-up falls in the first pass
    t["compile"] = t.get("compile", 0.0) + time.monotonic() - t1
    return backend


def _predict_one(pre: Preprocessed, member: LoadedModel, device: torch.device, options: CaseOptions, budget: Budget,
                 t: dict[str, float]) -> tuple[torch.Tensor, dict]:
    """One model on its preprocessed image: its averaged logits' argmax on the input grid, and its parts of the
    case report."""
    model = member.model
    accumulation = _accumulation(model, pre, device, options)
    backend = _backend(member, pre, device, options, budget, t)
    t1 = time.monotonic()
    result, is_labels, report = predict(model, backend, pre.data, options.step_size, options.mirroring,
                                        accumulation, budget, options.batch_size, progress=options.progress,
                                        in_flight=options.in_flight)
    t["sliding_window"] = time.monotonic() - t1
    t1 = time.monotonic()
    labels = finalize(result, pre, model, device, is_labels)
    t["finalize"] = time.monotonic() - t1
    return labels, {"model": model.describe(), "network_input_shape": list(pre.data.shape[1:]),
                    "prediction": asdict(report), "compile": backend.describe()}


def _run_order(accumulations: list[Accumulation]) -> list[int]:
    """The order the models run in: as listed, but the last model that can stream its bands (one on the input
    grid) goes last, so that its bands finish the label map with the models kept before it (`BandEnsemble`)."""
    streaming = [k for k, a in enumerate(accumulations) if a.streams]
    if not streaming:
        return list(range(len(accumulations)))
    return [k for k in range(len(accumulations)) if k != streaming[-1]] + [streaming[-1]]


def _predict_ensemble(pres: list[Preprocessed], members: list[LoadedModel], device: torch.device,
                      options: CaseOptions, budget: Budget, t: dict[str, float]) -> tuple[torch.Tensor, dict]:
    """Several models, each on its own preprocessed image (`pres`), one after the other (`_run_order`),
    combined band by band (`BandEnsemble`).

    The budget spans the models: a model's optional work leaves time for the first pass of every later
    model, and a later model runs only when its first pass fits (projected from the seconds per window of
    the model before, scaled by the patch volume); every model done adds a complete answer."""
    accumulations = [_accumulation(m.model, p, device, options) for m, p in zip(members, pres)]
    order = _run_order(accumulations)
    members, pres, accumulations = ([xs[k] for k in order] for xs in (members, pres, accumulations))
    for k, (member, pre) in enumerate(zip(members[:-1], pres)):
        if accumulations[k].streams:  # kept whole for the bands: not streamed
            accumulations[k] = choose_accumulation(member.model, tuple(pre.data.shape[1:]), True, device,
                                                   batch_size=options.batch_size)
    plans = [_plan(m, p, options) for m, p in zip(members, pres)]
    streams_last = accumulations[-1].streams
    reference = len(members) - 1 if streams_last else 0
    ensemble = BandEnsemble(members[reference].model, pres[reference], members[0].model.num_classes)
    # the first pass of each model, in window forwards weighted by the patch's voxels
    first_pass = [len(plan.windows) * float(np.prod(m.model.patch_size)) for m, plan in zip(members, plans)]
    runs: list[dict] = []
    s_per_voxel = None  # seconds per window voxel of the model run last
    for k, (member, pre) in enumerate(zip(members, pres)):
        model, volume = member.model, float(np.prod(member.model.patch_size))
        run = {"model": model.describe(), "listed": order[k] + 1, "weight": member.weight,
               "items_planned": len(plans[k].items)}
        runs.append(run)
        if k > 0 and s_per_voxel is not None and not budget.allows(s_per_voxel * first_pass[k]):
            run.update(status="skipped", reason=f"time budget: {budget.left():.1f} s left, its first pass needs "
                       f"about {s_per_voxel * first_pass[k]:.1f} s")
            continue
        backend = _backend(member, pre, device, options, budget, t, plans[k])
        streamed = k == reference and streams_last
        t1 = time.monotonic()
        result, _, report = predict(model, backend, pre.data, options.step_size, options.mirroring, accumulations[k],
                                    budget, options.batch_size, progress=options.progress, in_flight=options.in_flight,
                                    reserved_items=sum(first_pass[k + 1:]) / volume,
                                    sink=ensemble.sink(member.weight, device) if streamed else None)
        t["sliding_window"] = t.get("sliding_window", 0.0) + time.monotonic() - t1
        t1 = time.monotonic()
        if not streamed:
            ensemble.keep(result, pre, model, member.weight, device)
        del result
        t["finalize"] = t.get("finalize", 0.0) + time.monotonic() - t1
        if report.seconds_per_item is not None:
            s_per_voxel = report.seconds_per_item / volume
        run.update(status="done", prediction=asdict(report), compile=backend.describe())
    t1 = time.monotonic()
    labels = ensemble.result(device)
    t["finalize"] += time.monotonic() - t1
    return labels, {"model": [r["model"] for r in runs], "network_input_shape": [list(p.data.shape[1:]) for p in pres],
                    "prediction": _ensemble_prediction(runs), "compile": [r.get("compile") for r in runs]}


def _ensemble_prediction(runs: list[dict]) -> dict:
    """The case report's "prediction" of an ensemble: work done and skipped over all models, and per model."""
    out: dict = {"items_planned": 0, "items_done": 0, "passes_done": [], "skipped": [], "models": runs}
    for r in runs:
        name = f"model {r['listed']} ({r['model']['configuration']})"
        out["items_planned"] += r["items_planned"]
        if r["status"] == "skipped":
            out["skipped"].append(f"{name}: not run ({r['reason']})")
            continue
        p = r["prediction"]
        out["items_done"] += p["items_done"]
        out["passes_done"] += [f"{name} {s}" for s in p["passes_done"]]
        out["skipped"] += [f"{name} {s}" for s in p["skipped"]]
    return out


def load_models(args: argparse.Namespace, device: torch.device,
                verified: list[VerifiedMember] | None = None) -> list[LoadedModel]:
    """The run's models, each loaded with its backend slot: those of `verify.verify_members` (--weights, an
    ensemble file, the bundled weights; label maps compared and every folder verified before any network
    loads), verified here unless `verified` holds them.

    Raises ModelError or TritonError."""
    if verified is None:
        verified = verify_members(args.weights, args.folds)
    on_triton = getattr(args, "backend", "local") == "triton"
    if on_triton and len(verified) > 1:
        raise ModelError(f"--backend triton serves one model; this run has {len(verified)} (an ensemble): run it "
                         "with --backend local")
    models = []
    for member in verified:
        # with Triton the local networks only stand in for the served ones: keep them off the GPU
        model = load_model(member.model.folder, device=torch.device("cpu") if on_triton else device,
                           expected_classes=label_map().num_classes, verified=member.model)
        models.append(LoadedModel(model, BackendSlot(triton_backend(args, model.folder, model.folds)),
                                  member.weight))
    if len(models) > 1:
        log.info("ensemble of %d models: %s", len(models), ", ".join(
            f"{m.model.folder} ({m.model.configuration_name}, weight {m.weight:g})" for m in models))
    return models
