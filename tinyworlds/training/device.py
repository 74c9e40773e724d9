"""Device choice and numeric precision: cuda, then mps, then cpu, unless told otherwise."""

from __future__ import annotations

import contextlib

import torch

from tinyworlds.errors import TinyWorldsError


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
