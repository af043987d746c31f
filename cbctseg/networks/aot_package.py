"""Ahead-of-time compiled networks: an AOTInductor package of the architecture, built once, loaded in a second.

torch.compile pays its warm-up in every new process (tracing, then compiling or loading kernels); an
AOTInductor package (`torch._inductor.aoti_compile_and_package`) holds the compiled forward pass as a
shared library, so a process only loads it. The package holds no weights: each fold's runner is bound to
its network's own parameters (no copy, so no extra GPU memory), and one package serves every fold of the
architecture. Constants derived from the weights (fp16 casts and the like) are folded at run time from the
bound parameters, so a package never answers with the weights it was built from.

A package is specific to the device (GPU model, or CPU instruction set), torch build, plans and batch
size, which its file name says: `<weights>/compile_cache/<device>-torch<ver>-<plans>-b<batch>.pt2`.

    python process.py compile --aot [--weights DIR] [--device cuda] [--batch-size 1]
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from cbctseg.networks.device import cpu_lacks, device_tag, plans_tag, slug
from cbctseg.networks.precision import autocast, input_dtype, layout_of

log = logging.getLogger(__name__)

CACHE_DIR = "compile_cache"
FOLDED = "_FOLDED_CONST_"  # names AOTInductor gives the constants it folds at run time
PREFIX = "net."  # the network's parameter names inside the exported wrapper


class _Autocast(torch.nn.Module):
    """The network as the predictor runs it (`device.autocast`), so that export records the autocast."""

    def __init__(self, net: torch.nn.Module, device: torch.device):
        super().__init__()
        self.net, self.device = net, device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):
            return self.net(x)


def package_path(weights_dir: Path, device: torch.device, batch_size: int = 1) -> Path:
    """Where the package for this device, torch build, plans and batch size lives."""
    name = f"{device_tag(device)}-torch{slug(torch.__version__)}-{plans_tag(weights_dir)}-b{batch_size}.pt2"
    return Path(weights_dir) / CACHE_DIR / name


def build(net: torch.nn.Module, patch: tuple[int, ...], in_channels: int, device: torch.device, path: Path,
          batch_size: int = 1, max_autotune: bool = False) -> float:
    """Export `net` (on `device`) for window-shaped inputs and compile it into a package at `path`; seconds taken.

    max_autotune: let inductor time its kernel choices (convolutions included) on this device; slower to
    build, which a package pays once. Written under a temporary name and renamed, so a package that exists
    is complete.
    """
    device = torch.device(device)
    shape = (batch_size, in_channels, *patch)
    t0 = time.monotonic()
    x = torch.zeros(shape, device=device, dtype=input_dtype(device))
    with torch.no_grad():
        exported = torch.export.export(_Autocast(net, device).eval(), (x,))
    meta = {"cbctseg_input_shape": json.dumps(list(shape)), "cbctseg_input_dtype": _name(x.dtype),
            "cbctseg_weights": _weights_dtypes(net), "cbctseg_device": device_tag(device),
            "cbctseg_max_autotune": str(max_autotune)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")
    try:
        torch._inductor.aoti_compile_and_package(
            exported, package_path=str(tmp),
            inductor_configs={"aot_inductor.package_constants_in_so": False,
                              "aot_inductor.use_runtime_constant_folding": True,
                              "aot_inductor.metadata": meta, "max_autotune": max_autotune})
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return time.monotonic() - t0


class AotNetwork(torch.nn.Module):
    """A fold's network run by a package's compiled forward pass; other input shapes go to the network itself.

    The runner reads the network's parameters in place; when they move (`.to()`), it is bound to them again.
    """

    def __init__(self, runner, net: torch.nn.Module, shape: tuple[int, ...], dtype: torch.dtype, names: set[str],
                 name: str):
        super().__init__()
        self.net, self.shape, self.dtype, self.names, self.name = net, tuple(shape), dtype, names, name
        self._runner, self._bound, self._ptr = runner, None, None
        self.fallbacks = 0

    def _bind(self) -> None:
        constants = {n: v for n, v in _named_tensors(self.net).items() if n in self.names}
        self._runner.load_constants(constants, user_managed=True)
        # user_managed: the runner reads these tensors without owning them; holding them keeps them alive
        self._bound = constants
        self._ptr = self._pointers()

    def _pointers(self) -> tuple[int, ...]:
        # every parameter's: a moved network's first parameter may land where it was while others do not
        return tuple(p.data_ptr() for p in self.net.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        param = next(self.net.parameters())
        if tuple(x.shape) != self.shape or x.dtype != self.dtype or x.device != param.device:
            self.fallbacks += 1
            if self.fallbacks == 1:
                log.info("%s: input %s %s is not the package's %s %s: the network runs it", self.name,
                         tuple(x.shape), _name(x.dtype), self.shape, _name(self.dtype))
            return self.net(x)
        if self._pointers() != self._ptr:
            self._bind()
        return self._runner(x.contiguous())


class _Runner:
    """A package's compiled forward pass, straight from torch's C++ loader: torch's Python wrapper imports the
    compiler (2 s) and checks the device by probing the CPU's instructions with test compilations (10-12 s in a
    process without a warm compiler cache, GPU or not); `load` checks the device itself, from name and metadata."""

    def __init__(self, path: Path, device_index: int):
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, device_index)

    def get_metadata(self) -> dict[str, str]:
        return self.loader.get_metadata()

    def get_constant_fqns(self) -> list[str]:
        return self.loader.get_constant_fqns()

    def load_constants(self, constants: dict[str, torch.Tensor], user_managed: bool) -> None:
        # (map, use_inactive, check_full_update, user_managed): the package's own names are all given, by `load`
        self.loader.load_constants(constants, False, False, user_managed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.loader.boxed_run([x])[0]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _weights_dtypes(net: torch.nn.Module) -> str:
    """The parameters' dtypes and layout as a package records them: its kernels are built for them
    (precision.prepare), e.g. 'float16,float32' or 'float16,float32 channels_last_3d'."""
    params = list(net.parameters())
    layout = " channels_last_3d" if any(layout_of(p) == torch.channels_last_3d for p in params) else ""
    return ",".join(sorted({_name(p.dtype) for p in params})) + layout


def _named_tensors(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers under every name they have, as the exported wrapper names them."""
    return {PREFIX + k: v for k, v in net.state_dict(keep_vars=True).items()}


