"""Metric functions on tensors; definitions are in the README's "Metrics" section.

Image metrics take uint8 frames (or floats on the 0..255 scale) [..., C, H, W] and return one
value per image [...]. Label metrics take 1-D integer tensors of equal length [N] (here N
items). Scores on the moving objects (foreground), bootstraps and the move detector are in
`tinyworlds.metrics.objects`.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange, reduce, repeat

# ---------------------------------------------------------------------------------------------
# images


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


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian [size] centred on the middle tap."""
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    weights = torch.exp(-(x**2) / (2 * sigma**2))
    return weights / weights.sum()


def band_matrix(window: torch.Tensor, length: int) -> torch.Tensor:
    """[length - k + 1, length] matrix whose row i is `window` [k] placed at columns i..i+k-1."""
    k = window.shape[0]
    out = torch.zeros(length - k + 1, length, dtype=window.dtype, device=window.device)
    for offset in range(k):
        out.diagonal(offset).copy_(window[offset].expand(length - k + 1))
    return out


def ssim(prediction: torch.Tensor, target: torch.Tensor, *, window_size: int = 11, sigma: float = 1.5,
         peak: float = 255.0) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of images [..., C, H, W] -> [...] in [-1, 1].

    The standard setting: an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03,
    dynamic range L = 255 (uint8 scale), statistics over 'valid' window positions only (no
    padding), averaged over positions and channels. Images smaller than the window use the
    largest odd window that fits.
    """
    x, y = prediction.float(), target.float()
    if x.shape != y.shape or x.dim() < 3:
        raise ValueError(
            f"ssim: expected two images [..., C, H, W] of one shape, got {list(x.shape)} and {list(y.shape)}"
        )
    *lead, c, h, w = x.shape
    size = min(window_size, h, w)
    size -= 1 - size % 2  # odd, so the window has a centre
    g = gaussian_window(size, sigma).to(x.device)  # [size]
    x = rearrange(x, "... c h w -> (...) c h w")  # [B*..., C, H, W]
    y = rearrange(y, "... c h w -> (...) c h w")
    # Separable Gaussian over 'valid' positions as two band-matrix products: row i of
    # rows_h holds the window at columns i..i+size-1 (plain matmuls, on any device).
    rows_h, rows_w = (band_matrix(g, n) for n in (h, w))  # [H', H], [W', W]

    def blur(image: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ih,nchw,jw->ncij", rows_h, image, rows_w)  # [B*..., C, H', W']

    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mu_x, mu_y = blur(x), blur(y)
    # (Co)variances from images centred on their own mean: E[x^2] - E[x]^2 of raw 0..255 values
    # loses about 1e-3 to float32 cancellation, which shows against C2 on flat regions.
    x = x - x.mean(dim=(1, 2, 3), keepdim=True)
    y = y - y.mean(dim=(1, 2, 3), keepdim=True)
    centred_x, centred_y = blur(x), blur(y)
    var_x = blur(x * x) - centred_x**2
    var_y = blur(y * y) - centred_y**2
    cov = blur(x * y) - centred_x * centred_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.mean(dim=(1, 2, 3)).reshape(lead)  # [...]


def copy_last_frame(context: torch.Tensor, horizon: int) -> torch.Tensor:
    """The copy-the-last-frame baseline: context [B, T, ...] -> prediction [B, horizon, ...].

    Every future frame is predicted to equal the last context frame: what a world model that
    ignores dynamics and actions would score.
    """
    return repeat(context[:, -1], "b ... -> b n ...", n=horizon)


# A patch whose pixels move by at most this much (of 255) between two frames is still: video
# compression alone moves 4-8% of our recordings' 8x8 patches by 1-8 between frames where the
# game drew nothing new; by more than 8, almost none.
STILL_TOLERANCE = 8


def moved_patches(frames: torch.Tensor, previous: torch.Tensor, patch_size: int, tolerance: float) -> torch.Tensor:
    """uint8 frames [..., C, H, W] and the frames before them (same shape) -> bool [..., P]: the
    patches (of patch_size, row-major) where some pixel moves by more than `tolerance`."""
    step = (frames.int() - previous.int()).abs()  # [..., C, H, W]
    largest = reduce(step, "... c (hp s1) (wp s2) -> ... (hp wp)", "max", s1=patch_size, s2=patch_size)  # [..., P]
    return largest > tolerance


def still_token_changes(frames: torch.Tensor, tokens: torch.Tensor, patch_size: int,
                        tolerance: int = STILL_TOLERANCE) -> float:
    """Share of still patches whose token changes from one frame to the next: uint8 frames
    [B, T, C, H, W] and their tokens [B, T, P] (P patches of patch_size, row-major).

    A tokenizer whose tokens flicker where the picture does not teaches the dynamics model to
    predict changes that are not there. NaN when no patch is still.
    """
    still = ~moved_patches(frames[:, 1:], frames[:, :-1], patch_size, tolerance)  # [B, T-1, P]
    changed = tokens[:, 1:] != tokens[:, :-1]  # [B, T-1, P]
    return float((changed & still).sum() / still.sum()) if still.any() else math.nan


def frame_steps(frames: torch.Tensor, last_real: torch.Tensor) -> torch.Tensor:
    """Frames [B, k, C, H, W] after a last real frame [B, C, H, W] -> the frame before each of
    them [B, k, C, H, W]: the last real frame, then the frames themselves."""
    return torch.cat([rearrange(last_real, "b c h w -> b 1 c h w"), frames[:, :-1]], dim=1)


def change_agreement(predicted: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """Where a prediction moves against where the truth moves: bool masks of moved patches, the
    same shape -> precision (share of the predicted moves where the truth moves; NaN if it
    predicts none) and recall (share of the true moves it predicts; NaN if none)."""
    hits = (predicted & true).sum().item()
    made, real = predicted.sum().item(), true.sum().item()
    return {"change_precision": hits / made if made else math.nan, "change_recall": hits / real if real else math.nan}


# ---------------------------------------------------------------------------------------------
# discrete labels (latent actions, tokens, true actions)


def entropy(fractions: torch.Tensor) -> float:
    """Shannon entropy in nats of a distribution [K] (zeros contribute nothing)."""
    p = fractions.double()
    p = p[p > 0] / p.sum()
    return max(0.0, float(-(p * p.log()).sum()))  # never -0.0


def label_fractions(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """How often each of 0..num_labels-1 occurs in labels [N]: fractions [num_labels] (zeros if N = 0)."""
    counts = torch.bincount(labels.long().flatten().cpu(), minlength=num_labels).double()
    return counts / counts.sum().clamp(min=1)


def contingency(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Joint counts [max(a)+1, max(b)+1] of two labelings [N] of the same items."""
    a, b = a.long().flatten().cpu(), b.long().flatten().cpu()
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"contingency: need two non-empty labelings of equal length, got {a.numel()} and {b.numel()}")
    rows, cols = int(a.max()) + 1, int(b.max()) + 1
    return torch.bincount(a * cols + b, minlength=rows * cols).reshape(rows, cols).double()


