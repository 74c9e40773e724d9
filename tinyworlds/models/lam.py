"""Latent action model: infers a discrete action for each frame transition without labels.

Encoder: patch embed -> space-time transformer over the clip (causal in time) -> mean over the
patches of frame t+1 (which has seen frames 0..t+1) -> Linear to L dims -> FSQ -> action id.
Decoder: predicts frame t+1 from frames 0..t, FiLM-conditioned on the quantized action of
t -> t+1, causal in time. During the loss most decoder input tokens (all frames but the
anchor frame 0) are replaced by a learned mask token, so copying the previous frame is not
enough and the decoder has to read the action. A hinge on the per-dimension batch std of the
bounded latent keeps the encoder from collapsing every transition onto one action.

Dimension keys: B batch, T time, C channels, H/W pixels, S patch size, P patches per frame,
E embedding, L FSQ dims (len(levels)), A actions (prod(levels)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor, nn

from tinyworlds.errors import TinyWorldsError
from tinyworlds.models.blocks import (
    SpaceTimeTransformer,
    check,
    check_attention,
    check_fraction,
    check_frames,
    check_levels,
    check_number,
    check_positive_ints,
    patchify,
    unpatchify,
)
from tinyworlds.models.fsq import FSQ, id_usage, perplexity


@dataclass
class LatentActionConfig:
    frame_size: int = 64  # H = W
    channels: int = 3
    patch_size: int = 8  # S; frame_size must be a multiple
    embed_dim: int = 128
    num_heads: int = 4
    encoder_blocks: int = 2
    decoder_blocks: int = 2
    levels: tuple[int, ...] = (2, 2, 2)  # FSQ levels; num_actions = prod(levels), 4..16
    max_frames: int = 16
    mask_ratio: float = 0.75  # fraction of decoder input tokens (frames >= 1) hidden in the loss
    variance_weight: float = 1.0  # weight of the anti-collapse hinge
    variance_target: float = 0.5  # per-dim batch std of the bounded latent below which it bites

    def __post_init__(self):
        check_frames(self)
        check_attention(self)
        check_positive_ints(self, "encoder_blocks", "decoder_blocks", "max_frames")
        check(self, "max_frames", self.max_frames >= 2, "a transition needs at least 2 frames")
        check_levels(self)
        actions = math.prod(self.levels)
        check(self, "levels", 4 <= actions <= 16, f"gives {actions} actions; must give 4 to 16")
        check_fraction(self, "mask_ratio", 0.0, 1.0)
        check(self, "mask_ratio", self.mask_ratio < 1.0, "must be < 1 (some context must stay visible)")
        check_number(self, "variance_weight")
        check(self, "variance_weight", self.variance_weight >= 0, "must be >= 0")
        check_fraction(self, "variance_target", 0.0, 1.0)


class LatentActionModel(nn.Module):
    """Frames [B, T, C, H, W] in [-1, 1] -> action ids [B, T-1] in [0, A)."""

    def __init__(self, config: LatentActionConfig):
        super().__init__()
        self.config = config
        c = config
        self.grid = c.frame_size // c.patch_size
        patch_dim = c.patch_size * c.patch_size * c.channels
        self.encoder_embed = nn.Linear(patch_dim, c.embed_dim)
        self.encoder = SpaceTimeTransformer(
            c.embed_dim, c.num_heads, c.encoder_blocks, grid=self.grid, max_frames=c.max_frames
        )
        self.to_latent = nn.Linear(c.embed_dim, len(c.levels))
        self.fsq = FSQ(c.levels)
        self.decoder_embed = nn.Linear(patch_dim, c.embed_dim)
        self.mask_token = nn.Parameter(torch.randn(c.embed_dim) * 0.02)
        self.decoder = SpaceTimeTransformer(
            c.embed_dim, c.num_heads, c.decoder_blocks, grid=self.grid, max_frames=c.max_frames,
            cond_dim=len(c.levels),
        )
        self.to_pixels = nn.Linear(c.embed_dim, patch_dim)

    @property
    def num_actions(self) -> int:
        return self.fsq.vocab_size

    def latents(self, frames: Tensor) -> Tensor:
        """Frames [B, T, C, H, W] -> pre-quantization latent per transition [B, T-1, L]."""
        x = self.encoder(self.encoder_embed(patchify(frames, self.config.patch_size)))  # [B, T, P, E]
        pooled = reduce(x[:, 1:], "b t p e -> b t e", "mean")  # [B, T-1, E]
        return self.to_latent(pooled)  # [B, T-1, L]

    def predict(self, frames: Tensor, codes: Tensor, *, mask_ratio: float = 0.0) -> Tensor:
        """Frames 0..T-1 [B, T, C, H, W] and the action codes of each next transition [B, T, L]
        -> predicted frames 1..T [B, T, C, H, W]. `mask_ratio` hides that fraction of the
        tokens of frames >= 1 behind the mask token (frame 0 stays whole as an anchor)."""
        x = self.decoder_embed(patchify(frames, self.config.patch_size))  # [B, T, P, E]
        if mask_ratio > 0:
            b, t, p, _ = x.shape
            hide = torch.rand(b, t, p, 1, device=x.device) < mask_ratio  # [B, T, P, 1]
            hide[:, 0] = False
            x = torch.where(hide, self.mask_token.to(x.dtype), x)  # [B, T, P, E]
        x = self.decoder(x, cond=codes)  # [B, T, P, E]
        return unpatchify(self.to_pixels(x), self.config.patch_size, self.grid)  # [B, T, C, H, W]

    @torch.no_grad()
    def infer(self, frames: Tensor) -> Tensor:
        """Frames [B, T, C, H, W] -> action ids LongTensor [B, T-1]. No gradient."""
        return self.fsq.codes_to_ids(self.fsq(self.latents(frames)))

    def loss(self, frames: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Next-frame MSE of the masked decoder + variance_weight * anti-collapse hinge.

        Metrics (detached): recon_mse, variance_penalty, latent_std (mean per-dim batch std of
        the bounded latent), action_perplexity, and action_usage [A]: the fraction of the
        batch's transitions given each action.
        """
        if frames.shape[1] < 2:
            raise TinyWorldsError(f"latent action loss needs clips of >= 2 frames, got {frames.shape[1]}")
        z = self.latents(frames)  # [B, T-1, L]
        bounded = self.fsq.bound(z)  # [B, T-1, L] in (-1, 1)
        codes = self.fsq.quantize(bounded)  # [B, T-1, L]
        pred = self.predict(frames[:, :-1], codes, mask_ratio=self.config.mask_ratio)  # [B, T-1, C, H, W]
        recon = F.mse_loss(pred.float(), frames[:, 1:].float())
        # The hinge acts on the bounded latent, the quantity FSQ rounds: a raw latent can have a
        # large spread and still saturate tanh on one side, landing every sample on one code.
        flat = rearrange(bounded, "b t l -> (b t) l")  # [B*(T-1), L]
        std = torch.sqrt(flat.var(dim=0, correction=0) + 1e-6)  # [L]
        variance_penalty = F.relu(self.config.variance_target - std).mean()
        loss = recon + self.config.variance_weight * variance_penalty
        usage = id_usage(self.fsq.codes_to_ids(codes.detach()), self.num_actions)  # [A]
        metrics = {
            "recon_mse": recon.detach(),
            "variance_penalty": variance_penalty.detach(),
            "latent_std": std.detach().mean(),
            "action_perplexity": perplexity(usage),
            "action_usage": usage,
        }
        return loss, metrics
