"""Video tokenizer: frames -> one discrete token per patch -> frames (Genie's ST-ViViT with FSQ).

patch embed -> encoder -> Linear to L dims -> FSQ -> Linear up -> space-time decoder (causal
in time) -> Linear to patch pixels -> unpatchify.
The encoder sees one frame (spatial attention, `encoder_context: frame`) or one patch (a
patchwise MLP, `encoder_context: patch`). Either way tokens are a function of their own frame
alone (so they can be cached per frame), and the decoded pixels of frame t never depend on
later frames: a rollout can decode each generated frame as it comes. With `patch`, a patch
whose pixels do not change keeps its token, and the same sprite gets the same token anywhere.

Dimension keys: B batch, T time, C channels, H/W pixels, S patch size, P patches per frame,
E embedding, L FSQ dims (len(levels)), V vocabulary (prod(levels)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.models.blocks import (
    PatchwiseMLP,
    SpaceTimeTransformer,
    check,
    check_attention,
    check_frames,
    check_levels,
    check_positive_ints,
    emphasised_mse,
    marked_pixels,
    over_time_windows,
    patchify,
    unpatchify,
)
from tinyworlds.models.fsq import FSQ, id_usage, perplexity


ENCODER_CONTEXTS = ("frame", "patch")


@dataclass
class TokenizerConfig:
    frame_size: int = 64  # H = W
    channels: int = 3
    patch_size: int = 8  # S; frame_size must be a multiple
    embed_dim: int = 128
    num_heads: int = 4
    encoder_blocks: int = 2
    decoder_blocks: int = 2
    levels: tuple[int, ...] = (8, 5, 5, 5)  # FSQ levels per latent dim; vocab = prod = 1000
    max_frames: int = 16  # longest clip the temporal positions cover
    # The loss weight of an object pixel (one that differs from its video's background) over a
    # background pixel, which weighs 1. Sprites cover well under 1% of an Atari frame: with plain
    # MSE (weight 1) the cheapest reconstruction is the empty background.
    foreground_weight: float = 1.0
    foreground_threshold: float = 24 / 127.5  # on the model's [-1, 1] scale: 24 of 255
    # The loss weight of a ghost pixel: off the background in the reconstruction but not in the
    # real frame (a sprite drawn where there is none). With 1 (until 0.3.14) a missed sprite
    # costs foreground_weight times what a ghost costs, so when unsure the cheapest picture
    # draws the sprite: on Space Invaders' thinned late screens the default drew the whole
    # formation. With foreground_weight, a ghost costs what a miss does, as the evaluation's
    # object scores count both (README "Metrics"). Marked from the detached reconstruction.
    # Measured at 5 and 20 (README "Current results"): fewer ghosts, but the frame encoder's
    # still patches change token more often and the rollouts got worse, so params.yaml keeps 1.
    ghost_weight: float = 1.0
    # What a patch's token sees. "frame": the whole frame, by spatial attention (Genie's
    # ST-ViViT): context helps compress, but a patch whose pixels stay put can get a new token
    # when its neighbours change, and the dynamics model learns to predict that flicker.
    # "patch": its own pixels alone, through a patchwise MLP: unchanged pixels keep their token.
    encoder_context: str = "frame"

    def __post_init__(self):
        check_frames(self)
        check_attention(self)
        check_positive_ints(self, "encoder_blocks", "decoder_blocks", "max_frames")
        check_levels(self)
        check(self, "encoder_context", self.encoder_context in ENCODER_CONTEXTS, f"must be one of {ENCODER_CONTEXTS}")
        check(self, "ghost_weight", self.ghost_weight >= 1, "must be >= 1")
        if not (self.foreground_weight >= 1 and self.foreground_threshold >= 0):
            raise TinyWorldsError(f"tokenizer: foreground_weight={self.foreground_weight!r} must be >= 1 and "
                                  f"foreground_threshold={self.foreground_threshold!r} >= 0")

    @property
    def weighs_objects(self) -> bool:
        """Whether the loss weighs pixels against the video's background (object or ghost weights)."""
        return self.foreground_weight != 1 or self.ghost_weight != 1