def normalized_mutual_information(a: torch.Tensor, b: torch.Tensor) -> float:
    """NMI = I(a; b) / ((H(a) + H(b)) / 2), in [0, 1]: 1 when each labeling determines the other.

    The arithmetic normalisation (scikit-learn's default). Two constant labelings count as
    identical (1.0); one constant labeling against a varying one gives 0.0.
    """
    joint = contingency(a, b)
    joint = joint / joint.sum()  # [A, B]
    pa, pb = joint.sum(1), joint.sum(0)  # [A], [B]
    ha, hb = entropy(pa), entropy(pb)
    if ha == 0.0 and hb == 0.0:
        return 1.0
    if ha == 0.0 or hb == 0.0:
        return 0.0
    nonzero = joint > 0
    outer = pa[:, None] * pb[None, :]  # [A, B]
    mutual = float((joint[nonzero] * (joint[nonzero] / outer[nonzero]).log()).sum())
    return min(1.0, max(0.0, mutual / ((ha + hb) / 2)))


def majority_mapping(latent: torch.Tensor, true: torch.Tensor, num_latent: int) -> torch.Tensor:
    """The best many-to-one map latent id -> true action on these pairs: mapping [num_latent].

    Each latent id maps to the true action it co-occurs with most (ties: the lower action
    id); an id never seen maps to the most common true action overall.
    """
    latent, true = latent.long().flatten().cpu(), true.long().flatten().cpu()
    joint = torch.zeros(num_latent, int(true.max()) + 1, dtype=torch.float64)
    joint.index_put_((latent, true), torch.ones_like(latent, dtype=torch.float64), accumulate=True)
    mapping = joint.argmax(1)  # [num_latent]
    unseen = joint.sum(1) == 0
    mapping[unseen] = int(joint.sum(0).argmax())
    return mapping


def mapping_accuracy(mapping: torch.Tensor, latent: torch.Tensor, true: torch.Tensor) -> float:
    """Fraction of pairs whose true action is the mapped latent id's: mapping[latent] == true."""
    latent, true = latent.long().flatten().cpu(), true.long().flatten().cpu()
    if latent.numel() == 0:
        return math.nan
    return float((mapping[latent] == true).double().mean())


def chance_accuracy(true: torch.Tensor) -> float:
    """Frequency of the most common label: the accuracy of always guessing it."""
    true = true.long().flatten().cpu()
    if true.numel() == 0:
        return math.nan
    return float(torch.bincount(true).max() / true.numel())
