"""The time budget, partial ensembles, where logits accumulate, and out-of-memory recovery."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cbctseg.io import gc_io
from cbctseg.inference.finalize import finalize
from cbctseg.model.loading import load_model
from cbctseg.inference.ensemble import LoadedModel
from cbctseg.networks import lean_forward
from cbctseg.networks.backend import BackendSlot, LocalBackend
from cbctseg.training.phantom import PhantomSpec, make_phantom_arrays
from cbctseg.inference.predictor import Accumulation, predict
from cbctseg.inference.preprocess import preprocess
from cbctseg.options import CaseOptions
from cbctseg.case import predict_case
from cbctseg.inference.schedule import Budget, plan_work, sliding_windows
from cbctseg.inference.stitching import Accumulator, StreamedLabels
from conftest import WEIGHTS, write_phantom

CPU = torch.device("cpu")


class Recorder(torch.nn.Module):
    """Wraps a network: an optional fake-clock tick per call, an injected OOM, and a record of calls."""

    def __init__(self, net, clock=None, tick_s=1.0, oom_on_call=None):
        super().__init__()
        self.net, self.clock, self.tick_s, self.oom_on_call = net, clock, tick_s, oom_on_call
        self.calls, self.windows_seen, self.outputs = 0, 0, []

    def forward(self, x):
        self.calls += 1
        if self.calls == self.oom_on_call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        if self.clock is not None:
            self.clock.t += self.tick_s
        self.windows_seen += x.shape[0]
        y = self.net(x)
        self.outputs.append(y.detach().clone())
        return y


class Replay(torch.nn.Module):
    """Wraps a network: a batch seen before gets the logits computed for it then (the same bits a second call
    gives on the CPU, the same tensor: the engine only reads a network's output), so that comparisons of where
    logits are summed pay for each forward pass once."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, {}

    def forward(self, x):
        key = (tuple(x.shape), x.dtype, hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest())
        if key not in self.seen:
            self.seen[key] = self.net(x)
        return self.seen[key]


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _model(folds=("0", "1"), **wrap):
    """The model and a backend whose networks are Recorders around the model's own, run lean as the engine runs
    them."""
    model = load_model(WEIGHTS, list(folds), CPU)
    return model, LocalBackend([Recorder(lean_forward.lean(n), **wrap) for n in model.networks], CPU,
                               {"kind": "recorded"})


def _data(model, shape, seed=2):
    img, _ = make_phantom_arrays(PhantomSpec(shape=shape, seed=seed))
    return preprocess(img, [1.0, 1.0, 1.0], model, CPU)


def test_slow_network_and_short_budget_end_in_time_with_a_complete_label_map(tmp_path, weights):
    image, _ = write_phantom(tmp_path / "in" / "slow.mha", shape=(40, 64, 64), seed=1)
    # a network that takes 1 s per window on a fake clock: 6 s leave room for some of the 8 windows, not all
    clock = FakeClock()
    model, backend = _model(clock=clock)
    case = gc_io.Case("slow.mha", tmp_path / "in" / "slow.mha", tmp_path / "out" / "slow.mha")
    args = CaseOptions()
    start = clock()
    budget_s = 6.0
    budget = Budget(start + budget_s, clock=clock)
    report = predict_case(case, [LoadedModel(model, BackendSlot(backend))], CPU, args, budget)
    elapsed = clock() - start
    # the windows run stop in time to leave what finalize and writing are projected to need
    assert elapsed + budget.reserve_s <= budget_s, (elapsed, budget.reserve_s)
    pred = report["prediction"]
    assert pred["items_planned"] == 8 and 1 <= pred["items_done"] < 8
    assert pred["items_done"] == sum(n.calls for n in backend.networks) == int(elapsed)
    assert pred["passes_done"][0] == "fold 0" and pred["skipped"]
    assert all("time budget" in s for s in pred["skipped"])
    out = sitk.ReadImage(str(case.output_path))
    assert out.GetSize() == image.GetSize() and out.GetPixelID() == sitk.sitkUInt8


def test_partial_ensemble_is_the_weighted_average_of_the_items_done(weights):
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    clock = FakeClock()
    model, backend = _model(clock=clock)
    pre = _data(model, (56, 96, 96))
    windows = sliding_windows(tuple(pre.data.shape[1:]), model.patch_size, 0.5)
    assert len(windows) == 8
    # 8 windows per pass; the fake clock ticks 1 s per window: room for the first pass and 3 more windows
    budget = Budget(clock.t + 11.5, clock=clock)
    logits, is_labels, report = predict(model, backend, pre.data, 0.5, True, Accumulation.DEVICE, budget,
                                          progress=False)
    assert not is_labels and report.items_done == 11 and report.items_planned == 64
    items = plan_work(2, model.mirror_axes, True, windows)[:11]
    # the weights as the engine uses them (fp16, as nnU-Net), summed exactly here
    g = compute_gaussian(model.patch_size, 1.0 / 8, 10, device=CPU).double()
    num = torch.zeros((model.num_classes, *pre.data.shape[1:]), dtype=torch.float64)
    den = torch.zeros(pre.data.shape[1:], dtype=torch.float64)
    calls = {0: iter(backend.networks[0].outputs), 1: iter(backend.networks[1].outputs)}
    for it in items:
        out = next(calls[it.fold])[0].double()
        out = torch.flip(out, [a + 1 for a in it.flip]) if it.flip else out
        num[(slice(None), *it.window)] += out * g
        den[it.window] += g
    expected = (num / den).float()
    # fp16 sums (nnU-Net's precision) are exact to ~1e-3 relative, except where every covering window's
    # Gaussian weight is near zero (image corners): compare values there by their argmax only
    solid = den >= 0.01
    torch.testing.assert_close(logits.float()[:, solid], expected[:, solid], atol=0.05, rtol=0.01)
    assert float((logits.argmax(0) == expected.argmax(0)).float().mean()) >= 0.999
    assert report.passes_done == ["fold 0"] and len(report.skipped) == 7


@pytest.mark.parametrize("batch_size", [1, 2])
def test_streamed_device_and_cpu_accumulation_give_the_same_labels(weights, batch_size):
    model, _ = _model(folds=("0",))
    # 4 windows, overlapping along z (the streamed bands' axis) and x; 16 items with the flips
    pre = _data(model, (56, 72, 100), seed=4)
    assert len(sliding_windows(tuple(pre.data.shape[1:]), model.patch_size, 0.5)) == 4
    # every mode sends the same windows in the same batches: each batch's logits are computed once
    backend = LocalBackend([Replay(lean_forward.lean(n)) for n in model.networks], CPU, {"kind": "replay"})
    labels = {}
    for mode in Accumulation:
        result, is_labels, report = predict(model, backend, pre.data, 0.5, True, mode, None, batch_size,
                                            progress=False)
        assert is_labels == mode.streams and report.items_done == 16
        labels[mode] = finalize(result, pre, model, CPU, is_labels).numpy()
    ref = labels[Accumulation.DEVICE]
    # the same sums in the same order
    np.testing.assert_array_equal(labels[Accumulation.CPU], ref)
    # the same sums in another order (slab by slab): fp16 rounding may flip a near-tie
    agreement = float((labels[Accumulation.STREAMED] == ref).mean())
    assert agreement >= 0.999, agreement
    # the band on the CPU: on a CPU device the same band, the same sums
    np.testing.assert_array_equal(labels[Accumulation.STREAMED_CPU], labels[Accumulation.STREAMED])


def test_out_of_memory_mid_case_loses_no_finished_work(weights):
    ref_model, ref_backend = _model(folds=("0",))
    pre = _data(ref_model, (56, 96, 96), seed=6)
    ref, _, _ = predict(ref_model, ref_backend, pre.data, 0.5, False, Accumulation.DEVICE, None, 1, progress=False)
    model, backend = _model(folds=("0",), oom_on_call=3)
    out, _, report = predict(model, backend, pre.data, 0.5, False, Accumulation.DEVICE, None, 2, progress=False)
    net = backend.networks[0]
    # batches of 2: two batches done, the third fails, then batch size 1 for the 4 windows left
    assert net.windows_seen == 8 and net.calls == 2 + 1 + 4
    assert report.items_done == 8 and report.batch_size == 1 and any("out of memory" in e for e in report.events)
    # batch 2 and batch 1 convolutions differ in the last bits; fp16 sums keep that small
    torch.testing.assert_close(out.float(), ref.float(), atol=5e-2, rtol=1e-2)
    assert float((out.argmax(0) == ref.argmax(0)).float().mean()) >= 0.9999


@pytest.mark.parametrize("n", [3, 8, 20, 39])
def test_streamed_labels_are_the_whole_volume_sums_argmax_bit_for_bit(n):
    # the band keeps logit sums only and sums the weights again when slices finish; the band shifts in place
    # in chunks (no copy of the kept slices): shifts smaller and larger than a chunk
    shape, patch, classes = (n + 40, 5, 6), (40, 5, 4), 4
    g = torch.Generator().manual_seed(n)
    weight = torch.rand(patch, generator=g) + 0.1
    streamed = StreamedLabels(classes, shape, patch[0], CPU)
    whole = Accumulator(classes, shape, CPU)
    for z in (0, n):
        for x, flip in ((0, ()), (2, (1,)), (2, ())):
            window = (slice(z, z + 40), slice(0, 5), slice(x, x + 4))
            logits = torch.randn((classes, *patch), generator=g).half()
            streamed.add(window, logits, weight, flip)
            whole.add(window, logits, weight, flip)
        if z == 0:
            streamed.finish_before(n)
            keep = 40 - n
            assert streamed.z0 == n and torch.equal(streamed.band.logits[:, :keep], whole.logits[:, n:40])
            assert not streamed.band.logits[:, keep:].any()
            assert all(w[0].stop > n for w, _ in streamed.added)
    labels = streamed.result()
    assert torch.equal(labels, whole.average().argmax(0).to(torch.uint8))
