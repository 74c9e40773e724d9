"""uint8 frames <-> model inputs in [-1, 1].

Frames travel to the device as uint8 (4x less to copy than float32) and are converted there:
both functions run on whatever device their input is on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tinyworlds.core.errors import TinyWorldsError


def to_model(frames: Tensor) -> Tensor:
    """uint8 frames [..., C, H, W] in 0..255 -> float32 in [-1, 1], on the same device."""
    if frames.dtype != torch.uint8:
        raise TinyWorldsError(f"to_model: expected uint8 frames, got {frames.dtype}")
    return frames.float() / 127.5 - 1.0


def to_uint8(frames: Tensor) -> Tensor:
    """Float frames [..., C, H, W] nominally in [-1, 1] -> uint8 in 0..255 (clamped, rounded)."""
    return ((frames.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
