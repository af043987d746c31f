"""Device choice and what to say about it: GPU, driver, torch and CUDA versions, memory."""
from __future__ import annotations

import hashlib
import logging
import platform
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def select_device(name: str = "auto") -> torch.device:
    """'auto' is CUDA when available, else the CPU; an explicit 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available (torch {torch.__version__})")
    return device


# bytes this process may use on a CUDA device, by device index (limit_memory)
_LIMITS: dict[int, int] = {}


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _nvml() -> dict:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            util = pynvml.nvmlDeviceGetUtilizationRates(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            return {"driver": pynvml.nvmlSystemGetDriverVersion(), "gpu_utilization_percent": util.gpu,
                    "gpu_memory_used_gb": round(mem.used / 1e9, 2), "gpu_memory_total_gb": round(mem.total / 1e9, 2)}
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # no GPU, no driver library: nothing to report
        return {"nvml": f"unavailable ({type(e).__name__})"}


def describe(device: torch.device) -> dict:
    """Versions and hardware, for the start-up log and the per-case report."""
    info = {"device": str(device), "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu": props.name, "gpu_capability": f"{props.major}.{props.minor}",
                     "gpu_memory_gb": round(props.total_memory / 1e9, 2), "cudnn": torch.backends.cudnn.version()})
        if _index(device) in _LIMITS:
            info["gpu_memory_limit_gb"] = round(_LIMITS[_index(device)] / 1e9, 2)
        info.update(_nvml())
    return info


def limit_memory(device: torch.device, gb: float | None) -> None:
    """Let this process use at most `gb` GB (1e9 bytes) of the CUDA device, as on a GPU of that size: torch's
    allocator refuses more (the engine's out-of-memory fallbacks take over) and `free_memory` reports what is
    left of it, so the engine places its sums as it would there. For sharing a GPU between runs, and for
    measuring on a large GPU what a small one would do. None: no limit (a limit set before is lifted). On the
    CPU a limit is ignored, with a warning.

    Raises ValueError when the GPU has less memory than `gb`."""
    if device.type != "cuda":
        if gb is not None:
            log.warning("--gpu-memory-gb %g ignored: the run is on the CPU", gb)
        return
    index = _index(device)
    if gb is None:
        if _LIMITS.pop(index, None) is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
        return
    total = torch.cuda.get_device_properties(index).total_memory
    limit = int(gb * 1e9)
    if limit > total:
        raise ValueError(f"--gpu-memory-gb {gb:g} is more than the GPU's {total / 1e9:.1f} GB")
    torch.cuda.set_per_process_memory_fraction(limit / total, index)
    _LIMITS[index] = limit


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device, within this process's limit (`limit_memory`) when it has one; None on the
    CPU."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    index = _index(device)
    if index in _LIMITS:
        # the allocator's reserved blocks count as used, as they do in the device's own free memory
        free = min(free, _LIMITS[index] - torch.cuda.memory_reserved(index))
    return max(0, int(free))


def peak_memory_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 3) if device.type == "cuda" else None


def peak_reserved_gb(device: torch.device) -> float | None:
    """The most GPU memory torch's allocator held at once (what the GPU must have, beside CUDA's own context)."""
    return round(torch.cuda.max_memory_reserved(device) / 1e9, 3) if device.type == "cuda" else None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def device_tag(device: torch.device, cpu_isa: bool = True) -> str:
    """What compiled code is specific to: the GPU model and compute capability, or the CPU's vector instructions."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{slug(props.name)}-sm{props.major}{props.minor}"
    if device.type == "cpu" and cpu_isa:
        # ATen's dispatch level: instant (inductor's own probe compiles test programs, 12 s on a fresh cache)
        return slug(f"cpu-{torch.backends.cpu.get_cpu_capability()}")
    return device.type


def cpu_lacks(isa: str) -> list[str]:
    """Of an instruction-set list as AOTInductor records it ("AVX512 AVX512_VNNI"), what this CPU lacks."""
    try:
        flags = set(next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                         if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return []  # no way to tell: trust the name, which carries the dispatch level
    wanted = {"AVX512": "avx512f"}
    return [name for name in isa.split() if wanted.get(name, name.lower()) not in flags]


def plans_tag(weights_dir: Path) -> str:
    """A short hash of the plans: compiled graphs depend on the architecture and patch size they describe."""
    plans = Path(weights_dir) / "plans.json"
    return hashlib.sha256(plans.read_bytes()).hexdigest()[:8] if plans.is_file() else "noplans"
