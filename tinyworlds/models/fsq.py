"""Finite scalar quantization (FSQ, arXiv 2309.15505).

Each of the L latent dimensions is squashed into (-1, 1) and snapped to one of `levels[d]`
evenly spaced values, so the codebook is implicit: vocab = prod(levels) and nothing can
collapse or go dead the way a learned VQ codebook does. Ids are the mixed-radix number
whose digits are the per-dimension level indices.

Dimension keys: L latent dims (len(levels)), V vocabulary (prod(levels)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from tinyworlds.core.errors import TinyWorldsError


def valid_levels(levels: Sequence[int]) -> bool:
    """True when there is at least one dimension and every dimension has >= 2 levels."""
    return len(levels) >= 1 and all(isinstance(n, int) and n >= 2 for n in levels)


class FSQ(nn.Module):
    """Quantize [..., L] latents to codes in [-1, 1], with a straight-through gradient."""

    def __init__(self, levels: Sequence[int]):
        super().__init__()
        levels = tuple(int(n) for n in levels)
        if not valid_levels(levels):
            raise TinyWorldsError(f"FSQ levels={list(levels)}: need at least one dimension and every level >= 2")
        self.levels = levels
        self.vocab_size = math.prod(levels)
        # Place value of each digit of the mixed-radix id: [1, L0, L0*L1, ...].
        basis = [math.prod(levels[:d]) for d in range(len(levels))]
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.long), persistent=False)  # [L]
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.long), persistent=False)  # [L]

    @property
    def dim(self) -> int:
        return len(self.levels)

    def bound(self, z: Tensor) -> Tensor:
        """Squash raw latents [..., L] into (-1, 1); this is what gets rounded."""
        # float32 even under autocast: bf16 cannot place values precisely between levels.
        return torch.tanh(z.float())

    def quantize(self, bounded: Tensor) -> Tensor:
        """Snap bounded latents [..., L] in (-1, 1) to the level grid, gradient straight through."""
        steps = (self._levels - 1).to(bounded.dtype)  # [L]
        # Level index in [0, L-1]; the same formula is symmetric for odd and even level counts
        # (2 levels split at 0), unlike the paper's half-integer shift for even counts.
        index = (bounded + 1) / 2 * steps  # [..., L]
        index = index + (index.round() - index).detach()
        return index / steps * 2 - 1  # [..., L] codes in [-1, 1]

    def forward(self, z: Tensor) -> Tensor:
        """Raw latents [..., L] -> codes [..., L] in [-1, 1]."""
        return self.quantize(self.bound(z))

    def codes_to_ids(self, codes: Tensor) -> Tensor:
        """Codes [..., L] -> integer ids [...] in [0, V)."""
        # nan_to_num + clamp: a diverged model (NaN latents) must still yield valid ids, so the
        # training loop's non-finite-loss guard reports it instead of an indexing crash.
        index = ((codes.float().nan_to_num(0.0) + 1) / 2 * (self._levels - 1)).round().long()  # [..., L]
        index = torch.minimum(index.clamp(min=0), self._levels - 1)  # [..., L]
        return (index * self._basis).sum(-1)  # [...]

    def ids_to_codes(self, ids: Tensor) -> Tensor:
        """Integer ids [...] in [0, V) -> codes [..., L] in [-1, 1]."""
        ids = rearrange(ids.long(), "... -> ... 1")  # [..., 1]
        index = torch.div(ids, self._basis, rounding_mode="floor") % self._levels  # [..., L]
        return index.float() / (self._levels - 1) * 2 - 1  # [..., L]


def id_usage(ids: Tensor, vocab_size: int) -> Tensor:
    """Fraction of the entries of `ids` equal to each id: [V], summing to 1. No host sync."""
    flat = rearrange(ids, "... -> (...)")  # [B*...]: every id
    counts = torch.zeros(vocab_size, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float))
    return counts / flat.numel()  # [V]


def perplexity(fractions: Tensor) -> Tensor:
    """exp(entropy) of a usage distribution [V]: how many ids are effectively in use."""
    return torch.exp(-(fractions * torch.log(fractions.clamp_min(1e-12))).sum())
