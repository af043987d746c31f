"""A real Triton Inference Server on 127.0.0.1 serving an exported cbctseg repository, for tests.

PyTriton 0.7.0 bundles tritonserver 2.51, but only with its python backend (no onnxruntime or pytorch
backend), so the repository cannot be given to it as a `--model-repository`. Instead each exported
model (`<name>/1/model.onnx`) runs through onnxruntime in a PyTriton-bound callable under the same
name, version, tensor names, dtypes, shapes, `max_batch_size`, dynamic batching and config parameters
(the weights hash) as its config.pbtxt; what the client sees over gRPC is the same as from the official
container running the repository.

Two halves:
- `serve(repository)` (imported by the tests, in the project's venv) starts this file as a subprocess
  with the Triton venv's python and yields the gRPC url once every model is ready; `failing(url, after)`
  makes that server's models fail after some more answers, for as long as the block runs.
- `python test/triton_server.py --repository DIR --grpc-port N ...` (in the Triton venv) is that server.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_CONTROLS: dict[str, Path] = {}  # url of a running server -> its failure control file
HASH_PARAM = "cbctseg_weights_sha256"  # as cbctseg.networks.triton_export writes it (this file runs without cbctseg)


def triton_python() -> Path | None:
    """The Triton venv's python (CBCTSEG_TRITON_VENV, default .venv-triton) when it has PyTriton, else None."""
    venv = Path(os.environ.get("CBCTSEG_TRITON_VENV", REPO / ".venv-triton"))
    python = venv / "bin" / "python"
    if not python.is_file():
        return None
    ok = subprocess.run([str(python), "-c", "import pytriton.triton, onnxruntime"], capture_output=True, timeout=120)
    return python if ok.returncode == 0 else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(repository: Path, start_timeout_s: float = 180.0, attempts: int = 2) -> Iterator[str]:
    """Start a server for the repository; yields its gRPC url ("127.0.0.1:PORT"), stops it afterwards.

    attempts: starts to try; Triton's python backend can fail to start on a starved CPU (its stubs must
    answer a health check within a second), which is about this test server, not the code under test.
    """
    for attempt in range(attempts):
        try:
            server = _start(Path(repository), start_timeout_s)
            break
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    proc, url, workspace = server
    _CONTROLS[url] = workspace / "fail_after"
    try:
        yield url
    finally:
        _CONTROLS.pop(url, None)
        _stop(proc, workspace)


@contextlib.contextmanager
def failing(url: str, after: int) -> Iterator[None]:
    """While the block runs, every model of the server at url (from serve) answers `after` more requests, then
    returns an error for each later one; afterwards it answers again."""
    control = _CONTROLS[url]
    tmp = control.with_suffix(".tmp")
    tmp.write_text(f"{after} {time.monotonic_ns()}")  # the nonce: a new block counts afresh
    tmp.replace(control)
    try:
        yield
    finally:
        control.unlink(missing_ok=True)


