"""Device choice and numeric precision: cuda, then mps, then cpu, unless told otherwise."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import psutil
import torch

from tinyworlds.core.errors import TinyWorldsError


def pick_device(setting: str = "auto") -> torch.device:
    """`auto` -> the best available device; `cpu`, `cuda`, `cuda:1`, `mps` -> that one, if present."""
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise TinyWorldsError(f"device={setting!r}: not a device name (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TinyWorldsError(f"device={setting!r}: CUDA is not available on this machine (use auto or cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TinyWorldsError(f"device={setting!r}: MPS is not available on this machine (use auto or cpu)")
    return device


def rank_device(setting: str = "auto") -> torch.device:
    """The device of this process: `pick_device(setting)`, and cuda:LOCAL_RANK under torchrun."""
    device = pick_device(setting)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "mps":
        raise TinyWorldsError("train.nproc > 1: multi-process training needs CUDA or the CPU, not mps (set train.device: cpu)")
    return device


def device_for(params: dict[str, Any]) -> torch.device:
    """`train.device`; under torchrun with CUDA, this rank's GPU (cuda:LOCAL_RANK)."""
    return rank_device(str(params.get("train", {}).get("device", "auto")))


def resolve_precision(setting: str, device: torch.device) -> str:
    """`auto` -> bf16 on CUDA (tensor cores), fp32 elsewhere; `bf16` or `fp32` as given."""
    if setting not in ("auto", "bf16", "fp32"):
        raise TinyWorldsError(f"precision={setting!r}: must be auto, bf16 or fp32")
    if setting == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return setting


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure_backends(device: torch.device) -> None:
    """TF32 matmuls and cuDNN autotuning on CUDA: free speed at training precision."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parse_threads(setting: str | int) -> int | None:
    """`auto` -> None; a whole number >= 1 (or its text) -> that number; else a one-line error."""
    if setting == "auto":
        return None
    try:
        threads = int(setting)
    except (TypeError, ValueError):
        threads = 0
    if threads < 1 or str(threads) != str(setting).strip():
        raise TinyWorldsError(f"threads={setting!r}: must be auto or a whole number >= 1")
    return threads


def idle_cores(sample_seconds: float = 0.25) -> float:
    """Cores left idle by other processes, from the whole machine's CPU use over a short sample.

    Call it before this process starts computing: the sample counts every process."""
    busy = psutil.cpu_percent(interval=sample_seconds) / 100 * (os.cpu_count() or 1)
    return cpu_cores() - busy


def set_inference_threads(setting: str | int, device: torch.device, *, sample_seconds: float = 0.25) -> str | None:
    """Set torch's CPU threads for generation and return a line saying what was chosen
    (None on a GPU, where the threads only feed the device).

    `auto` takes the cores other processes leave idle, at least one. Batch-1 generation is
    many small ops, and OpenMP threads that share a core with another busy process wait on
    each other at every op, so beside a busy process fewer threads generate faster
    (bench/README.md, "Threads", has the figures). A number is used as given.
    """
    threads = parse_threads(setting)
    if device.type != "cpu":
        return None
    if threads is None:
        idle = idle_cores(sample_seconds)
        threads = max(1, min(cpu_cores(), round(idle)))
        reason = f"auto: {max(idle, 0.0):.1f} of {cpu_cores()} cores idle"
    else:
        reason = "as given"
    torch.set_num_threads(threads)
    return f"cpu: {threads} thread{'s' if threads > 1 else ''} ({reason}; --threads N to choose)"
