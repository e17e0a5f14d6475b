"""Device facts: clock syncs, peak memory per method, the hardware a run names, and a GPU that
torch cannot use.

Peak memory measures one method alone (DESIGN.md §5's `peak_memory_bytes`):
- on CUDA, the caching allocator's peak (`max_memory_allocated`), reset before each method and
  summed over the GPUs of a split model;
- on CPU, the process's resident-memory high-water mark (VmHWM in /proc/self/status), reset
  before each method by writing 5 to /proc/self/clear_refs, after garbage collection and
  `malloc_trim` have handed freed memory back to the system. So a method's figure covers the
  model, the method's own modules and whatever it allocates while it decodes, and it can be
  lower than an earlier method's. Where the reset is unavailable (not Linux, or a kernel older
  than 4.0), the figure is the process's peak so far, as `resource.getrusage` reports it.
"""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import re
import resource
import shutil
import subprocess
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    """Wait for the device (before a clock read)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_devices(runtime) -> list[torch.device]:
    """The devices a model occupies: its own, and those of its layers when split (place_layers)."""
    return list(dict.fromkeys([runtime.device] + list(runtime.layer_devices or [])))


# ---- peak memory -----------------------------------------------------------------------------
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _release_free_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the system, so that the
    resident size is what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_memory(runtime) -> bool:
    """Start a new peak-memory window for `runtime`'s devices. Returns whether the peak could be
    reset (always on CUDA; on CPU where /proc/self/clear_refs takes it)."""
    devices = model_devices(runtime)
    _release_free_memory()
    if devices[0].type == "cuda":
        torch.cuda.empty_cache()
        for device in devices:
            torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def peak_memory_bytes(runtime) -> int:
    """Peak memory since the last reset_peak_memory: the allocator's peak summed over the GPUs of a
    split model, or on CPU the resident high-water mark (the process's peak so far where it cannot
    be reset)."""
    devices = model_devices(runtime)
    if devices[0].type == "cuda":
        return sum(int(torch.cuda.max_memory_allocated(device)) for device in devices)
    high_water = _status_kib("VmHWM")
    if high_water is not None:
        return high_water * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB


def current_memory_bytes(runtime) -> int:
    """Memory in use now: allocated on the GPUs, or resident on CPU."""
    devices = model_devices(runtime)
    if devices[0].type == "cuda":
        return sum(int(torch.cuda.memory_allocated(device)) for device in devices)
    resident = _status_kib("VmRSS")
    return resident * 1024 if resident is not None else 0


# ---- hardware ----------------------------------------------------------------------------------
def hardware() -> dict:
    """What a run's speedups depend on: CPU model and cores, torch threads, GPUs."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    info["name"] = info.get("gpu", cpu)
    return info


def visible_gpus() -> list[str]:
    """The GPUs `nvidia-smi -L` lists (empty without the tool or without GPUs)."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return []
    try:
        listing = subprocess.run([tool, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listing.stdout.splitlines() if line.strip().startswith("GPU ")]


def unusable_gpu_problem() -> str | None:
    """A message when the machine has an NVIDIA GPU that this torch cannot use (a CPU-only wheel,
    or a driver older than the wheel's CUDA), else None. Without this check such a machine would
    quietly run the CPU profile."""
    gpus = visible_gpus()
    if not gpus or torch.cuda.is_available():
        return None
    built = torch.version.cuda
    reason = (f"this torch {torch.__version__} is built for CUDA {built}, and the driver cannot run it (a driver "
              f"older than the build)" if built else f"this torch {torch.__version__} is a CPU-only build")
    return (f"nvidia-smi sees {len(gpus)} GPU(s) ({gpus[0]}), but torch cannot use them: {reason}. "
            f"Fix: install a torch build that matches the driver (`nvidia-smi` prints the highest CUDA version "
            f"it supports; e.g. pip install torch --index-url https://download.pytorch.org/whl/cu121), or run on "
            f"the CPU on purpose with DEVICE=cpu (make) or --device cpu.")
