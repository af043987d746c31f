"""Run the folds' networks on a Triton Inference Server: `TritonBackend`, one `TritonNetwork` per fold.

`TritonNetwork(x)` takes what the sliding window gives a network, x (B, 1, *patch), sends it as an fp16
binary tensor over gRPC and returns float32 logits (B, C, *patch) on x's device. `submit(x)` does the same
asynchronously and returns a Future, so a caller can keep several windows in flight and let the
server's dynamic batcher fill its batches. Before the first request each network checks that the server
is live, the model ready, its tensors what cbctseg exports, and its weights hash that of the local model
folder; any failure, after retries with backoff for the transient ones, is a `TritonError` naming the
server and the model.
"""
from __future__ import annotations

import argparse
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from cbctseg.networks.triton_export import HASH_PARAM, VERSION, model_name, weights_hash

T = TypeVar("T")
# worth another try: the server restarting or overloaded, a deadline missed; anything else is final
TRANSIENT = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED",
             "StatusCode.ABORTED"}
MAX_MESSAGE_BYTES = 2**31 - 1 - (1 << 20)  # gRPC's limit, less room for the message's own fields
NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}


class TritonError(RuntimeError):
    """The Triton server cannot serve this model: down, not ready, another version, or a failed request."""

    def __init__(self, url: str, model: str, message: str):
        super().__init__(f"Triton server {url}, model {model}: {message}")
        self.url, self.model = url, model


def _status(e: Exception) -> str:
    status = getattr(e, "status", None)
    return str(status() if callable(status) else status)


def _message(e: Exception) -> str:
    """One line: a server-side traceback shrinks to its first line and the exception it ends with."""
    msg = getattr(e, "message", None)
    lines = [s.strip() for s in str(msg() if callable(msg) else e).splitlines() if s.strip()] or [type(e).__name__]
    last = next((s for s in reversed(lines) if re.match(r"[\w.]*(Error|Exception)\b", s)), lines[-1])
    text = lines[0] if len(lines) == 1 or last == lines[0] else f"{lines[0]} ... {last}"
    return f"{text[:800]} ({_status(e)})"


