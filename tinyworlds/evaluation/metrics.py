"""Metric functions on tensors; definitions are in the README's "Metrics" section."""

from __future__ import annotations

import torch


def psnr(prediction: torch.Tensor, target: torch.Tensor, *, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of uint8 images (peak 255), per item over `dims`.

    Computed on the uint8 scale so figures compare with other work. Identical images give
    +inf; average PSNRs with `finite_mean` so one perfect frame does not swamp the rest.
    """
    error = (prediction.float() - target.float()) ** 2
    mse = error.mean() if dims is None else error.mean(dim=dims)
    return 10 * torch.log10(255.0**2 / mse)


def finite_mean(values: torch.Tensor, cap: float = 100.0) -> float:
    """Mean with +inf (identical images) counted as `cap` dB."""
    return float(torch.nan_to_num(values.float(), posinf=cap).clamp(max=cap).mean())