def _start(repository: Path, start_timeout_s: float):
    import tritonclient.grpc as grpcclient

    python = triton_python()
    if python is None:
        raise RuntimeError("no Triton venv with PyTriton: run scripts/setup_triton_env.sh")
    ports = {"grpc": free_port(), "http": free_port(), "metrics": free_port()}
    workspace = Path(tempfile.mkdtemp(prefix="cbctseg-triton-"))  # PyTriton's files, removed on stop
    cmd = [str(python), str(Path(__file__).resolve()), "--repository", str(repository),
           "--workspace", str(workspace / "pytriton"), "--control", str(workspace / "fail_after"),
           *(f"--{k}-port={v}" for k, v in ports.items())]
    models = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    url = f"127.0.0.1:{ports['grpc']}"
    log_path = Path(os.environ.get("CBCTSEG_TRITON_LOG") or workspace / "server.log")
    log = open(log_path, "wb")
    # its own process group: stopping it reaches tritonserver and the python backend stubs it starts
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    client = grpcclient.InferenceServerClient(url)
    deadline = time.monotonic() + start_timeout_s
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Triton server exited with {proc.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Triton server not ready after {start_timeout_s:.0f} s:\n{_tail(log_path)}")
            with contextlib.suppress(Exception):
                if client.is_server_ready(client_timeout=2) and all(
                        client.is_model_ready(m, client_timeout=2) for m in models):
                    return proc, url, workspace
            time.sleep(0.5)
    except BaseException:
        _stop(proc, workspace)
        raise
    finally:
        client.close()


def _tail(path: Path, n: int = 3000) -> str:
    """The log's end, without the native stack frames that fill a crash report."""
    lines = [s for s in path.read_text(errors="replace").splitlines() if not re.match(r"\s*\d+# ", s)]
    return "\n".join(lines)[-n:]


def _stop(proc: subprocess.Popen, workspace: Path) -> None:
    """SIGTERM the server (PyTriton then stops tritonserver and the stubs), then SIGKILL what is left of its group."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
    group = [pid for pid in _pids() if _pgid(pid) == proc.pid]
    shm = {m for pid in group for m in _shm_mapped(pid)}
    for pid in group:  # stubs whose parent died; the group id is ours for as long as they live
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    # shared memory the killed processes mapped, and PyTriton's, named after the server's pid
    for path in shm | set(Path("/dev/shm").glob(f"pytrtion{proc.pid}-*")):
        with contextlib.suppress(OSError):
            path.unlink()
    shutil.rmtree(workspace, ignore_errors=True)


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _shm_mapped(pid: int) -> set[Path]:
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    return {Path(line.split(None, 5)[5].replace(" (deleted)", "")) for line in maps.splitlines()
            if len(line.split(None, 5)) == 6 and line.split(None, 5)[5].startswith("/dev/shm/")}


# --- the server itself, in the Triton venv ---------------------------------------------------------------

def _read_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _add_parameters(params: dict[str, dict[str, str]]) -> None:
    """Carry config.pbtxt parameters into the configs PyTriton generates (it has no public option for them)."""
    from pytriton.models.model import Model

    original = Model._get_triton_model_config

    def with_parameters(self):
        config = original(self)
        config.backend_parameters.update(params.get(self.model_name, {}))
        return config

    Model._get_triton_model_config = with_parameters


def _armed(control: Path | None) -> tuple[int, str] | None:
    """(answers to give before failing, the arming's nonce) while a `failing` block runs, else None."""
    if control is None:
        return None
    try:
        after, nonce = control.read_text().split()
    except (OSError, ValueError):  # not armed
        return None
    return int(after), nonce


def _infer_fn(model_file: Path, input_name: str, output_name: str, control: Path | None):
    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch

    if model_file.suffix != ".onnx":
        raise SystemExit(f"{model_file}: this test server runs ONNX models only (export with --format onnx)")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ.get("CBCTSEG_TRITON_THREADS", "0"))
    # idle threads that spin take the CPU from the client, which shares the machine in tests
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model_file), opts, providers=["CPUExecutionProvider"])
    armed: dict = {"by": None, "served": 0}

    @batch
    def infer(**inputs):
        now = _armed(control)
        if now != armed["by"]:
            armed.update(by=now, served=0)
        armed["served"] += 1
        if now is not None and armed["served"] > now[0]:
            raise RuntimeError(f"injected failure after {now[0]} requests")
        x = np.ascontiguousarray(inputs[input_name], dtype=np.float16)
        return {output_name: session.run([output_name], {input_name: x})[0]}

    return infer


def main(argv: list[str] | None = None) -> None:
    import numpy as np
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig
    from tritonclient.grpc import model_config_pb2

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--workspace", type=Path, default=None)
    p.add_argument("--control", type=Path, default=None, help="a file that makes the models fail (failing())")
    args = p.parse_args(argv)

    dtypes = {model_config_pb2.TYPE_FP16: np.float16, model_config_pb2.TYPE_FP32: np.float32}
    bindings, params = [], {}
    for config_file in sorted(args.repository.glob("*/config.pbtxt")):
        cfg = _read_config(config_file)
        if cfg.platform != "onnxruntime_onnx":
            raise SystemExit(f"{config_file}: platform {cfg.platform!r}; this test server runs onnxruntime_onnx only")
        versions = list(cfg.version_policy.specific.versions) or [1]
        (inp,), (out,) = cfg.input, cfg.output
        params[cfg.name] = {k: v.string_value for k, v in cfg.parameters.items()}
        model_cfg = ModelConfig(max_batch_size=cfg.max_batch_size, batcher=DynamicBatcher(
            max_queue_delay_microseconds=cfg.dynamic_batching.max_queue_delay_microseconds))
        fn = _infer_fn(config_file.parent / str(versions[0]) / (cfg.default_model_filename or "model.onnx"),
                       inp.name, out.name, args.control)
        bindings.append(dict(model_name=cfg.name, model_version=int(versions[0]), infer_func=fn, config=model_cfg,
                             inputs=[Tensor(name=inp.name, dtype=dtypes[inp.data_type], shape=tuple(inp.dims))],
                             outputs=[Tensor(name=out.name, dtype=dtypes[out.data_type], shape=tuple(out.dims))]))
    if not bindings:
        raise SystemExit(f"{args.repository}: no */config.pbtxt")
    _add_parameters(params)
    # PyTriton's python backend stub loads libpython from the library path, not from this interpreter
    import sysconfig
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = ":".join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))
    config = TritonConfig(grpc_address="127.0.0.1", grpc_port=args.grpc_port, http_address="127.0.0.1",
                          http_port=args.http_port, metrics_port=args.metrics_port, allow_metrics=False,
                          exit_timeout_secs=5, log_verbose=0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so `with Triton` stops the server it started
    with Triton(config=config, workspace=args.workspace) as triton:
        for b in bindings:
            triton.bind(**b)
        print(f"serving {[b['model_name'] for b in bindings]} on 127.0.0.1:{args.grpc_port}", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