class VideoTokenizer(nn.Module):
    """Frames [B, T, C, H, W] in [-1, 1] <-> tokens [B, T, P] in [0, V)."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        c = config
        self.grid = c.frame_size // c.patch_size  # Hp = Wp
        patch_dim = c.patch_size * c.patch_size * c.channels
        self.patch_embed = nn.Linear(patch_dim, c.embed_dim)
        # The encoder never looks across frames, so a frame's tokens depend on that frame alone:
        # they can be computed once per frame and cached for any clip (stage tokenize).
        if c.encoder_context == "patch":
            self.encoder = PatchwiseMLP(c.embed_dim, c.encoder_blocks)
        else:
            self.encoder = SpaceTimeTransformer(
                c.embed_dim, c.num_heads, c.encoder_blocks, grid=self.grid, max_frames=c.max_frames, temporal=False
            )
        self.to_latent = nn.Linear(c.embed_dim, len(c.levels))
        self.fsq = FSQ(c.levels)
        self.from_latent = nn.Linear(len(c.levels), c.embed_dim)
        self.decoder = SpaceTimeTransformer(
            c.embed_dim, c.num_heads, c.decoder_blocks, grid=self.grid, max_frames=c.max_frames
        )
        self.to_pixels = nn.Linear(c.embed_dim, patch_dim)

    @property
    def vocab_size(self) -> int:
        return self.fsq.vocab_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def latents(self, frames: Tensor) -> Tensor:
        """Frames [B, T, C, H, W] -> pre-quantization latents [B, T, P, L]."""
        x = self.patch_embed(patchify(frames, self.config.patch_size))  # [B, T, P, E]
        return self.to_latent(self.encoder(x))  # [B, T, P, L]

    def decode_codes(self, codes: Tensor) -> Tensor:
        """FSQ codes [B, T, P, L] -> frames [B, T, C, H, W]."""
        x = self.decoder(self.from_latent(codes))  # [B, T, P, E]
        return unpatchify(self.to_pixels(x), self.config.patch_size, self.grid)  # [B, T, C, H, W]

    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        """Frames [B, T, C, H, W] in [-1, 1] -> tokens LongTensor [B, T, P]. No gradient."""
        return self.fsq.codes_to_ids(self.fsq(self.latents(frames)))

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """Tokens [B, T, P] -> frames [B, T, C, H, W] (unclamped, nominally [-1, 1]). No gradient.

        The decoder attends over time within its window of max_frames, so past it frame t is
        decoded from the window of tokens ending at t (sliding windows, batched over all t at
        once): a clip of any length decodes as its frames would inside the window.
        """
        return over_time_windows(lambda ids: self.decode_codes(self.fsq.ids_to_codes(ids)), tokens, self.config.max_frames)

    def forward(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Frames [B, T, C, H, W] -> (reconstruction [B, T, C, H, W], tokens [B, T, P])."""
        codes = self.fsq(self.latents(frames))  # [B, T, P, L], straight-through gradient
        return self.decode_codes(codes), self.fsq.codes_to_ids(codes.detach())

    def pixel_weights(self, frames: Tensor, background: Tensor | None, reconstruction: Tensor | None = None) -> Tensor:
        """Loss weights [B, T, 1, H, W]: `foreground_weight` where a pixel differs from its
        clip's background frame [B, C, H, W] by more than the threshold in any channel, else,
        where the `reconstruction` does (a ghost), `ghost_weight`, else 1."""
        c = self.config
        if background is None or not c.weighs_objects:
            return torch.ones_like(frames[:, :, :1])
        background = rearrange(background, "b c h w -> b 1 c h w")
        real = marked_pixels(frames - background, c.foreground_threshold)  # [B, T, 1, H, W]
        weights = 1 + (c.foreground_weight - 1) * real.float()
        if c.ghost_weight != 1 and reconstruction is not None:
            ghost = marked_pixels(reconstruction.detach() - background, c.foreground_threshold) & ~real
            weights = weights + (c.ghost_weight - 1) * ghost.float()
        return weights

    def loss(self, frames: Tensor, background: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted reconstruction MSE (`pixel_weights`; plain MSE without a background) and
        detached metrics: mse and psnr (unweighted, dB for pixels in [-1, 1]), fg_mse (on the
        object pixels), codebook_usage (fraction of the V ids in the batch), code_perplexity.

        The weighted errors are averaged over all pixels, not divided by the batch's total
        weight: a mean over a batch's slice on each process then averages to the same loss as
        over the whole batch on one, so distributed training takes the same steps."""
        recon, tokens = self(frames)
        error = (recon.float() - frames.float()) ** 2  # [B, T, C, H, W]
        weights = self.pixel_weights(frames.float(), background, recon.float())  # [B, T, 1, H, W]
        loss = (error * weights).mean()
        mse = error.mean().detach()
        usage = id_usage(tokens, self.vocab_size)  # [V]
        metrics = {
            "mse": mse,
            "psnr": 10 * torch.log10(4.0 / mse.clamp_min(1e-10)),  # peak-to-peak range is 2
            "codebook_usage": (usage > 0).float().mean(),
            "code_perplexity": perplexity(usage),
        }
        if background is not None and self.config.weighs_objects:
            metrics["fg_mse"] = emphasised_mse(error, weights)
        return loss, metrics
