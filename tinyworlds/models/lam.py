"""Latent action model: infers a discrete action for each frame transition without labels.

Encoder: each transition t -> t+1 on its own. `pair_encoding: stacked` (default): frames t and
t+1 side by side in the channels, as one image of 2C channels -> patch embed -> spatial
transformer -> mean over the patches -> Linear to L dims -> FSQ -> action id. `sequence`: the
two frames as a clip of 2 -> patch embed -> space-time transformer (causal in time) -> mean over
the patches of frame t+1 -> Linear -> FSQ. Decoder: predicts frame t+1 from frames 0..t,
FiLM-conditioned on the quantized action of t -> t+1, causal in time.

Why pairs: an encoder that sees the whole clip can tell a transition's place in it (its
temporal position embedding) and give every position its own code, which spreads the codes
at no cost to the decoder and says nothing about the controls. A pair has no position to give
away, and a transition's id is the same in every window that holds it.

Why stacked: a move of the paddle is a pixel or two inside one patch. Stacked, the first
linear layer sees both frames of a patch at once, so the sign of the move (which edge of the
sprite appears and which vanishes) is one weighted sum away; as a sequence it must survive
each frame's embedding on its own and be recovered by attention across time. Stacked is also
half the encoder's tokens (one image per transition instead of two) and needs no time attention.
Measured on the default pipeline (3 games, one seed each): NMI with the player's move sign
0.15 vs 0.16 (sequence), within the spread between runs; the dynamics model's ΔtPSNR with
the LAM's ids +0.71 vs +0.47 dB; a training step 209 vs 352 ms on 1 thread, 160 vs 299 ms on 2.

Why antisymmetric (`antisymmetric: true`, stacked only): an action's effect reverses when its
transition plays backwards, so the latent is built as f(t, t+1) - f(t+1, t): (t+1, t) gets
exactly the opposite latent of (t, t+1), and no change at all gets 0. Trained on next-frame
error alone, the plain encoder's ids split "the paddle moved" from "it did not" but not up from
down, though a linear probe on its pooled features reads the move's sign (0.78 on Pong, 0.75 on
Breakout; an untrained encoder's 0.62 / 0.75), and 4x the steps made the ids worse. An
antisymmetric latent cannot say "moved" without saying which way. With ternary FSQ levels each
dimension has a middle level for "still" and one per direction. Measured on the default data
(NMI with the player's move sign, Pong / Breakout / Space Invaders, 800 steps, one seed each):
plain with levels [2, 2, 2] 0.17 / 0.18 / 0.11, with the residual decoder 0.18 / 0.18 / 0.11 and
at 3200 steps 0.11 / 0.17 / 0.04; ternary levels [3, 3] alone (residual) 0.21 / 0.11 / 0.07;
antisymmetric with [3, 3] 0.13 / 0.31 / 0.25, and with the residual decoder 0.18 / 0.38 / 0.25
(seed 1: 0.11 / 0.26 / 0.23), opposite directions on different ids in every game and run. The
encoder runs twice: a training step costs ~20% more.

Why train on single transitions (params.yaml `lam.train.clip_len: 2`): the decoder is causal
and, on longer clips, sees the frames before t too. Actions are held for several frames (by
players and by our recorders) and paddles carry momentum, so from those frames the decoder can
tell how the player is moving without the latent, and the latent, which whitening keeps busy,
goes to whatever else helps (measured: the ids then follow the move less the longer it trains).
With clips of 2 frames the decoder sees frame t alone, and the player's move must come through
the latent. NMI with the player's move sign, Pong / Breakout / Space Invaders, antisymmetric,
800 steps, held-out (and training) transitions: clips of 4 x 16 0.13 / 0.31 / 0.25 (0.10 /
0.28 / 0.27); clips of 8 x 8 0.06 / 0.11 / 0.20; clips of 2 x 48, the same frames a step,
0.27 / 0.50 / 0.35 (0.23 / 0.51 / 0.41; seed 1: 0.32 / 0.47 / 0.30). Stopped at 400 steps
they are closer still on Pong, a little less on Breakout: 0.51 / 0.43 / 0.39 (0.42 / 0.42 /
0.39; seed 1: 0.37 / 0.47 / 0.29), and the stage takes half the time. (Without antisymmetry a
decoder that saw frame t alone did not help, 0.14 / 0.16 / 0.08: those ids did not tell the
direction at all.) A likely reason for the drift, not measured: from frame t alone
the ball's direction is unknown to the decoder too, and later in training the latent starts
to spend itself on it.

Why persistence (`persistence_weight`, with `decoder_context: frame` and clips of 3 or more):
an antisymmetric latent can still be "where the paddle went" rather than "which way it went"
(a code of the place after the move minus one of the place before), and for a decoder that
sees frame t the two say as much; which one a run found depended on the seed. Players and
our recorders hold an action for several steps, so its direction stays the same from one
transition to the next while the place changes at every step. The penalty is slowness, as
in slow feature analysis: E[(z[t+1] - z[t])^2] / (2 E[z^2]) per whitened dimension over the
consecutive transitions of a clip, so the latent that changes least while the player keeps
moving, the direction, is the cheapest. The decoder still predicts each transition from its
frame t alone (`decoder_context: frame`), so the longer clip gives the decoder no past to
read the move off. Measured (LAM stage alone, NMI with the player's move sign, Pong /
Breakout / Space Invaders, held-out transitions, seed 0 then 1): without persistence, clips of 2
x 48 at 400 steps (0.3.5's default) 0.51 / 0.43 / 0.39 (0.37 / 0.47 / 0.29), and clips of 3 x 24
decoded frame by frame alone 0.39 / 0.33 / 0.37; with weight 1, clips of 3 x 24, 400 steps 0.57
/ 0.59 / 0.40 (0.52 / 0.60 / 0.36), 800 steps 0.55 / 0.67 / 0.45 (0.51 / 0.60 / 0.37); clips of
4 x 16, 800 steps, the default, 0.51 / 0.62 / 0.52 (0.55 / 0.58 / 0.61); weight 3 on clips of 3,
800 steps, 0.37 / 0.68 / 0.54; weight 0.3, 400 steps, 0.49 / 0.64 / 0.36. Unlike before, the
ids now follow the move better the longer the LAM trains. A first version penalised the
change of the whitened latent itself and collapsed to one id (see `slowness`).

Why persist one direction (`persistence: slowest`): the penalty above holds every whitened
dimension, but only one thing is held by the controls, the direction; the place the paddle is
in changes at every step, and so does most else a second dimension can say. Averaged over
both, the penalty is met as well by two half-slow dimensions as by one held and one free, and
in some runs Pong's latent settled on something slow that is not the player (its direction
slowness 0.07-0.08 against 0.12-0.14 in the good runs): the computer's paddle, which follows
the ball and so turns only at a bounce (see "Why three dimensions"). With the penalty on the
slowest direction alone (`slowness_along`, the smallest of the whitened latent's slow-feature
values), one held direction pays and the other dimension is free. NMI with the move sign, read
along the direction, LAM stage alone, seeds 0 to 5: Pong 0.67 / 0.77 / 0.06 / 0.69 / 0.06 /
0.06 with "each", 0.65 / 0.73 / 0.71 / 0.70 / 0.63 / 0.73 with "slowest"; Breakout 0.77-0.92
with both; Space Invaders 0.77 / 0.74 / 0.46 / 0.44 / 0.47 / 0.48 and 0.50 / 0.35 / 0.35 /
0.37 / 0.64 / 0.46. "slowest" with weight 3 holds Space Invaders' direction a little more
often (0.49-0.64) but lost Pong's in one seed of six (README, "What is known").

Why whiten per video: at this scale the reconstruction loss, early on, pulls every latent
towards one value the decoder can rely on, and an anti-collapse penalty on the batch's spread
is met by telling the games in the batch apart (one code per game). So in training the latent
is whitened over the batch's transitions of each video (zero mean, identity covariance per
video) before FSQ: the codes always split every video's transitions. Whitened, not only
standardised per dimension: standardised dimensions can all copy one feature (we measured
three binary dimensions ending up as +x, -x, +x, so 2 of 8 ids were used); whitened ones
cannot, so every dimension must split the transitions by something the others do not say,
and the decoder decides what. A penalty pulls each video's raw latent towards mean 0 and
covariance I, so by the end whitening changes little and inference (`infer`) uses the raw
latent with no statistics, on any clip, even a single transition.

Why one video a batch (params.yaml `lam.train.videos_per_batch: 1`): the whitening is a
statistic over the batch, and a batch mixed from three games holds about 5 clips (15
transitions) of each, too few to estimate a video's covariance. Space Invaders lost its
direction in 5 seeds of 6 that way: its latent then says "the cannon moved" and not which way,
along every direction of the latent plane (checked with the true move sign). Alone, with 5
clips a batch, it did so too (2 seeds of 2); alone with 16 it found the direction in 2 of 2
(NMI with the move sign 0.79 / 0.80). With every batch drawn from one video (in proportion to
its clips, at no cost in compute) the whitening and the slowest direction are that video's,
over 48 transitions. What it costs: in a mixed batch the persistence penalty's slowest
direction is shared by the games; alone, Pong's latent can settle on the computer's paddle
instead (1 seed in 6 lost Pong's controls entirely, direction slowness 0.05). Two videos a
batch (8 clips each) did worse on both: Space Invaders held in 2 seeds of 4, Pong in 3.
Measured over seeds: README, "What is known".

Why three dimensions (params.yaml `levels: [3, 3, 3]`, read as 3 ids all the same): Pong has
two paddles that move up and down, the player's and the computer's, and from video alone both
look like controls. The computer's follows the ball, so its direction is the slower of the two
(slowness 0.05-0.08 against 0.12-0.14), and a latent of two whitened dimensions held one
paddle or the other, never both: in every Pong run that lost the controls (8 runs over seven
settings), the ids followed the computer's paddle (NMI with its move sign, read off the
frames, 0.45-0.72; with the player's 0.00-0.08), and a linear fit of the player's move on the
latent explained almost nothing of it (R² 0.01 in the two runs fitted, against 0.87-0.91 in
good runs). With a third dimension the player's paddle won in every seed tried, 6 of 6 (Space
Invaders held its direction in 5, against 6 with two dimensions; README, "What is known"). Why
is not measured: the three-dimensional latent we checked holds the player's move (R² 0.91) and
not the computer's (0.05), so it is not room for both. The FSQ codes (27) are not actions
here: the readout names 3 whatever their number, and the step costs the same.

Why read the direction (`readout: direction`): trained as above, the LAM puts "which way" in
its latent, but its 9 FSQ ids do not name it one id per direction. Two whitened dimensions
cannot both carry one three-valued feature, so the direction lies along a diagonal of the two
and the second dimension splits each direction by something else (often where the player
is): each direction spreads over four ids, almost pure, and the NMI with the move sign stays
near 0.5. The direction is the latent's slowest feature, since a held control keeps it while
the place changes at every step. So once the LAM is trained, `slowest_direction` finds, per
video and on its training frames only, the direction along which the raw latent changes
least between consecutive transitions (slow feature analysis), and a transition's id is STILL
for the middle FSQ code (the antisymmetric latent's "nothing moved") and otherwise POSITIVE
or NEGATIVE by the sign of its latent along that direction: 3 ids, and a transition played
backwards gets the opposite one. Training is unchanged. Measured on 0.3.10's LAM (seed 0,
held-out transitions, Pong / Breakout / Space Invaders), NMI with the move sign 0.49 / 0.59 /
0.56 as codes, 0.67 / 0.84 / 0.77 read along the direction; against the true actions, over
the perfect move detector's, 0.64 / 0.59 / 0.56 -> 0.87 / 0.84 / 0.77. The readout cannot
make a direction the latent lacks: in the runs where Space Invaders' ids say "the cannon
moved" and not which way, it stays short (README, "What is known").

Dimension keys: B batch, T time, C channels, H/W pixels, S patch size,
P patches per frame, E embedding, L FSQ dims (len(levels)), A actions (prod(levels)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange, reduce
from torch import Tensor, nn

from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.models.blocks import (
    SpaceTimeTransformer,
    check,
    check_attention,
    check_fraction,
    check_frames,
    check_levels,
    check_number,
    check_positive_ints,
    emphasis_weights,
    emphasised_mse,
    patchify,
    unpatchify,
)
from tinyworlds.models.fsq import FSQ, id_usage, perplexity


PAIR_ENCODINGS = ("stacked", "sequence")
DECODER_CONTEXTS = ("clip", "frame")
PERSISTENCES = ("each", "slowest")
READOUTS = ("codes", "direction")
# The ids of `readout: direction`: a move one way, no move, a move the other way.
NEGATIVE, STILL, POSITIVE = 0, 1, 2


@dataclass
class LatentActionConfig:
    frame_size: int = 64  # H = W
    channels: int = 3
    patch_size: int = 8  # S; frame_size must be a multiple
    embed_dim: int = 128
    num_heads: int = 4
    encoder_blocks: int = 2
    decoder_blocks: int = 2
    levels: tuple[int, ...] = (2, 2, 2)  # FSQ levels: prod(levels) codes, 4..16 with readout "codes"
    max_frames: int = 16
    mask_ratio: float = 0.0  # fraction of decoder input tokens (frames >= 1) hidden in the loss
    standardize_weight: float = 0.1  # pulls each video's raw latent to zero mean, identity covariance
    # The loss weight of a pixel that changes between t and t+1 (by more than change_threshold
    # on the [-1, 1] scale) over one that does not. A paddle's move is a few dozen pixels of a
    # frame: with plain MSE (weight 1) copying frame t is nearly as good as knowing the action.
    change_weight: float = 1.0
    change_threshold: float = 24 / 127.5
    # Predict frame t+1 as frame t plus a change (the change head starts at zero), so the decoder
    # starts from copying and every gain must come from the action and the context.
    residual: bool = False
    pair_encoding: str = "stacked"  # stacked | sequence: how the encoder reads a transition's two frames
    # Stacked only: latent(t, t+1) = f(t, t+1) - f(t+1, t), so a transition played backwards gets
    # the opposite latent (see the module docstring).
    antisymmetric: bool = False
    # "clip": the decoder is causal over the clip, so it sees frames 0..t for frame t+1;
    # "frame": it predicts each transition from frame t alone, whatever the clip length.
    decoder_context: str = "clip"
    # Loss weight of the change of the whitened latent between consecutive transitions of a
    # clip (slowness, see the module docstring): 0 leaves it out.
    persistence_weight: float = 0.0
    # What persistence holds (module docstring, "Why persist one direction"): "each" whitened
    # dimension; "slowest", only the direction along which the latent changes least.
    persistence: str = "each"
    # How a transition's action id is read from its latent (module docstring, "Why read the
    # direction"): "codes", its FSQ code (prod(levels) ids); "direction", 3 ids: still (the
    # middle code) or the sign of the latent along its slowest direction, which
    # `slowest_direction` fits per video once the LAM is trained. Training is the same for both.
    readout: str = "codes"

    def __post_init__(self):
        check_frames(self)
        check_attention(self)
        check_positive_ints(self, "encoder_blocks", "decoder_blocks", "max_frames")
        check(self, "max_frames", self.max_frames >= 2, "a transition needs at least 2 frames")
        check_levels(self)
        codes = math.prod(self.levels)
        # Read as codes, each code is an action a player drives; read along a direction, 3 ids whatever the codes.
        check(self, "levels", self.readout != "codes" or 4 <= codes <= 16,
              f"gives {codes} actions; must give 4 to 16 (or use readout: direction)")
        check_fraction(self, "mask_ratio", 0.0, 1.0)
        check(self, "mask_ratio", self.mask_ratio < 1.0, "must be < 1 (some context must stay visible)")
        check_number(self, "standardize_weight")
        check(self, "standardize_weight", self.standardize_weight >= 0, "must be >= 0")
        check_number(self, "change_weight")
        check(self, "change_weight", self.change_weight >= 1, "must be >= 1 (1: plain MSE)")
        check(self, "pair_encoding", self.pair_encoding in PAIR_ENCODINGS, f"must be one of {', '.join(PAIR_ENCODINGS)}")
        check(self, "antisymmetric", isinstance(self.antisymmetric, bool), "must be true or false")
        check(self, "antisymmetric", not self.antisymmetric or self.pair_encoding == "stacked",
              "needs pair_encoding: stacked")
        check(self, "decoder_context", self.decoder_context in DECODER_CONTEXTS,
              f"must be one of {', '.join(DECODER_CONTEXTS)}")
        check(self, "mask_ratio", self.mask_ratio == 0 or self.decoder_context == "clip",
              "needs decoder_context: clip (a decoder that sees frame t alone has no later frame to mask)")
        check_number(self, "persistence_weight")
        check(self, "persistence_weight", self.persistence_weight >= 0, "must be >= 0")
        check(self, "persistence_weight", self.persistence_weight == 0 or self.max_frames >= 3,
              f"needs clips of 3 frames or more (lam.train.clip_len), for consecutive transitions; got {self.max_frames}")
        check_number(self, "change_threshold")
        check(self, "change_threshold", self.change_threshold >= 0, "must be >= 0")
        check(self, "persistence", self.persistence in PERSISTENCES, f"must be one of {', '.join(PERSISTENCES)}")
        check(self, "readout", self.readout in READOUTS, f"must be one of {', '.join(READOUTS)}")
        check(self, "readout", self.readout == "codes" or all(level % 2 == 1 for level in self.levels),
              f"direction needs odd FSQ levels (a middle level for still); got {list(self.levels)}")


class LatentActionModel(nn.Module):
    """Frames [B, T, C, H, W] in [-1, 1] -> action ids [B, T-1] in [0, A)."""

    def __init__(self, config: LatentActionConfig):
        super().__init__()
        self.config = config
        c = config
        self.grid = c.frame_size // c.patch_size
        patch_dim = c.patch_size * c.patch_size * c.channels
        stacked = c.pair_encoding == "stacked"
        self.encoder_embed = nn.Linear(2 * patch_dim if stacked else patch_dim, c.embed_dim)
        self.encoder = SpaceTimeTransformer(
            c.embed_dim, c.num_heads, c.encoder_blocks, grid=self.grid, max_frames=c.max_frames,
            temporal=not stacked,
        )
        self.to_latent = nn.Linear(c.embed_dim, len(c.levels))
        self.fsq = FSQ(c.levels)
        self.decoder_embed = nn.Linear(patch_dim, c.embed_dim)
        # Only with masking: a parameter no loss reaches would stall DistributedDataParallel.
        self.mask_token = nn.Parameter(torch.randn(c.embed_dim) * 0.02) if c.mask_ratio > 0 else None
        self.decoder = SpaceTimeTransformer(
            c.embed_dim, c.num_heads, c.decoder_blocks, grid=self.grid, max_frames=c.max_frames,
            cond_dim=len(c.levels),
        )
        self.to_pixels = nn.Linear(c.embed_dim, patch_dim)
        if c.residual:
            nn.init.zeros_(self.to_pixels.weight)
            nn.init.zeros_(self.to_pixels.bias)

    @property
    def num_actions(self) -> int:
        """How many action ids `infer` gives (the readout's), not the FSQ codes it trains with."""
        return 3 if self.config.readout == "direction" else self.fsq.vocab_size

    def latents(self, frames: Tensor) -> Tensor:
        """Frames [B, T, C, H, W] -> raw latent of each transition [B, T-1, L], from its two frames alone."""
        if self.config.pair_encoding == "stacked":
            forward = self.encode_pairs(frames[:, :-1], frames[:, 1:])  # [B, T-1, L]
            return forward - self.encode_pairs(frames[:, 1:], frames[:, :-1]) if self.config.antisymmetric else forward
        b = frames.shape[0]
        pairs = torch.stack([frames[:, :-1], frames[:, 1:]], dim=2)  # [B, T-1, 2, C, H, W]
        pairs = rearrange(pairs, "b t two c h w -> (b t) two c h w")  # [B*(T-1), 2, C, H, W]
        x = self.encoder(self.encoder_embed(patchify(pairs, self.config.patch_size)))  # [B*(T-1), 2, P, E]
        pooled = reduce(x[:, 1], "n p e -> n e", "mean")  # [B*(T-1), E]: frame t+1, which has seen t
        return rearrange(self.to_latent(pooled), "(b t) l -> b t l", b=b)  # [B, T-1, L]

    def encode_pairs(self, before: Tensor, after: Tensor) -> Tensor:
        """Frames before and after each transition, each [B, N, C, H, W] -> its raw latent [B, N, L]
        from the two stacked in the channels."""
        pairs = torch.cat([before, after], dim=2)  # [B, N, 2C, H, W]
        # Without temporal attention each transition is encoded alone, at no time position.
        x = self.encoder(self.encoder_embed(patchify(pairs, self.config.patch_size)))  # [B, N, P, E]
        return self.to_latent(reduce(x, "b n p e -> b n e", "mean"))  # [B, N, L]

    def predict(self, frames: Tensor, codes: Tensor, *, mask_ratio: float = 0.0) -> Tensor:
        """Frames 0..T-1 [B, T, C, H, W] and the action codes of each next transition [B, T, L]
        -> predicted frames 1..T [B, T, C, H, W]. `mask_ratio` hides that fraction of the
        tokens of frames >= 1 behind the mask token (frame 0 stays whole as an anchor)."""
        x = self.decoder_embed(patchify(frames, self.config.patch_size))  # [B, T, P, E]
        if mask_ratio > 0:
            if self.mask_token is None:
                raise TinyWorldsError("predict: mask_ratio > 0 needs a model built with config.mask_ratio > 0")
            b, t, p, _ = x.shape
            hide = torch.rand(b, t, p, 1, device=x.device) < mask_ratio  # [B, T, P, 1]
            hide[:, 0] = False
            x = torch.where(hide, self.mask_token.to(x.dtype), x)  # [B, T, P, E]
        x = self.decoder(x, cond=codes)  # [B, T, P, E]
        out = unpatchify(self.to_pixels(x), self.config.patch_size, self.grid)  # [B, T, C, H, W]
        return frames + out if self.config.residual else out

    def predict_next(self, frames: Tensor, codes: Tensor, *, mask_ratio: float = 0.0) -> Tensor:
        """`predict` with the context `decoder_context` allows: frames 0..T-1 [B, T, C, H, W] and
        codes [B, T, L] -> predicted frames 1..T [B, T, C, H, W]; with "frame", frame t+1 from
        frame t and its code alone."""
        if self.config.decoder_context == "clip":
            return self.predict(frames, codes, mask_ratio=mask_ratio)
        alone = self.predict(rearrange(frames, "b t c h w -> (b t) 1 c h w"), rearrange(codes, "b t l -> (b t) 1 l"),
                             mask_ratio=mask_ratio)  # [B*T, 1, C, H, W]
        return rearrange(alone, "(b t) 1 c h w -> b t c h w", b=frames.shape[0])  # [B, T, C, H, W]

    @torch.no_grad()
    def infer(self, frames: Tensor, direction: Tensor | None = None) -> Tensor:
        """Frames [B, T, C, H, W] -> action ids LongTensor [B, T-1]. No gradient, no batch
        statistics; `direction` [L]: the video's slowest direction, for `readout: direction`."""
        return self.read_ids(self.latents(frames), direction)

    def read_ids(self, latent: Tensor, direction: Tensor | None = None) -> Tensor:
        """Raw latents [..., L] -> action ids LongTensor [...] by `config.readout`: the FSQ code's
        id, or (direction [L] given) STILL for the middle code, else POSITIVE / NEGATIVE by the
        sign of the latent along `direction`. A transition played backwards gets the opposite id."""
        ids = self.fsq.codes_to_ids(self.fsq(latent))  # [...]
        if self.config.readout == "codes":
            return ids
        if direction is None:
            raise TinyWorldsError("readout: direction needs the slowest direction fitted after training "
                                  "(lam/readout.json); rerun stage train_lam")
        still = self.fsq.codes_to_ids(torch.zeros_like(latent[..., :1]).expand_as(latent))  # [...]: the middle code
        along = latent.float() @ direction.to(latent.device).float()  # [...]
        moved = torch.where(along > 0, POSITIVE, NEGATIVE)
        return torch.where(ids == still, STILL, moved)

    def loss(self, frames: Tensor, videos: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Next-frame MSE + standardize_weight * the penalty that makes each video's raw latent
        standard + persistence_weight * the whitened latent's slowness over consecutive transitions.

        `videos` [B]: which video each clip comes from (the latents are whitened per video, see
        the module docstring); None: all clips are one video.
        Metrics (detached): recon_mse, standardize_penalty, latent_std (mean per-dim std of the
        raw latent within a video), latent_correlation (mean |correlation| between two
        dimensions of the raw latent within a video: 1 when they copy one feature),
        latent_slowness (`slowness`, with `persistence: slowest` the slowest direction's; 0 on clips
        of 2), action_perplexity, and action_usage [A]:
        the fraction of the batch's transitions given each action.
        """
        b, t = frames.shape[:2]
        if t < 2:
            raise TinyWorldsError(f"latent action loss needs clips of >= 2 frames, got {t}")
        z = rearrange(self.latents(frames), "b t l -> (b t) l").float()  # [B*(T-1), L]
        groups = torch.zeros(b, dtype=torch.long, device=frames.device) if videos is None else videos.long()
        white, mean, cov, factor = whiten_per_group(z, groups.repeat_interleave(t - 1))  # [B*(T-1), L], [G, L], [G, L, L] x2
        white_steps = rearrange(white, "(b t) l -> b t l", b=b)  # [B, T-1, L]
        codes = self.fsq(white_steps)  # [B, T-1, L]
        pred = self.predict_next(frames[:, :-1], codes, mask_ratio=self.config.mask_ratio)  # [B, T-1, C, H, W]
        error = (pred.float() - frames[:, 1:].float()) ** 2  # [B, T-1, C, H, W]
        weights = self.change_weights(frames.float())  # [B, T-1, 1, H, W]
        recon = (error * weights).mean()  # a plain mean, so each process's slice averages exactly
        penalty = standard_penalty(mean, factor)
        loss = recon + self.config.standardize_weight * penalty
        if t <= 2:
            slow = white.new_zeros(())
        elif self.config.persistence == "slowest":
            before = rearrange(white_steps[:, :-1], "b n l -> (b n) l")  # [B*(T-2), L]
            values, _ = slowness_along(before, rearrange(white_steps[:, 1:], "b n l -> (b n) l"))  # [L], ascending
            slow = values[0]
        else:
            slow = slowness(white_steps)
        if self.config.persistence_weight > 0:
            loss = loss + self.config.persistence_weight * slow
        usage = id_usage(self.fsq.codes_to_ids(codes.detach()), self.fsq.vocab_size)  # [A]: FSQ codes
        metrics = {
            "recon_mse": error.detach().mean(),
            "standardize_penalty": penalty.detach(),
            "latent_slowness": slow.detach(),
            "latent_std": torch.diagonal(cov.detach(), dim1=-2, dim2=-1).sqrt().mean(),
            "latent_correlation": mean_abs_correlation(cov.detach()),
            "action_perplexity": perplexity(usage),
            "action_usage": usage,
        }
        if self.config.change_weight != 1:
            metrics["change_mse"] = emphasised_mse(error, weights)
        return loss, metrics

    def change_weights(self, frames: Tensor) -> Tensor:
        """Loss weights of frames 1..T-1 [B, T-1, 1, H, W]: `change_weight` where a pixel differs
        from the frame before by more than `change_threshold` in any channel, else 1."""
        if self.config.change_weight == 1:
            return torch.ones_like(frames[:, 1:, :1])
        return emphasis_weights(frames[:, 1:] - frames[:, :-1], self.config.change_weight, self.config.change_threshold)


EPS = 1e-5  # variance floor of a whitened group
SLOWNESS_FLOOR = 1e-12  # of the spread in `slowness`: far below EPS, see there


def whiten_per_group(z: Tensor, groups: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Latents [B*(T-1), L] and group ids [B*(T-1)] -> (each row whitened over its group
    [B*(T-1), L], the groups' means [G, L], covariances [G, L, L] and their Cholesky factors
    [G, L, L]), G = the ids present, in ascending order. Whitening: centred rows times the inverse of the Cholesky factor of their
    group's covariance (+ EPS I), so each group comes out with zero mean and covariance ~I.
    Cholesky rather than the symmetric inverse square root: its gradient stays finite when
    eigenvalues coincide, which is exactly where training leads (covariance I). A group of one
    row whitens to 0."""
    ids, index = torch.unique(groups, return_inverse=True)  # [G], [B*(T-1)] in 0..G-1
    counts = torch.bincount(index, minlength=len(ids)).to(z.dtype)  # [G]
    mean = torch.zeros(len(ids), z.shape[1], device=z.device, dtype=z.dtype).index_add(0, index, z) / counts[:, None]  # [G, L]
    centred = z - mean[index]  # [B*(T-1), L]
    outer = rearrange(centred, "n l -> n l 1") * rearrange(centred, "n m -> n 1 m")  # [B*(T-1), L, L]
    cov = torch.zeros(len(ids), *outer.shape[1:], device=z.device, dtype=z.dtype).index_add(0, index, outer)
    cov = cov / rearrange(counts, "g -> g 1 1")  # [G, L, L]
    factor = cholesky(cov)  # [G, L, L], lower
    white = torch.linalg.solve_triangular(factor[index], rearrange(centred, "n l -> n l 1"), upper=False)  # [B*(T-1), L, 1]
    return rearrange(white, "n l 1 -> n l"), mean, cov, factor


def cholesky(cov: Tensor) -> Tensor:
    """Lower Cholesky factors [G, L, L] of covariances [G, L, L] + EPS I. A non-finite
    covariance (a diverging run) gives a non-finite factor, not an exception, so the training
    loop reports the non-finite loss as such."""
    factor, _ = torch.linalg.cholesky_ex(cov + EPS * torch.eye(cov.shape[-1], device=cov.device, dtype=cov.dtype))
    return factor


def standard_penalty(mean: Tensor, factor: Tensor) -> Tensor:
    """How far each group's raw latent is from standard (mean 0, covariance I), from its means
    [G, L] and the Cholesky factors of its covariances [G, L, L] (`whiten_per_group`):
    mean² + (log of the factor's diagonal)² + (its off-diagonal)², averaged; 0 exactly at
    standard. In one dimension it is mean² + (½ log var)²: scale-free, so a tiny and a huge
    spread cost alike."""
    diagonal = torch.diagonal(factor, dim1=-2, dim2=-1)  # [G, L]
    off_diagonal = torch.tril(factor, diagonal=-1)  # [G, L, L]
    return mean.square().mean() + torch.log(diagonal).square().mean() + off_diagonal.square().sum(dim=(-2, -1)).mean()


def slowness(latent: Tensor) -> Tensor:
    """How much latents [B, N, L] change between consecutive transitions, per dimension
    relative to its spread: mean over dimensions of E[(z[n+1] - z[n])^2] / (2 E[z^2]), 0 for a
    latent constant within each clip, 1 for one that forgets at every step. A ratio, so a
    latent cannot lower it by shrinking: whitening adds EPS to the variance, so a raw latent
    far below it comes out small, not standard (the penalty measured the change alone and a
    run collapsed to one id). The floor here is far smaller, so only an exactly constant
    latent (which the standardize penalty forbids) escapes."""
    change = (latent[:, 1:] - latent[:, :-1]).square().mean(dim=(0, 1))  # [L]
    spread = latent.square().mean(dim=(0, 1))  # [L]
    return (change / (2 * spread + SLOWNESS_FLOOR)).mean()


def slowness_along(before: Tensor, after: Tensor, *, directions: bool = False) -> tuple[Tensor, Tensor | None]:
    """How much the latent changes from one transition to the next along each of its slow
    feature directions, from the latents of pairs of consecutive transitions, before [n, L] and
    after [n, L]: (slowness [L], ascending, as `slowness` measures it: 0 held, 1 forgotten; the
    directions [L, L] as columns, in the latent's coordinates, if asked).

    Slow feature analysis: with M = E[z z^T] over both and D = E[(after - before)(after -
    before)^T], the directions are the generalised eigenvectors of D w = s M w (uncentred, as
    `slowness`: the latent is antisymmetric, so 0 is "still"). Differentiable in the values.
    Non-finite latents (a diverging run) give non-finite values, not an exception, so the
    training loop reports the non-finite loss as such (LAPACK's eigensolver refuses them)."""
    both = torch.cat([before, after])  # [2n, L]
    moment = both.T @ both / len(both)  # [L, L]
    step = after - before  # [n, L]
    change = step.T @ step / len(step)  # [L, L]
    finite = torch.isfinite(moment).all() & torch.isfinite(change).all()  # a tensor: no wait for the device
    identity = torch.eye(moment.shape[-1], device=moment.device, dtype=moment.dtype)
    moment, change = torch.where(finite, moment, identity), torch.where(finite, change, identity)
    inverse = torch.linalg.inv(cholesky(moment))  # [L, L]: M + EPS I = F F^T, inverse = F^-1
    whitened_change = inverse @ change @ inverse.T  # [L, L]
    if not directions:
        values, vectors = torch.linalg.eigvalsh(whitened_change), None
    else:
        values, vectors = torch.linalg.eigh(whitened_change)  # ascending
        vectors = inverse.T @ vectors
    return torch.where(finite, values / 2, torch.nan), vectors


def slowest_direction(before: Tensor, after: Tensor) -> tuple[Tensor, float]:
    """The unit direction [L] along which the raw latent changes least from one transition to
    the next (`slowness_along`), from pairs of consecutive transitions' latents before [n, L]
    and after [n, L], and its slowness. Its sign is fixed so that its largest component is
    positive: deterministic, with no meaning of its own."""
    if before.shape != after.shape or before.dim() != 2 or len(before) <= before.shape[1]:
        raise TinyWorldsError(f"slowest direction: needs more than {before.shape[-1]} pairs of consecutive "
                              f"transitions [n, L] twice; got {list(before.shape)} and {list(after.shape)}")
    values, vectors = slowness_along(before.double(), after.double(), directions=True)
    direction = vectors[:, 0] / vectors[:, 0].norm()  # [L]
    direction = direction * torch.sign(direction[direction.abs().argmax()])
    return direction.float(), float(values[0])


def mean_abs_correlation(cov: Tensor) -> Tensor:
    """Mean |correlation| between distinct latent dimensions over groups, from covariances
    [G, L, L]; 0 for one dimension."""
    size = cov.shape[-1]
    if size < 2:
        return cov.new_zeros(())
    std = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(EPS).sqrt()  # [G, L]
    corr = cov / (rearrange(std, "g l -> g l 1") * rearrange(std, "g m -> g 1 m"))  # [G, L, L]
    off = ~torch.eye(size, dtype=torch.bool, device=cov.device)  # [L, L]
    return corr[:, off].abs().mean()
