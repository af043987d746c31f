"""AOT packages: built by the command, loaded without a warm-up, and answering exactly as the networks do.

The package is built for the CPU here (the code path is the device's); the GPU build is the benchmark's.
"""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cbctseg.networks import aot_package, precision
from cbctseg.networks.compile_cache import maybe_compile
from cbctseg.model.loading import load_model
from cbctseg.model.manifest import build_manifest, write_manifest
from conftest import finish_processes, run_process, start_process, write_phantom

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def packaged(aot_packaged):
    """A copy of the bundled weights with a CPU package built by `process.py compile --aot` (conftest; the tests
    here leave it as it is)."""
    return aot_packaged


def _window(model, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 1, *model.patch_size), generator=g)


def test_the_package_answers_as_each_folds_network(packaged):
    model = load_model(packaged)
    aot = aot_package.load(model.networks, packaged, CPU)
    assert aot is not None and len(aot) == 2
    x = _window(model)
    with torch.inference_mode():
        eager = [net(x) for net in model.networks]
        compiled = [net(x) for net in aot]
    scale = max(float(e.abs().max()) for e in eager)
    for e, c in zip(eager, compiled):
        assert c.shape == e.shape and c.dtype == e.dtype
        assert float((e - c).abs().max()) <= 1e-4 * scale
    # one package, two folds: each runner computes with its own fold's weights, not the ones it was built with
    assert float((eager[0] - eager[1]).abs().max()) > 100 * float((eager[1] - compiled[1]).abs().max())


def test_moved_parameters_are_bound_again(packaged):
    model = load_model(packaged)
    aot = aot_package.load(model.networks, packaged, CPU)
    x = _window(model, seed=1)
    net = model.networks[1]
    with torch.inference_mode():
        before = aot[1](x)
    net.to(torch.float64).to(torch.float32)  # new parameter storage, same values
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)  # different values, so a runner still reading the old storage would be caught
        with torch.inference_mode():
            after, expected = aot[1](x), net(x)
    assert float((after - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
    assert float((after - before).abs().max()) > 1e-2


def test_other_shapes_run_on_the_network(packaged):
    model = load_model(packaged)
    aot = aot_package.load(model.networks, packaged, CPU)
    x = _window(model, batch=2, seed=2)  # the package is for batch 1: the last, odd batch of a batch-2 run
    with torch.inference_mode():
        assert torch.equal(aot[0](x), model.networks[0](x))
    assert aot[0].fallbacks == 1


def test_prediction_with_the_package_equals_prediction_without(packaged, tmp_path):
    # two overlapping windows, both folds, every flip: each window's pass goes through the package
    write_phantom(tmp_path / "in" / "case.mha", shape=(48, 72, 90), seed=7)
    outs = {}
    # the two runs at once: each is its own process
    procs = {mode: start_process("--input", str(tmp_path / "in"), "--output", str(tmp_path / mode), "--weights",
                                 str(packaged), "--compile", mode, "--report", str(tmp_path / f"{mode}.json"))
             for mode in ("auto", "off")}
    results = finish_processes(procs)
    for mode, r in results.items():
        assert r.returncode == 0, r.stderr[-3000:]
        report = json.loads((tmp_path / f"{mode}.json").read_text())[0]
        assert report["compile"]["kind"] == ("aot" if mode == "auto" else "torch.compile")
        assert report["compile"]["compile"] is (mode == "auto")
        (path,) = (tmp_path / mode / "images" / "oral-pharyngeal-segmentation").glob("*.mha")
        outs[mode] = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert np.array_equal(outs["auto"], outs["off"])
    assert len(np.unique(outs["auto"])) > 2  # structures, not background only


def test_a_package_for_other_plans_is_not_used(packaged, tmp_path):
    folder = tmp_path / "weights"
    shutil.copytree(packaged, folder)
    plans = folder / "plans.json"
    plans.write_text(plans.read_text() + "\n")  # same architecture, but the name no longer matches
    write_manifest(folder, build_manifest(folder, ["0", "1"]))  # a model of its own, sealed
    model = load_model(folder)
    assert aot_package.load(model.networks, folder, CPU) is None


def test_a_damaged_package_warns_and_prediction_goes_on(packaged, tmp_path, caplog):
    folder = tmp_path / "weights"
    shutil.copytree(packaged, folder)
    path = aot_package.package_path(folder, CPU)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    model = load_model(folder)
    with caplog.at_level(logging.WARNING):
        backend = maybe_compile(model.networks, CPU, folder, 64, None)
    # eager (and lean)
    assert tuple(n.net for n in backend.networks) == model.networks and backend.describe()["compile"] is False
    assert "AOT package" in caplog.text and "not used" in caplog.text


def test_compile_refuses_a_missing_model_folder(tmp_path):
    r = run_process("compile", "--aot", "--weights", str(tmp_path / "none"), "--device", "cpu")
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert not (tmp_path / "none").exists()


def test_a_package_for_other_weight_dtypes_is_not_used(packaged, caplog):
    # a package's kernels are built for its weights' dtypes; on a GPU load_model stores convolutions in fp16
    model = load_model(packaged)
    for net in model.networks:
        precision.store_convolutions_as(net, torch.bfloat16)
    with caplog.at_level(logging.WARNING):
        assert aot_package.load(model.networks, packaged, CPU) is None
    assert "float32 weights" in caplog.text


def test_a_package_for_contiguous_weights_is_not_used_by_channels_last_networks(packaged, caplog):
    # the package's kernels assume the weights' layout it was built for
    model = load_model(packaged)
    for net in model.networks:
        net.to(memory_format=torch.channels_last_3d)
    with caplog.at_level(logging.WARNING):
        assert aot_package.load(model.networks, packaged, CPU) is None
    assert "channels_last_3d" in caplog.text