def load(networks: list[torch.nn.Module], weights_dir: Path, device: torch.device, batch_size: int = 1,
         path: Path | None = None) -> list[AotNetwork] | None:
    """The networks behind the package for this device and batch size; None when there is none or it does not fit
    (never an error: prediction goes on with the networks as they are)."""
    device = torch.device(device)
    if path is None:
        if not any((Path(weights_dir) / CACHE_DIR).glob("*.pt2")):
            return None
        path = package_path(weights_dir, device, batch_size)
    if not path.is_file():
        return None
    try:
        runners = [_Runner(path, device.index if device.index is not None else -1) for _ in networks]
        meta = runners[0].get_metadata()
        lacking = cpu_lacks(meta.get("AOTI_CPU_ISA", "")) if device.type == "cpu" else []
        if lacking:
            raise ValueError(f"built for CPU instructions this CPU lacks: {lacking}")
        shape = tuple(json.loads(meta.get("cbctseg_input_shape", "[]")))
        dtype = getattr(torch, meta.get("cbctseg_input_dtype", "float32"))
        built_for = meta.get("cbctseg_weights", "float32")
        if any(_weights_dtypes(net) != built_for for net in networks):
            raise ValueError(f"built for {built_for} weights, the networks have {_weights_dtypes(networks[0])}")
        names = {n for n in runners[0].get_constant_fqns() if not n.startswith(FOLDED)}
        wrapped = []
        for i, (runner, net) in enumerate(zip(runners, networks)):
            # shared modules give a tensor several names and the package knows it by one; unused ones it drops
            unknown = names - _named_tensors(net).keys()
            if unknown or not names:
                raise ValueError(f"the package's constants are not this network's parameters "
                                 f"({len(unknown)} of {len(names)} unknown, e.g. {sorted(unknown)[:2]})")
            wrapped.append(AotNetwork(runner, net, shape, dtype, names, f"network {i}"))
            wrapped[-1]._bind()
    except Exception as e:  # a package from another build must not stop prediction
        log.warning("AOT package %s not used: %s: %s", path, type(e).__name__, str(e)[:300])
        return None
    log.info("AOT package %s loaded for %d network(s), input %s", path.name, len(wrapped), wrapped[0].shape)
    return wrapped
