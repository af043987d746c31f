"""How a model's fold networks run, behind one small interface the sliding window calls.

A backend runs fold `f`'s network on a batch of windows and says how it runs them (the case report's "compile"
entry). Three kinds exist: `LocalBackend` (here, eager and lean, torch.compile'd or from an AOT package; built by
`compile_cache.local_backend`) and `triton_backend.TritonBackend` (a Triton server, which also takes requests
ahead of time). The loaded `Model` is never changed by choosing one: a run keeps its backend beside the model.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Protocol

import torch

from cbctseg.networks.precision import autocast


class Backend(Protocol):
    """Runs a model's fold networks."""

    sends_ahead: bool  # whether `submit` sends requests ahead of time (else the loop only calls forward)

    def forward(self, fold: int, x: torch.Tensor) -> torch.Tensor:
        """Fold `fold`'s logits (B, C, *patch) for windows x (B, 1, *patch), on x's device: a tensor, or
        `lean_forward.ChunkedLogits`, whose channels are computed as the stitcher reads them."""

    def submit(self, fold: int, x: torch.Tensor) -> Future:
        """Send x ahead of time: a Future of what forward would return (only where sends_ahead)."""

    def describe(self) -> dict:
        """How the networks run, for the case report (kind, whether compiled, and why)."""


class LocalBackend:
    """Networks on this machine's device, run in line under the device's autocast."""

    sends_ahead = False

    def __init__(self, networks: Sequence[Callable[[torch.Tensor], torch.Tensor]], device: torch.device,
                 decision: dict):
        self.networks, self.device, self.decision = tuple(networks), torch.device(device), decision

    def forward(self, fold: int, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):
            return self.networks[fold](x)

    def submit(self, fold: int, x: torch.Tensor) -> Future:
        out: Future = Future()
        out.set_result(self.forward(fold, x))
        return out

    def describe(self) -> dict:
        return self.decision


class BackendSlot:
    """The backend the cases of one run share for one model: given at the start (Triton) or chosen by the first
    case that needs it (whether compiling pays depends on that case), once, also when cohort threads ask at once."""

    def __init__(self, backend: Backend | None = None):
        self._backend = backend
        self._lock = threading.Lock()

    def get(self, choose: Callable[[], Backend]) -> Backend:
        """The backend, chosen now by `choose()` when none is yet."""
        with self._lock:
            if self._backend is None:
                self._backend = choose()
            return self._backend

    @property
    def chosen(self) -> Backend | None:
        return self._backend
