"""Device selection, synchronization, timers and memory queries for npu / cuda / cpu. The only
place (with the npu attention backend) that imports torch_npu; torch_npu mirrors torch.cuda's API
(`torch.npu.mem_get_info`, `memory_reserved`, `max_memory_allocated`, `synchronize`).

Device strings: "cpu", "cuda[:i]", "npu[:i]". `None` or "auto" picks npu when torch_npu imports and
a device is visible, else cuda, else cpu.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

_DEVICE_RE = re.compile(r"^(cpu|cuda|npu)(:\d+)?$")


class DeviceError(ValueError):
    pass


def _npu_available() -> bool:
    try:
        importlib.import_module("torch_npu")
    except Exception:
        return False
    import torch

    return hasattr(torch, "npu") and torch.npu.is_available()


def resolve_device(device: str | None = None) -> str:
    """Validate a device string (importing torch_npu for "npu") or pick the best available one."""
    import torch

    if device in (None, "", "auto"):
        if _npu_available():
            return "npu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not _DEVICE_RE.match(device):
        raise DeviceError(f"unknown device {device!r}; use cpu, cuda[:i] or npu[:i]")
    kind = device.split(":")[0]
    if kind == "npu" and not _npu_available():
        raise DeviceError("device 'npu' requested but torch_npu is not installed or no NPU is visible")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' requested but no CUDA device is visible")
    return device


def synchronize(device: str) -> None:
    import torch

    kind = device.split(":")[0]
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "npu":
        torch.npu.synchronize()


def _accelerator(device: str):
    """torch.cuda or torch.npu (torch_npu mirrors torch.cuda's memory API), None for cpu."""
    import torch

    kind = device.split(":")[0]
    return {"cuda": torch.cuda, "npu": getattr(torch, "npu", None)}.get(kind)


def now(device: str) -> float:
    """A timestamp after the device's queued work has finished, so step and token times are true
    on asynchronous devices."""
    import time

    synchronize(device)
    return time.perf_counter()


@dataclass(frozen=True)
class MemoryInfo:
    free: int  # bytes the device can still hand out
    total: int
    torch_reserved: int  # held by this process's caching allocator (part of total - free)


def memory_info(device: str) -> MemoryInfo | None:
    """The accelerator's memory (None on cpu)."""
    import torch

    acc = _accelerator(device)
    if acc is None:
        return None
    free, total = acc.mem_get_info(torch.device(device))
    return MemoryInfo(free, total, acc.memory_reserved(torch.device(device)))


def reset_peak_memory(device: str) -> None:
    import torch

    acc = _accelerator(device)
    if acc is not None:
        synchronize(device)
        acc.empty_cache()
        acc.reset_peak_memory_stats(torch.device(device))


def peak_memory(device: str) -> int | None:
    """Most bytes this process's tensors held on the device since reset_peak_memory (None on cpu)."""
    import torch

    acc = _accelerator(device)
    if acc is None:
        return None
    synchronize(device)
    return acc.max_memory_allocated(torch.device(device))


def empty_cache(device: str) -> None:
    acc = _accelerator(device)
    if acc is not None:
        acc.empty_cache()


def available_memory(device: str) -> int:
    """Bytes free for new allocations: the device's free memory, or the host's MemAvailable on CPU."""
    import torch

    kind = device.split(":")[0]
    if kind == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    if kind == "npu":
        return torch.npu.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
