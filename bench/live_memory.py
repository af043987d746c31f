"""Bytes of the tensors alive while a computation runs, and their peak: on real tensors or on fake ones.

With torch's FakeTensorMode on a fake CUDA device (`cuda_autocast_without_a_gpu` for the autocast), this
gives a forward pass's tensor memory on a GPU without one: what `torch.cuda.max_memory_allocated` would
show less cuDNN workspaces and the allocator's rounding (forward_memory.py). Measurement only: not part of the
engine. The lean-forward test uses it on the CPU.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cbctseg.networks.precision import autocast_dtype


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive, their peak, and the operator that reached it."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0
        self.peak_op = ""

    def track(self, t: torch.Tensor, op: str = "") -> None:
        s = t.untyped_storage()
        key = s._cdata
        if key in self.live:
            return
        self.live[key] = s.nbytes()
        self.now += s.nbytes()
        weakref.finalize(s, self._free, key)
        if self.now > self.peak:
            self.peak, self.peak_op = self.now, op

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t, str(func.overloadpacket.__name__))
        return out


@contextlib.contextmanager
def cuda_autocast_without_a_gpu():
    """CUDA autocast without a GPU: torch.autocast refuses, but the dispatch key works on fake CUDA tensors."""
    before = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", autocast_dtype(torch.device("cuda")))
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", before[0])
        torch.set_autocast_dtype("cuda", before[1])
