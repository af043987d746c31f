"""When compiling the networks pays: the pure decision rule of cbctseg.networks.compile_cache (fast, CPU only)."""
from __future__ import annotations

import pytest
import torch

from cbctseg.networks.compile_cache import Costs, cache_path, decide, maybe_compile

# Costs() defaults are the H100's measured times: 0.131 s eager, 0.065 s compiled, 45 s cold warm-up, 17 s with the cache


def test_never_on_the_cpu():
    d = decide("cpu", 100_000, None, cache_available=True)
    assert d["compile"] is False and "CPU" in d["reason"]


@pytest.mark.parametrize("forwards, cache", [(64, False), (216, False), (64, True), (216, True)])
def test_on_an_h100_one_case_never_wins_back_the_warm_up(forwards, cache):
    # 216 forwards save 216 x 0.066 = 14.3 s: less than 45 s cold, and less than 17 s even with the cache
    assert decide("cuda", forwards, None, cache).get("compile") is False


def test_compiles_when_the_saving_exceeds_the_warm_up():
    # 0.066 s saved per forward: 700 forwards save 46 s > 45 s cold; 300 forwards save 19.8 s > 17 s with the cache
    assert decide("cuda", 700, None, False)["compile"] is True
    assert decide("cuda", 300, None, False)["compile"] is False
    assert decide("cuda", 300, None, True)["compile"] is True


def test_a_measured_slow_gpu_scales_the_saving():
    # a T4-like 1.0 s per eager forward: the compiled forward is 1.0 x 0.065 / 0.131 = 0.50 s, 216 forwards save 109 s
    d = decide("cuda", 216, None, False, eager_s_per_forward=1.0)
    assert d["compile"] is True
    assert d["compiled_s_per_forward"] == pytest.approx(0.4962, abs=1e-3)
    assert d["eager_total_s"] == pytest.approx(216.0)


def test_budget_too_short_for_the_warm_up_stays_eager():
    # in 30 s eager does 30 forwards; compiled would still be warming up
    assert decide("cuda", 216, 30.0, False, eager_s_per_forward=1.0)["compile"] is False


def test_budget_that_holds_only_the_compiled_run_compiles():
    # eager needs 216 s, compiled 45 + 107 = 152 s: within 200 s only compiling finishes
    d = decide("cuda", 216, 200.0, False, eager_s_per_forward=1.0)
    assert d["compile"] is True and "within 200 s" in d["reason"]


def test_budget_that_holds_both_decides_on_the_saving_alone():
    assert decide("cuda", 216, 10_000.0, False)["compile"] is decide("cuda", 216, None, False)["compile"]


def test_custom_costs():
    costs = Costs(eager_s=1.0, compiled_s=0.5, cold_compile_s=10.0, cached_compile_s=1.0)
    assert decide("cuda", 21, None, False, costs=costs)["compile"] is True  # 10.5 s > 10 s
    assert decide("cuda", 19, None, False, costs=costs)["compile"] is False
    assert decide("cuda", 3, None, True, costs=costs)["compile"] is True  # 1.5 s > 1 s


def test_cache_path_names_device_torch_and_plans(tmp_path):
    (tmp_path / "plans.json").write_text('{"a": 1}')
    p = cache_path(tmp_path, torch.device("cpu"))
    assert p.parent == tmp_path / "compile_cache" and p.suffix == ".bin"
    assert p.name.startswith("cpu-torch")
    (tmp_path / "plans.json").write_text('{"a": 2}')
    assert cache_path(tmp_path, torch.device("cpu")) != p  # other plans, other graph, other cache


def test_maybe_compile_leaves_cpu_networks_alone(tmp_path):
    nets = [torch.nn.Conv3d(1, 2, 1)]
    backend = maybe_compile(nets, torch.device("cpu"), tmp_path, 10_000, None)
    assert list(backend.networks) == nets and backend.describe()["compile"] is False  # the same modules (a plain Conv3d is not a U-Net to run lean)


def test_without_a_c_compiler_a_gpu_stays_eager_instead_of_failing_mid_case(tmp_path, monkeypatch):
    # a slim image: Triton could not build its launcher at the first compiled call, so do not compile at all
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    nets = [torch.nn.Conv3d(1, 2, 1)]
    backend = maybe_compile(nets, torch.device("cuda"), tmp_path, 10_000, None, force=True)
    d = backend.describe()
    assert list(backend.networks) == nets and d["compile"] is False and "C compiler" in d["reason"]
