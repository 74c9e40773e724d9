"""Building blocks shared by the three models: attention, SwiGLU, the patchwise MLP stack, the
space-time block with optional FiLM conditioning, sinusoidal positions, patchify, and config
validation helpers.

Dimension keys: B batch, T time, C channels, H/W pixels, S patch size, Hp/Wp patch grid,
P patches per frame (Hp * Wp), E embedding, E_c conditioning width, h attention heads,
d head width (E / h).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import Tensor, nn

from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.models.fsq import valid_levels

# ---------------------------------------------------------------------------------------------
# config validation


def check(config: object, field: str, ok: bool, reason: str) -> None:
    """Raise a one-line TinyWorldsError naming `Config.field=value` unless `ok`."""
    if not ok:
        value = getattr(config, field)
        raise TinyWorldsError(f"{type(config).__name__}.{field}={value!r}: {reason}")


def check_positive_ints(config: object, *fields: str) -> None:
    for field in fields:
        value = getattr(config, field)
        check(config, field, isinstance(value, int) and not isinstance(value, bool), "must be a whole number")
        check(config, field, value >= 1, "must be >= 1")


def check_attention(config: object) -> None:
    """embed_dim must split into num_heads heads and into the 4 parts of a 2D sin/cos position code."""
    check_positive_ints(config, "embed_dim", "num_heads")
    check(config, "embed_dim", config.embed_dim % 4 == 0, "must be divisible by 4 (2D sinusoidal positions)")
    check(config, "num_heads", config.embed_dim % config.num_heads == 0,
          f"embed_dim {config.embed_dim} is not divisible by it")


def check_frames(config: object) -> None:
    """frame_size, channels and patch_size of a model that reads pixels."""
    check_positive_ints(config, "frame_size", "channels", "patch_size")
    check(config, "patch_size", config.frame_size % config.patch_size == 0,
          f"frame_size {config.frame_size} is not divisible by it")


def check_levels(config: object) -> None:
    """FSQ `levels`: whole numbers >= 2. A JSON list is stored back as a tuple."""
    check(config, "levels", isinstance(config.levels, (list, tuple)), "must be a list of whole numbers")
    config.levels = tuple(config.levels)
    check(config, "levels", valid_levels(config.levels), "need at least one FSQ dimension and every level >= 2")


def check_number(config: object, field: str) -> None:
    value = getattr(config, field)
    check(config, field, isinstance(value, (int, float)) and not isinstance(value, bool), "must be a number")


def check_fraction(config: object, field: str, low: float, high: float, *, include_low: bool = True) -> None:
    """`field` must lie in [low, high] (or (low, high] without include_low)."""
    check_number(config, field)
    value = getattr(config, field)
    inside = (low <= value if include_low else low < value) and value <= high
    check(config, field, inside, f"must be in {'[' if include_low else '('}{low}, {high}]")


# ---------------------------------------------------------------------------------------------
# pixels <-> patches


def patchify(frames: Tensor, patch_size: int) -> Tensor:
    """Frames [B, T, C, H, W] -> patches [B, T, P, S*S*C] in row-major patch order."""
    return rearrange(
        frames, "b t c (hp s1) (wp s2) -> b t (hp wp) (s1 s2 c)", s1=patch_size, s2=patch_size
    )  # [B, T, P, S*S*C]


def unpatchify(patches: Tensor, patch_size: int, grid: int) -> Tensor:
    """Patches [B, T, P, S*S*C] -> frames [B, T, C, H, W] for a square Hp = Wp = grid."""
    return rearrange(
        patches, "b t (hp wp) (s1 s2 c) -> b t c (hp s1) (wp s2)", hp=grid, s1=patch_size, s2=patch_size
    )  # [B, T, C, H, W]


def over_time_windows(fn, x: Tensor, window: int) -> Tensor:
    """A model with a window of `window` frames, over a clip of any length: x [B, T, ...] ->
    fn(x) when T <= window; past it, fn on every window of frames ending at window-1 .. T-1
    (batched), stitched into the first window's outputs and then each later window's last.
    fn maps [N, window, ...] to [N, K, ...] outputs aligned with the window's end (K = window
    per frame, window - 1 per transition), so each output is made from the window ending at it."""
    b, t = x.shape[:2]
    if t <= window:
        return fn(x)
    windows = rearrange(x.unfold(1, window, 1), "b n ... w -> (b n) w ...")  # [B*n, window, ...]
    out = rearrange(fn(windows), "(b n) k ... -> b n k ...", b=b)  # [B, n, K, ...]
    return torch.cat([out[:, 0, :-1], out[:, :, -1]], dim=1)  # [B, T or T-1, ...]


def marked_pixels(difference: Tensor, threshold: float) -> Tensor:
    """Bool [B, T, 1, H, W]: where any channel of the differences [B, T, C, H, W] exceeds `threshold`."""
    return reduce(difference.abs(), "b t c h w -> b t 1 h w", "max") > threshold


def emphasis_weights(difference: Tensor, weight: float, threshold: float) -> Tensor:
    """Per-pixel loss weights [B, T, 1, H, W] from differences [B, T, C, H, W]: `weight` where any
    channel differs by more than `threshold`, else 1. What the difference is against decides
    what is emphasised: the background (a tokenizer's objects) or the frame before (what moves)."""
    return 1 + (weight - 1) * marked_pixels(difference, threshold).float()


def emphasised_mse(error: Tensor, weights: Tensor) -> Tensor:
    """Detached mean of squared errors [B, T, C, H, W] over the emphasised pixels (weights > 1)."""
    marked = (weights > 1).float()  # [B, T, 1, H, W]
    return (error.detach() * marked).sum() / (marked.sum() * error.shape[2]).clamp_min(1)


# ---------------------------------------------------------------------------------------------
# positions


def sincos_1d(length: int, dim: int) -> Tensor:
    """Fixed sinusoidal code [length, dim] (sin half, cos half) for positions 0..length-1."""
    freqs = torch.exp(torch.arange(dim // 2, dtype=torch.float64) * (-math.log(10000.0) * 2 / dim))  # [dim/2]
    angles = torch.outer(torch.arange(length, dtype=torch.float64), freqs)  # [length, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()  # [length, dim]


def sincos_2d(grid: int, dim: int) -> Tensor:
    """Fixed 2D sinusoidal code [P, dim] for a square patch grid: rows in one half, columns in the other."""
    rows = repeat(sincos_1d(grid, dim // 2), "hp e -> hp wp e", wp=grid)  # [Hp, Wp, E/2]
    cols = repeat(sincos_1d(grid, dim // 2), "wp e -> hp wp e", hp=grid)  # [Hp, Wp, E/2]
    return rearrange(torch.cat([rows, cols], dim=-1), "hp wp e -> (hp wp) e")  # [P, E]


# ---------------------------------------------------------------------------------------------
# layers

# The temporal keys and values of one block for some frames: two [B*P, T, E] tensors.
TimeKV = tuple[Tensor, Tensor]


class Attention(nn.Module):
    """Multi-head self-attention over the middle axis of [R, Lq, E] via fused SDPA kernels."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: Tensor, *, causal: bool) -> Tensor:
        return self.attend(*self.project(x), causal=causal)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[R, Lq, E] -> queries, keys, values, each [R, Lq, E] (the h heads side by side)."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> Tensor:
        """Queries [R, Lq, E] over keys and values [R, Lk, E] -> [R, Lq, E]."""
        if k.shape[1] <= SHORT_KEYS and q.shape[-1] // self.num_heads <= NARROW_HEAD:
            return self.proj(short_attention(q, k, v, self.num_heads, causal=causal))
        q, k, v = (rearrange(z, "n l (h d) -> n h l d", h=self.num_heads) for z in (q, k, v))  # [R, h, Lq or Lk, d]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [R, h, Lq, d]
        return self.proj(rearrange(y, "n h l d -> n l (h d)"))  # [R, Lq, E]

    def attend_one(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """One query per row [R, 1, E] over keys and values [R, Lk, E] -> [R, 1, E]; equals attend().

        Dense ops instead of SDPA: with S a few frames and heads of a few channels, SDPA's setup
        per row and head outweighs the arithmetic (slower at TinyWorlds' sizes on CPU).
        """
        d = q.shape[-1] // self.num_heads
        # [E, h] of 0/1, channel e -> head e // d: a matmul with it sums products within each head.
        head_of = torch.eye(self.num_heads, dtype=q.dtype, device=q.device).repeat_interleave(d, dim=0)  # [E, h]
        scores = ((q * k) @ head_of) * d**-0.5  # [R, Lk, h]
        weights = scores.softmax(dim=1)  # [R, Lk, h]
        y = reduce((weights @ head_of.T) * v, "n s e -> n 1 e", "sum")  # [R, 1, E]
        return self.proj(y)


# Where `short_attention` replaces SDPA: at most this many keys, heads at most this wide.
SHORT_KEYS, NARROW_HEAD = 4, 8


def short_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, *, causal: bool) -> Tensor:
    """Queries [R, Lq, E] over a few keys and values [R, Lk, E] -> [R, Lq, E] by dense ops;
    equals SDPA to float rounding.

    Time attention over a clip's few frames with narrow heads (TinyWorlds' sizes: heads of 4
    channels, 2-4 frames) is tens of thousands of tiny problems, and SDPA's CPU kernel pays a
    setup per row and head block that outweighs their arithmetic: forward and backward at heads
    of 4 took 41 vs 106 ms (2 frames) and 50 vs 70 ms (4 frames) on 1 thread of our CPU;
    at heads of 16+ or 8+ frames SDPA wins (bench/README.md, "Attention layouts").
    """
    d = q.shape[-1] // num_heads
    q, k, v = (rearrange(z, "n l (h d) -> n l h d", h=num_heads) for z in (q, k, v))  # [R, L, h, d]
    scores = torch.einsum("nqhd,nkhd->nqkh", q * d**-0.5, k)  # [R, Lq, Lk, h]
    if causal:  # query i sees keys 0..i (Lq = Lk)
        later = torch.ones(scores.shape[1], scores.shape[2], dtype=torch.bool, device=q.device).triu(1)  # [Lq, Lk]
        scores = scores.masked_fill(rearrange(later, "q k -> q k 1"), float("-inf"))
    y = torch.einsum("nqkh,nkhd->nqhd", scores.softmax(dim=2), v)  # [R, Lq, h, d]
    return rearrange(y, "n l h d -> n l (h d)")  # [R, Lq, E]


def swiglu_hidden(embed_dim: int) -> int:
    # 8/3 E keeps SwiGLU's parameter count equal to a 4E GELU MLP; round to 32 for GEMM tiles.
    return 32 * math.ceil(8 * embed_dim / 3 / 32)


class SwiGLU(nn.Module):
    """Gated feed-forward: W_out(silu(gate) * value)."""

    def __init__(self, embed_dim: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or swiglu_hidden(embed_dim)
        self.w_in = nn.Linear(embed_dim, 2 * hidden_dim)
        self.w_out = nn.Linear(hidden_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * value)


class PatchwiseMLP(nn.Module):
    """A stack of pre-norm residual SwiGLU blocks and a final RMSNorm, applied to every patch on
    its own: [..., E] -> [..., E]. No attention and no positions, so a patch's output is a
    function of that patch's input alone, wherever and whenever it sits."""

    def __init__(self, embed_dim: int, num_blocks: int):
        super().__init__()
        self.norms = nn.ModuleList(nn.RMSNorm(embed_dim) for _ in range(num_blocks))
        self.mlps = nn.ModuleList(SwiGLU(embed_dim) for _ in range(num_blocks))
        self.norm = nn.RMSNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        for norm, mlp in zip(self.norms, self.mlps):
            x = x + mlp(norm(x))
        return self.norm(x)


class SpaceTimeBlock(nn.Module):
    """Pre-norm block on [B, T, P, E]: attention among the P patches of each frame, then across
    the T frames of each patch position (causal by default), then SwiGLU.

    With `cond_dim`, each of the three norms is followed by FiLM, x * (1 + gamma) + beta, with
    gamma and beta projected from a per-frame conditioning vector [B, T, E_c].
    With `temporal=False` the time attention is left out: every frame is processed alone.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        causal: bool = True,
        temporal: bool = True,
        cond_dim: int | None = None,
    ):
        super().__init__()
        self.causal, self.temporal = causal, temporal
        self.norm_space = nn.RMSNorm(embed_dim)
        self.attn_space = Attention(embed_dim, num_heads)
        if temporal:
            self.norm_time = nn.RMSNorm(embed_dim)
            self.attn_time = Attention(embed_dim, num_heads)
        self.norm_mlp = nn.RMSNorm(embed_dim)
        self.mlp = SwiGLU(embed_dim)
        self.film = None
        if cond_dim is not None:
            self.film = nn.Linear(cond_dim, 6 * embed_dim)  # (gamma, beta) for each of the 3 norms
            # Not zero: a zero init would make the output ignore the condition at step 0, and the
            # model could settle into ignoring it. Small weights keep the block near identity.
            nn.init.normal_(self.film.weight, std=0.02)
            nn.init.zeros_(self.film.bias)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.forward_cached(x, cond)[0]

    def forward_cached(
        self, x: Tensor, cond: Tensor | None = None, past: TimeKV | None = None
    ) -> tuple[Tensor, TimeKV | None]:
        """forward(), also returning the temporal keys and values of x's frames, each [B*P, T, E]
        (None without temporal attention).

        With `past`, the temporal keys and values of the frames before x (from an earlier call),
        x is the one frame that follows them [B, 1, P, E]: its temporal attention reads the
        past frames and itself, so the result equals that frame's slice of forward() over all
        of them. Valid for a causal block only (the past must not see x).
        """
        b = x.shape[0]
        film = None
        if self.film is not None:
            film = rearrange(self.film(cond), "b t (k e) -> k b t 1 e", k=6)  # 6 x [B, T, 1, E]

        h = modulate(self.norm_space(x), film, 0)
        h = rearrange(h, "b t p e -> (b t) p e")  # [B*T, P, E]
        h = self.attn_space(h, causal=False)
        x = x + rearrange(h, "(b t) p e -> b t p e", b=b)  # [B, T, P, E]

        kv = None
        if self.temporal:
            h = modulate(self.norm_time(x), film, 1)
            h = rearrange(h, "b t p e -> (b p) t e")  # [B*P, T, E]
            q, k, v = self.attn_time.project(h)  # each [B*P, T, E]
            kv = (k, v)
            if past is None:
                h = self.attn_time.attend(q, k, v, causal=self.causal)  # [B*P, T, E]
            else:
                if not self.causal or x.shape[1] != 1:
                    raise TinyWorldsError("a temporal cache extends a causal block by exactly one frame")
                k = torch.cat([past[0], k], dim=1)  # [B*P, T_past+1, E]
                v = torch.cat([past[1], v], dim=1)  # [B*P, T_past+1, E]
                h = self.attn_time.attend_one(q, k, v)  # [B*P, 1, E]: the newest frame sees all
            x = x + rearrange(h, "(b p) t e -> b t p e", b=b)  # [B, T, P, E]

        return x + self.mlp(modulate(self.norm_mlp(x), film, 2)), kv  # [B, T, P, E]


def modulate(h: Tensor, film: Tensor | None, site: int) -> Tensor:
    """FiLM at one of a block's three norms: h * (1 + gamma) + beta, or h when unconditioned."""
    if film is None:
        return h
    return h * (1 + film[2 * site]) + film[2 * site + 1]


class SpaceTimeTransformer(nn.Module):
    """Fixed sinusoidal positions (2D over the patch grid, 1D over time) added at the input,
    a stack of SpaceTimeBlocks, and a final RMSNorm. [B, T, P, E] -> [B, T, P, E].
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_blocks: int,
        *,
        grid: int,
        max_frames: int,
        causal: bool = True,
        temporal: bool = True,
        cond_dim: int | None = None,
    ):
        super().__init__()
        self.max_frames = max_frames
        self.register_buffer("pos_space", sincos_2d(grid, embed_dim), persistent=False)  # [P, E]
        # Without temporal attention no time position either: a frame's output must not
        # depend on where it sits in the clip.
        pos_time = sincos_1d(max_frames, embed_dim) if temporal else torch.zeros(max_frames, embed_dim)
        self.register_buffer("pos_time", pos_time, persistent=False)  # [T_max, E]
        self.blocks = nn.ModuleList(
            SpaceTimeBlock(embed_dim, num_heads, causal=causal, temporal=temporal, cond_dim=cond_dim)
            for _ in range(num_blocks)
        )
        self.norm = nn.RMSNorm(embed_dim)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.forward_cached(x, cond)[0]

    def forward_cached(
        self, x: Tensor, cond: Tensor | None = None, past: list[TimeKV] | None = None
    ) -> tuple[Tensor, list[TimeKV | None]]:
        """forward(), also returning a cache: each block's temporal keys and values of x's frames.

        With `past`, the cache of the frames before x, x is the one frame that follows them
        [B, 1, P, E] (cond [B, 1, E_c]): it takes the next time position and attends over the
        cached frames in time, and the output equals its slice of forward() over all the frames
        at the cost of one frame. A causal transformer's earlier frames never depend on later
        ones, which is what makes the cache exact (MaskGIT generation re-runs only the new frame).
        """
        start = 0 if past is None else past[0][0].shape[1]  # frames already cached
        stop = start + x.shape[1]
        if stop > self.max_frames:
            raise TinyWorldsError(f"a clip of {stop} frames is longer than the model's max_frames={self.max_frames}")
        x = x + self.pos_space + rearrange(self.pos_time[start:stop], "t e -> t 1 e")  # [B, T, P, E]
        cache = []
        for i, block in enumerate(self.blocks):
            x, kv = block.forward_cached(x, cond, None if past is None else past[i])
            cache.append(kv)
        return self.norm(x), cache
