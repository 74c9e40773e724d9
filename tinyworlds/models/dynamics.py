"""Dynamics model: MaskGIT over video tokens, conditioned on actions (Genie's dynamics model).

Token embedding (V ids + 1 mask id) -> space-time transformer (causal in time) with FiLM from
an action embedding -> Linear to V logits. The action taken between frames t-1 and t
conditions frame t; frame 0 and context frames whose action is unknown get the learned null
action (index A).

With `copy_logit`, a second head gives each position one more logit, added to the logit of the
token the same patch held one frame earlier: "keep this patch as it was" is a single learned
number per position, not a 1-in-V choice the output layer has to rediscover for every token.
Most patches of a game do not change between frames, so this makes copying the default and
leaves the V-way head to what moves (the head is zero at the start, so training starts from
the plain model).

Training masks, per sample, a ratio r ~ U[mask_ratio_min, mask_ratio_max] of the tokens of
every frame 1..T-1: exactly ceil(r * P) positions per frame, chosen uniformly (MaskGIT-style,
so each frame has at least one target). Frame 0 is never masked: it anchors the clip, as the
given context frame does in generation. Cross-entropy is taken on masked positions only.

Generation makes one frame at a time: all P tokens start masked; at each of `steps` steps
every masked position is sampled, the most confident samples are kept per the schedule and
the rest are masked again. The frame is then appended and the next one begins. Since the
transformer is causal in time and attends within a frame in space, the known frames do not
depend on the frame being made: they run through the blocks once per new frame, each block's
temporal keys and values of them are cached, and each MaskGIT step runs only the new frame
(one frame's work instead of the whole window's; `use_cache=False` is the reference path).

Dimension keys: B batch, T time, F generated frames, P patches per frame, E embedding,
V vocabulary (token ids; id V is the mask), A actions (action id A is the null action).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.models.blocks import (
    SpaceTimeTransformer,
    check,
    check_attention,
    check_fraction,
    check_positive_ints,
)

# Fraction of a frame's tokens still masked once `progress` (in (0, 1]) of the steps are done.
MASK_SCHEDULES = {
    "cosine": lambda progress: math.cos(math.pi / 2 * progress),  # few tokens first, most at the end
    "linear": lambda progress: 1.0 - progress,
    # most tokens in the first steps, the last few refined slowly
    "exponential": lambda progress: (math.exp(-5 * progress) - math.exp(-5)) / (1 - math.exp(-5)),
}


@dataclass
class DynamicsConfig:
    vocab_size: int = 1000  # V: the tokenizer's vocab_size
    num_patches: int = 64  # P: the tokenizer's num_patches; a square grid
    num_actions: int = 8  # A: the latent action model's num_actions
    embed_dim: int = 128
    num_heads: int = 4
    num_blocks: int = 4
    max_frames: int = 16  # attention window in frames; generation slides over it
    mask_ratio_min: float = 0.5  # per-sample mask ratio of frames 1..T-1 is U[min, max]
    mask_ratio_max: float = 1.0
    action_dropout: float = 0.1  # chance a training action is replaced by the null action
    # The loss weight of a masked token that differs from the same patch's token one frame
    # earlier, over one that does not: most patches of a game never change, so with weight 1
    # the model learns to copy and the moving objects are a rounding error in the loss.
    change_weight: float = 1.0
    copy_logit: bool = False  # a learned per-position logit for the patch's token one frame earlier

    def __post_init__(self):
        check_positive_ints(self, "vocab_size", "num_patches", "num_actions", "num_blocks", "max_frames")
        check_attention(self)
        check(self, "vocab_size", self.vocab_size >= 2, "must be >= 2")
        check(self, "num_patches", math.isqrt(self.num_patches) ** 2 == self.num_patches,
              "must be a square number (a square patch grid)")
        check(self, "max_frames", self.max_frames >= 2, "must be >= 2 (context plus the frame being made)")
        check_fraction(self, "mask_ratio_min", 0.0, 1.0, include_low=False)
        check_fraction(self, "mask_ratio_max", 0.0, 1.0, include_low=False)
        check(self, "change_weight", isinstance(self.change_weight, (int, float)) and self.change_weight >= 1,
              "must be a number >= 1 (1: every token alike)")
        check(self, "mask_ratio_max", self.mask_ratio_max >= self.mask_ratio_min,
              f"must be >= mask_ratio_min {self.mask_ratio_min}")
        check_fraction(self, "action_dropout", 0.0, 1.0)
        check(self, "copy_logit", isinstance(self.copy_logit, bool), "must be true or false")
        check(self, "action_dropout", self.action_dropout < 1.0, "must be < 1 (actions must reach the model)")


# ---------------------------------------------------------------------------------------------
# counter-based noise: the random numbers of one sample depend only on its own seed, so a batch
# generates exactly what its samples generate one by one, on any device.

_LOW32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """32-bit integer hash of int64 tensors holding values in [0, 2**32). The multipliers are
    below 2**31, so no product reaches 2**63 and int64 never overflows on any backend."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _LOW32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _LOW32
    return x ^ (x >> 16)