class TritonNetwork:
    """One fold's network served by Triton, callable like the torch module it replaces."""

    def __init__(self, url: str, model: str, expected_hash: str | None = None, timeout_s: float = 120.0,
                 retries: int = 3, backoff_s: float = 0.5, out_dtype: torch.dtype = torch.float32):
        """out_dtype float16 halves the client's memory per window in flight (the predictor takes either)."""
        import tritonclient.grpc as grpcclient

        if out_dtype not in NUMPY_DTYPES:
            raise ValueError(f"out_dtype {out_dtype}: float32 or float16")
        self.url, self.model, self.version, self.out_dtype = url, model, str(VERSION), out_dtype
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self._grpc = grpcclient
        self._client = grpcclient.InferenceServerClient(url)
        self._check(expected_hash)

    # --- connection and checks ---

    def _error(self, message: str) -> TritonError:
        return TritonError(self.url, self.model, message)

    def _delay(self, attempt: int) -> float:
        return min(10.0, self.backoff_s * 2**attempt)

    def _retrying(self, what: str, call: Callable[[], T], ok: Callable[[T], bool] = lambda _: True,
                  not_ok: Callable[[], str] = str) -> T:
        """call() until it succeeds and ok(result), retrying transient errors and not-ok results with backoff."""
        from tritonclient.utils import InferenceServerException

        for attempt in range(self.retries + 1):
            try:
                result = call()
                if ok(result):
                    return result
                problem, transient = not_ok(), True
            except InferenceServerException as e:
                problem, transient = _message(e), _status(e) in TRANSIENT
            if not transient or attempt == self.retries:
                raise self._error(f"{what}: {problem} (after {attempt + 1} attempt(s))")
            time.sleep(self._delay(attempt))
        raise AssertionError("unreachable")

    def _check(self, expected_hash: str | None) -> None:
        c, t = self._client, min(self.timeout_s, 10.0)  # control calls are small: a dead host shows quickly
        self._retrying("server not reachable", lambda: c.is_server_live(client_timeout=t), bool, lambda: "not live")
        self._retrying("server not ready", lambda: c.is_server_ready(client_timeout=t), bool, lambda: "not ready")
        self._retrying("model not ready", lambda: c.is_model_ready(self.model, self.version, client_timeout=t), bool,
                       lambda: f"version {self.version} is not loaded (unknown name, or still loading){self._served()}")
        meta = self._retrying("model metadata", lambda: c.get_model_metadata(
            self.model, self.version, as_json=True, client_timeout=t))
        config = self._retrying("model config", lambda: c.get_model_config(
            self.model, self.version, as_json=True, client_timeout=t))["config"]
        served = config.get("parameters", {}).get(HASH_PARAM, {}).get("string_value")
        if expected_hash is not None and served != expected_hash:
            raise self._error(f"serves weights {str(served)[:12]}, the local model folder has {expected_hash[:12]} "
                              "(export this model folder with `export-triton` and reload the server, or use the "
                              "model folder the server was exported from)")
        ins, outs = meta.get("inputs", []), meta.get("outputs", [])
        shapes = [[int(d) for d in t["shape"]] for t in ins + outs]
        if (len(ins), len(outs)) != (1, 1) or any(t["datatype"] != "FP16" for t in ins + outs) \
                or any(len(s) != 5 or s[0] != -1 for s in shapes) or shapes[0][1] != 1 \
                or shapes[0][2:] != shapes[1][2:]:
            raise self._error(f"tensors are not a cbctseg export (fp16 (-1, 1, *patch) -> (-1, C, *patch)): {meta}")
        self.input_name, self.output_name = ins[0]["name"], outs[0]["name"]
        self.patch_size = tuple(shapes[0][2:])
        self.num_classes = shapes[1][1]
        out_bytes = 2 * self.num_classes * int(np.prod(self.patch_size))
        # several windows per request, within the model's batch and gRPC's message size
        self.max_batch = max(1, min(int(config.get("max_batch_size", 1)) or 1, MAX_MESSAGE_BYTES // out_bytes))

    def _served(self) -> str:
        try:
            index = self._client.get_model_repository_index(as_json=True, client_timeout=10.0)
            names = sorted({m["name"] for m in index.get("models", []) if m.get("state") == "READY"})
            return f"; ready on the server: {names}"
        except Exception:  # the index endpoint may be restricted; the message is complete without it
            return ""

    # --- inference ---

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.submit(x).result()

    def submit(self, x: torch.Tensor) -> Future:
        """Send x (B, 1, *patch); the Future gives logits (B, C, *patch) (out_dtype) on x's device, or a TritonError."""
        if x.ndim != 5 or x.shape[0] == 0 or tuple(x.shape[1:]) != (1, *self.patch_size):
            raise self._error(f"input of shape {tuple(x.shape)}; the model takes (B, 1, {self.patch_size})")
        device = x.device
        arr = x.detach().to("cpu", torch.float16).contiguous().numpy()
        chunks = [arr[i:i + self.max_batch] for i in range(0, arr.shape[0], self.max_batch)]
        out: Future = Future()
        parts: list[np.ndarray | None] = [None] * len(chunks)
        lock = threading.Lock()

        def part_done(k: int, fut: Future) -> None:
            if fut.exception() is not None:
                with lock:
                    if not out.done():
                        out.set_exception(fut.exception())
                return
            with lock:
                parts[k] = fut.result()
                complete = all(p is not None for p in parts) and not out.done()
            if complete:
                try:
                    y = torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])
                    out.set_result(y.to(device=device, dtype=self.out_dtype))
                except Exception as e:  # a failure here must reach the caller, not die in a gRPC thread
                    out.set_exception(e)

        for k, chunk in enumerate(chunks):
            fut: Future = Future()
            fut.add_done_callback(lambda f, k=k: part_done(k, f))
            self._send(chunk, fut, 0)
        return out

    def _send(self, arr: np.ndarray, fut: Future, attempt: int) -> None:
        g = self._grpc
        inp = g.InferInput(self.input_name, list(arr.shape), "FP16")
        inp.set_data_from_numpy(arr)

        def done(result, error) -> None:  # on a gRPC thread: whatever happens must end in fut
            try:
                if error is None:
                    y = result.as_numpy(self.output_name)
                    if y is None or y.shape != (arr.shape[0], self.num_classes, *self.patch_size):
                        raise self._error(f"answered {None if y is None else y.shape} for {arr.shape}")
                    fut.set_result(y.astype(NUMPY_DTYPES[self.out_dtype]))  # a copy: the buffer is not ours
                elif _status(error) in TRANSIENT and attempt < self.retries:
                    threading.Timer(self._delay(attempt), self._send, (arr, fut, attempt + 1)).start()
                else:
                    raise self._error(f"inference failed: {_message(error)} (after {attempt + 1} attempt(s))")
            except Exception as e:
                fut.set_exception(e)

        try:
            self._client.async_infer(self.model, [inp], done, model_version=self.version,
                                     outputs=[g.InferRequestedOutput(self.output_name)], client_timeout=self.timeout_s)
        except Exception as e:  # raised before the request left (closed channel, bad arguments)
            fut.set_exception(self._error(f"inference not sent: {_message(e)}"))

    def close(self) -> None:
        self._client.close()


def remote_networks(url: str, weights_dir: Path, folds: list[str], timeout_s: float = 120.0,
                    retries: int = 3) -> list[TritonNetwork]:
    """One TritonNetwork per fold, each checked against the weights hash of weights_dir's fold."""
    return [TritonNetwork(url, model_name(str(f)), weights_hash(Path(weights_dir), str(f)), timeout_s, retries)
            for f in folds]


class TritonBackend:
    """The backend (`networks.backend.Backend`) of folds served by Triton: requests go ahead of time (`submit`)."""

    sends_ahead = True

    def __init__(self, networks: list[TritonNetwork], url: str):
        self.networks, self.url = tuple(networks), url

    def forward(self, fold: int, x: torch.Tensor) -> torch.Tensor:
        return self.networks[fold](x)

    def submit(self, fold: int, x: torch.Tensor) -> Future:
        return self.networks[fold].submit(x)

    def describe(self) -> dict:
        return {"kind": "triton", "compile": False, "reason": f"networks on Triton at {self.url}"}


def triton_backend(args: argparse.Namespace, weights_dir: Path, folds: list[str]) -> TritonBackend | None:
    """With --backend triton, the backend of the model's folds on the server (raises TritonError); else None."""
    if getattr(args, "backend", "local") != "triton":
        return None
    return TritonBackend(remote_networks(args.triton_url, weights_dir, folds, args.triton_timeout,
                                         args.triton_retries), args.triton_url)