def uniform_noise(seeds: Tensor, frame: int, step: int, positions: int) -> Tensor:
    """Uniform (0, 1) noise [B, P] from a hash of (seed of each sample, frame, step, position)."""
    key = _mix32(seeds & _LOW32) ^ _mix32((seeds >> 32) & _LOW32)  # [B]
    key = _mix32(_mix32(key ^ frame) ^ step)  # [B]
    counter = torch.arange(positions, device=seeds.device)  # [P]
    bits = _mix32(_mix32(rearrange(key, "b -> b 1") ^ counter))  # [B, P]
    return ((bits >> 8).float() + 0.5) / 2**24  # [B, P], 24 bits: exact in float32


# ---------------------------------------------------------------------------------------------


class DynamicsModel(nn.Module):
    """Tokens [B, T, P] and actions [B, T-1] -> logits [B, T, P, V] for every token."""

    def __init__(self, config: DynamicsConfig):
        super().__init__()
        self.config = config
        c = config
        self.mask_id = c.vocab_size
        self.null_action = c.num_actions
        self.token_embed = nn.Embedding(c.vocab_size + 1, c.embed_dim)
        # Unit-variance rows (nn.Embedding's default) so FiLM sees distinct actions from step one.
        self.action_embed = nn.Embedding(c.num_actions + 1, c.embed_dim)
        self.transformer = SpaceTimeTransformer(
            c.embed_dim, c.num_heads, c.num_blocks, grid=math.isqrt(c.num_patches), max_frames=c.max_frames,
            cond_dim=c.embed_dim,
        )
        self.head = nn.Linear(c.embed_dim, c.vocab_size)
        self.copy_head = nn.Linear(c.embed_dim, 1) if c.copy_logit else None
        if self.copy_head is not None:
            nn.init.zeros_(self.copy_head.weight)
            nn.init.zeros_(self.copy_head.bias)

    def conditions(self, actions: Tensor) -> Tensor:
        """Actions [B, T-1] (id A = null) -> each frame's FiLM condition [B, T, E]: the embedding
        of its incoming action, the null action for frame 0."""
        null = torch.full_like(actions[:, :1], self.null_action)  # [B, 1]
        return self.action_embed(torch.cat([null, actions], dim=1))  # [B, T, E]

    def features(self, tokens: Tensor, actions: Tensor) -> Tensor:
        """Tokens [B, T, P] (id V = masked) and actions [B, T-1] (id A = null) -> [B, T, P, E]."""
        return self.transformer(self.token_embed(tokens), self.conditions(actions))  # [B, T, P, E]

    def forward(self, tokens: Tensor, actions: Tensor) -> Tensor:
        """Tokens [B, T, P] and actions [B, T-1] -> logits [B, T, P, V]. With `copy_logit`, frame
        t's copy logit goes to frame t-1's token (frame 0 has none; nor has a masked token)."""
        unknown = torch.full_like(tokens[:, :1], self.mask_id)  # [B, 1, P]: nothing before frame 0
        previous = torch.cat([unknown, tokens[:, :-1]], dim=1)  # [B, T, P]
        return self.token_logits(self.features(tokens, actions), previous)  # [B, T, P, V]

    def token_logits(self, features: Tensor, previous: Tensor) -> Tensor:
        """Features [..., E] and the same positions' tokens one frame earlier [...] (id V:
        unknown) -> logits [..., V]: the head's, plus the copy logit on the earlier token."""
        logits = self.head(features)  # [..., V]
        if self.copy_head is None:
            return logits
        known = previous != self.mask_id  # [...]
        copy = self.copy_head(features).to(logits.dtype) * rearrange(known, "... -> ... 1")  # [..., 1]
        index = rearrange(torch.where(known, previous, 0), "... -> ... 1")  # [..., 1]
        return logits.scatter_add(-1, index, copy)  # [..., V]

    def loss(self, tokens: Tensor, actions: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Masked-token cross-entropy (scheme in the module docstring).

        Metrics (detached): loss, masked_accuracy (argmax hits on masked positions), mask_ratio.
        """
        b, t, p = tokens.shape
        if t < 2:
            raise TinyWorldsError(f"dynamics loss needs clips of >= 2 frames, got {t}")
        c = self.config
        device = tokens.device
        ratio = c.mask_ratio_min + (c.mask_ratio_max - c.mask_ratio_min) * torch.rand(b, 1, 1, device=device)
        count = (ratio * p).ceil().clamp(1, p)  # [B, 1, 1] masked positions per frame
        rank = torch.rand(b, t - 1, p, device=device).argsort(dim=-1).argsort(dim=-1)  # [B, T-1, P]
        masked = rank < count  # [B, T-1, P]: a uniform random subset of `count` positions
        inputs = torch.cat([tokens[:, :1], torch.where(masked, self.mask_id, tokens[:, 1:])], dim=1)  # [B, T, P]
        if c.action_dropout > 0:
            dropped = torch.rand(b, t - 1, device=device) < c.action_dropout  # [B, T-1]
            actions = torch.where(dropped, self.null_action, actions)

        # Logits only for frames 1..T-1: frame 0 is never a target.
        # The copy logit points at the true tokens of the frame before, as generation knows it whole.
        logits = self.token_logits(self.features(inputs, actions)[:, 1:], tokens[:, :-1])  # [B, T-1, P, V]
        logits = rearrange(logits, "b t p v -> (b t p) v")  # [B*(T-1)*P, V]
        targets = rearrange(tokens[:, 1:], "b t p -> (b t p)")  # [B*T*P]
        changed = rearrange(tokens[:, 1:] != tokens[:, :-1], "b t p -> (b t p)").float()  # [B*T*P]
        weight = rearrange(masked, "b t p -> (b t p)").float()  # [B*T*P]: 1 where the input was masked
        emphasis = weight * (1 + (c.change_weight - 1) * changed)  # [B*T*P]
        ce = F.cross_entropy(logits.float(), targets, reduction="none")  # [B*T*P]
        total = weight.sum()
        loss = (ce * emphasis).sum() / total  # per masked token, as with weight 1
        hits = (logits.detach().argmax(-1) == targets).float()  # [B*T*P]
        masked_changed = (weight * changed).sum()
        metrics = {
            "loss": loss.detach(),
            "masked_accuracy": (hits * weight).sum() / total,
            # How well the model predicts what moves: the tokens copying cannot get right.
            "changed_accuracy": (hits * weight * changed).sum() / masked_changed.clamp_min(1),
            "mask_ratio": total / weight.numel(),
        }
        return loss, metrics

    # -----------------------------------------------------------------------------------------
    # generation

    @torch.inference_mode()
    def generate(
        self,
        context_tokens: Tensor,
        actions: Tensor,
        *,
        context_actions: Tensor | None = None,
        steps: int = 8,
        schedule: str = "cosine",
        temperature: float = 1.0,
        seed: int | Tensor = 0,
        keep_bias: float = 0.0,
        use_cache: bool = True,
    ) -> Tensor:
        """Generate N frames after the context, one at a time, by iterative MaskGIT unmasking.

        context_tokens [B, T, P] (T >= 1, never modified); actions [B, F]: the action into each
        new frame; context_actions [B, T-1] or None (unknown: the null action A). Past
        max_frames the model sees a sliding window of the latest frames. temperature 0 is
        greedy. seed: an int (sample i uses seed + i) or a LongTensor [B] of per-sample seeds;
        each sample's output depends only on its own seed and inputs, not on the batch.
        keep_bias is added to the logit of each patch's token in the frame before: log of the
        training's change_weight (`calibrated_keep_bias`) undoes the tilt that weighting gave
        the model towards change; 0 samples the model as trained.
        use_cache=False re-runs the whole window at every MaskGIT step (the reference the
        cached path is tested against; same tokens, several times slower).
        Returns the new tokens [B, N, P].
        """
        b, t, p = self._check_generate_args(context_tokens, actions, context_actions, steps, schedule, temperature)
        device = context_tokens.device
        if isinstance(seed, Tensor):
            seeds = seed.to(device=device, dtype=torch.long)
        else:
            seeds = int(seed) + torch.arange(b, device=device)  # [B]
        if seeds.shape != (b,):
            raise TinyWorldsError(f"generate: seed tensor has shape {tuple(seeds.shape)}, expected ({b},)")
        if context_actions is None:
            context_actions = torch.full((b, t - 1), self.null_action, dtype=torch.long, device=device)

        tokens = context_tokens.long()  # [B, T, P]
        past_actions = context_actions.long()  # [B, T-1]: action into frame j+1
        window = self.config.max_frames - 1  # known frames beside the one being made
        new_frames = []
        for n in range(actions.shape[1]):
            past_actions = torch.cat([past_actions, actions[:, n : n + 1].long()], dim=1)  # [B, T]
            known = tokens[:, -window:]  # [B, K, P]
            # The window's first frame takes the null action, as frame 0 does in training.
            frame_features = self._frame_features(known, past_actions[:, -known.shape[1]:], use_cache)
            frame = self._sample_frame(
                frame_features, known[:, -1], seeds, n, steps, MASK_SCHEDULES[schedule], temperature, keep_bias
            )  # [B, P]
            tokens = torch.cat([tokens, rearrange(frame, "b p -> b 1 p")], dim=1)  # [B, T+1, P]
            new_frames.append(frame)
        return torch.stack(new_frames, dim=1)  # [B, N, P]

    def _frame_features(self, known: Tensor, actions: Tensor, use_cache: bool) -> Callable[[Tensor], Tensor]:
        """Known frames [B, K, P] and the actions into frames 1..K [B, K] -> a function from the
        (partly masked) next frame [B, P] to its features [B, P, E]."""
        if not use_cache:

            def from_window(frame: Tensor) -> Tensor:
                tokens = torch.cat([known, rearrange(frame, "b p -> b 1 p")], dim=1)  # [B, K+1, P]
                return self.features(tokens, actions)[:, -1]  # [B, P, E]

            return from_window

        cond = self.conditions(actions)  # [B, K+1, E]
        _, cache = self.transformer.forward_cached(self.token_embed(known), cond[:, :-1])  # K/V of the K frames

        def from_cache(frame: Tensor) -> Tensor:
            x = self.token_embed(rearrange(frame, "b p -> b 1 p"))  # [B, 1, P, E]
            x, _ = self.transformer.forward_cached(x, cond[:, -1:], past=cache)  # [B, 1, P, E]
            return rearrange(x, "b 1 p e -> b p e")  # [B, P, E]

        return from_cache

    def _sample_frame(self, frame_features, previous, seeds, frame_index, steps, masked_fraction, temperature,
                      keep_bias) -> Tensor:
        """MaskGIT unmasking of one frame of [B, P] tokens, scored by `frame_features`, after the
        frame `previous` [B, P] -> the frame [B, P]."""
        b, p = previous.shape
        frame = torch.full((b, p), self.mask_id, dtype=torch.long, device=seeds.device)  # [B, P]
        masked_count = p  # M: every sample has the same number of masked positions at each step
        for step in range(steps):
            is_known = frame != self.mask_id  # [B, P]
            # Only masked positions are scored: decided tokens keep their value whatever is sampled there.
            masked = is_known.byte().argsort(dim=-1, stable=True)[:, :masked_count]  # [B, M], ascending
            features = frame_features(frame)  # [B, P, E]
            features = features.gather(1, repeat(masked, "b m -> b m e", e=features.shape[-1]))  # [B, M, E]
            before = previous.gather(1, masked)  # [B, M]: the same patches' tokens one frame earlier
            logits = self.token_logits(features, before).float()  # [B, M, V]
            if keep_bias:
                logits = logits.scatter_add(-1, rearrange(before, "b m -> b m 1"),
                                            torch.full_like(logits[..., :1], keep_bias))  # [B, M, V]
            if temperature == 0:
                probs = logits.softmax(-1)  # [B, M, V]
                sampled = probs.argmax(-1)  # [B, M]
            else:
                probs = (logits if temperature == 1 else logits / temperature).softmax(-1)  # [B, M, V]
                cdf = probs.cumsum(-1)  # [B, M, V]
                # Inverse-CDF sampling needs one uniform per position, not one per vocab entry.
                u = uniform_noise(seeds, frame_index, step, p).gather(1, masked) * cdf[..., -1]  # [B, M]
                sampled = torch.searchsorted(cdf, rearrange(u, "b m -> b m 1"))  # [B, M, 1]
                # u can round past the last bin edge by one ulp: clamp to the last id
                sampled = rearrange(sampled, "b m 1 -> b m").clamp_max(self.config.vocab_size - 1)  # [B, M]
            confidence = rearrange(probs.gather(-1, rearrange(sampled, "b m -> b m 1")), "b m 1 -> b m")  # [B, M]
            # Back to all P positions; decided tokens keep their value and are never remasked.
            sampled = frame.scatter(1, masked, sampled)  # [B, P]
            confidence = torch.full((b, p), 2.0, device=frame.device).scatter(1, masked, confidence)  # [B, P]
            keep_count = p - math.floor(p * masked_fraction((step + 1) / steps))
            order = confidence.argsort(dim=-1, descending=True, stable=True)  # [B, P]
            keep = torch.zeros_like(is_known).scatter_(-1, order[:, :keep_count], True)  # [B, P]
            frame = torch.where(keep, sampled, self.mask_id)
            masked_count = p - keep_count
        return frame

    def calibrated_keep_bias(self) -> float:
        """The keep_bias that undoes change_weight. Cross-entropy with weight w on every token
        other than the one before is minimised by p(token) scaled by w for each of them, so
        keeping the token is under-rated by the factor w: log(w) on its logit restores it."""
        return math.log(self.config.change_weight)

    def _check_generate_args(self, context_tokens, actions, context_actions, steps, schedule, temperature):
        c = self.config
        if context_tokens.dim() != 3 or context_tokens.shape[1] < 1 or context_tokens.shape[2] != c.num_patches:
            raise TinyWorldsError(
                f"generate: context_tokens has shape {tuple(context_tokens.shape)}, expected [B, T>=1, {c.num_patches}]"
            )
        b, t, p = context_tokens.shape
        if actions.dim() != 2 or actions.shape[0] != b:
            raise TinyWorldsError(f"generate: actions has shape {tuple(actions.shape)}, expected [{b}, F]")
        if context_actions is not None and tuple(context_actions.shape) != (b, t - 1):
            raise TinyWorldsError(
                f"generate: context_actions has shape {tuple(context_actions.shape)}, expected [{b}, {t - 1}]"
            )
        if not isinstance(steps, int) or steps < 1:
            raise TinyWorldsError(f"generate: steps={steps!r} must be a whole number >= 1")
        if schedule not in MASK_SCHEDULES:
            raise TinyWorldsError(f"generate: schedule={schedule!r} must be one of {', '.join(MASK_SCHEDULES)}")
        if not temperature >= 0:
            raise TinyWorldsError(f"generate: temperature={temperature!r} must be >= 0")
        if context_tokens.numel() and (context_tokens.min() < 0 or context_tokens.max() >= c.vocab_size):
            raise TinyWorldsError(f"generate: context_tokens must be ids in [0, {c.vocab_size})")
        for name, given in (("actions", actions), ("context_actions", context_actions)):
            if given is not None and given.numel() and (given.min() < 0 or given.max() > self.null_action):
                raise TinyWorldsError(
                    f"generate: {name} must be ids in [0, {c.num_actions}] ({c.num_actions} = unknown)"
                )
        return b, t, p
