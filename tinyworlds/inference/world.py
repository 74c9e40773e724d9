"""A trained world model: tokenizer + latent action model + dynamics, used together.

Everything downstream of training (evaluation, `tinyworlds dream`, `tinyworlds play`) goes
through `WorldModel`: frames in and frames out as uint8 [B, T, C, H, W], tokens and action
ids in between.

Rendering: a generated frame is drawn from its tokens by the tokenizer's decoder, except that a
patch whose token the dynamics model kept from the frame before keeps that frame's pixels
(`GenerationSettings.carry_unchanged`; the first new frame carries from the real last
context frame). The decoder redraws even an unchanged patch at its own loss: on Space
Invaders' held-out clips the last real frame's tokens, decoded, score 21.4 dB on the objects
at horizon 1 where the real frame itself scores 25.0 (0.3.6's default), so a rollout that
predicted "nothing changes" perfectly still lost to copying the frame. Carried, the kept
patches are exact and only the patches the model changes are redrawn, as a video codec
skips unchanged blocks. What the tokenizer does not see, the carry cannot move: a sprite
missing from the tokens (the default tokenizer's Breakout ball) leaves its patch with the
background's token, so it stays where the real frame had it; redrawn, it would vanish.

Sampling: the dynamics model is trained with changing tokens weighted `change_weight` times,
which tilts it towards predicting change by that factor; `GenerationSettings.keep_bias`
("auto": log(change_weight)) adds the factor back to each patch's "keep" logit, so a patch
changes where a change is likely rather than merely possible.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange, repeat

from tinyworlds.core.device import pick_device
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.inference.latent_actions import NAMES_FILE, READOUT_FILE, action_labels, readout_direction
from tinyworlds.models.blocks import over_time_windows
from tinyworlds.models.checkpoint import load_model
from tinyworlds.models.dynamics import DynamicsModel
from tinyworlds.models.lam import LatentActionModel
from tinyworlds.models.pixels import to_model, to_uint8
from tinyworlds.models.tokenizer import VideoTokenizer


@dataclass
class GenerationSettings:
    steps: int = 8  # MaskGIT unmasking steps per frame
    schedule: str = "cosine"  # cosine | exponential | linear
    temperature: float = 1.0  # 0 = greedy
    seed: int | None = 0  # None only before `dream` draws a fresh one
    carry_unchanged: bool = True  # a patch whose token is kept keeps its pixels (module docstring)
    # Added to the logit of keeping each patch's token (DynamicsModel.generate). "auto": log of
    # the dynamics training's change_weight, which undoes the tilt towards change that the
    # weighting gave the model; 0: sample the model as trained.
    keep_bias: float | str = "auto"


class WorldModel:
    """The three trained models of one pipeline run, on one device."""

    def __init__(self, tokenizer: VideoTokenizer, lam: LatentActionModel, dynamics: DynamicsModel, device: torch.device):
        self.tokenizer, self.lam, self.dynamics, self.device = tokenizer, lam, dynamics, device
        self.action_names: dict | None = None  # lam/action_names.json: what each id most often is
        self.readout: dict | None = None  # lam/readout.json: each video's direction (`readout: direction`)
        t, d = tokenizer.config, dynamics.config
        if (tokenizer.vocab_size, tokenizer.num_patches) != (d.vocab_size, d.num_patches):
            raise TinyWorldsError(
                f"dynamics model expects {d.vocab_size} tokens x {d.num_patches} patches, tokenizer makes "
                f"{tokenizer.vocab_size} x {tokenizer.num_patches}: they are not from the same pipeline run"
            )
        if lam.num_actions != d.num_actions:
            raise TinyWorldsError(
                f"dynamics model expects {d.num_actions} actions, the latent action model has {lam.num_actions}"
            )
        if (lam.config.frame_size, lam.config.channels) != (t.frame_size, t.channels):
            raise TinyWorldsError("latent action model and tokenizer were trained on different frame sizes")

    @classmethod
    def load(cls, models_dir: str | Path = "data/models", device: str = "auto") -> WorldModel:
        """Load data/models/{tokenizer,lam,dynamics}; one-line errors for anything missing."""
        models_dir = Path(models_dir)
        if not models_dir.is_dir():
            raise TinyWorldsError(f"{models_dir}: no such model directory (run `dvc repro` first)")
        target = pick_device(device)
        loaded = {}
        for kind, expected in (("tokenizer", VideoTokenizer), ("lam", LatentActionModel), ("dynamics", DynamicsModel)):
            model = load_model(models_dir / kind, device=target)
            if not isinstance(model, expected):
                raise TinyWorldsError(f"{models_dir / kind}: holds a {type(model).__name__}, expected a {expected.__name__}")
            loaded[kind] = model.eval()
        world = cls(loaded["tokenizer"], loaded["lam"], loaded["dynamics"], target)
        names = models_dir / "lam" / NAMES_FILE
        if names.is_file():
            world.action_names = json.loads(names.read_text())
        if world.lam.config.readout == "direction":
            readout = models_dir / "lam" / READOUT_FILE
            if not readout.is_file():
                raise TinyWorldsError(f"{readout}: missing (the LAM reads its ids along each video's direction); "
                                      "rerun stage train_lam")
            world.readout = json.loads(readout.read_text())
        return world

    # -- facts ---------------------------------------------------------------------------------
    @property
    def num_actions(self) -> int:
        return self.lam.num_actions

    def action_labels(self) -> list[str]:
        """Per latent id, the true actions it most often matches ("UP (pong)"), "unused", or ""."""
        return action_labels(self.action_names, self.num_actions)

    @property
    def frame_size(self) -> int:
        return self.tokenizer.config.frame_size

    @property
    def channels(self) -> int:
        return self.tokenizer.config.channels

    @property
    def context_frames(self) -> int:
        """How many frames the dynamics model attends to (older ones slide out of its window)."""
        return self.dynamics.config.max_frames

    # -- conversions ---------------------------------------------------------------------------
    def check_frames(self, frames: torch.Tensor, what: str = "frames") -> None:
        expected = (self.channels, self.frame_size, self.frame_size)
        if frames.dim() != 5 or tuple(frames.shape[2:]) != expected or frames.dtype != torch.uint8:
            raise TinyWorldsError(
                f"{what}: expected uint8 [B, T, {expected[0]}, {expected[1]}, {expected[2]}], "
                f"got {frames.dtype} {list(frames.shape)}"
            )

    @torch.inference_mode()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames [B, T, C, H, W] -> tokens [B, T, P] (each frame on its own)."""
        self.check_frames(frames)
        b = frames.shape[0]
        single = rearrange(frames.to(self.device), "b t c h w -> (b t) 1 c h w")  # [B*T, 1, C, H, W]
        tokens = self.tokenizer.encode(to_model(single))  # [B*T, 1, P]
        return rearrange(tokens, "(b t) 1 p -> b t p", b=b)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [B, T, P] -> uint8 frames [B, T, C, H, W] (any T: the tokenizer slides its window)."""
        return to_uint8(self.tokenizer.decode(tokens.to(self.device)))

    @torch.inference_mode()
    def infer_actions(self, frames: torch.Tensor, dataset: str | None = None) -> torch.Tensor:
        """uint8 frames [B, T, C, H, W] -> latent action ids [B, T-1] of each transition.
        `dataset`: the video they come from, whose direction the ids are read along (another
        video's or None: the direction pooled over the training videos)."""
        self.check_frames(frames)
        direction = readout_direction(self.readout, dataset)
        along = None if direction is None else torch.tensor(direction, device=self.device)
        # Longer than the LAM's window: each transition labelled in the window that ends at it.
        return over_time_windows(lambda clips: self.lam.infer(clips, along), to_model(frames.to(self.device)),
                                 self.lam.config.max_frames)  # [B, T-1]

    # -- generation ----------------------------------------------------------------------------
    def keep_bias(self, settings: GenerationSettings) -> float:
        """settings.keep_bias as a number for this model ("auto": its calibrated value)."""
        return resolve_keep_bias(settings.keep_bias, self.dynamics)

    def check_actions(self, actions: torch.Tensor, what: str = "actions") -> None:
        if actions.numel() and (int(actions.min()) < 0 or int(actions.max()) >= self.num_actions):
            raise TinyWorldsError(f"{what}: action ids must be in 0..{self.num_actions - 1}, got {actions.tolist()}")

    @torch.inference_mode()
    def rollout(
        self,
        context: torch.Tensor,
        actions: torch.Tensor,
        *,
        context_actions: torch.Tensor | None = None,
        settings: GenerationSettings = GenerationSettings(),
        dataset: str | None = None,
    ) -> torch.Tensor:
        """Dream F frames after a context clip.

        context: uint8 [B, T, C, H, W]; actions [B, F]: the latent action into each new frame;
        context_actions [B, T-1] or None (inferred from the context with the LAM when T > 1,
        read for `dataset`, see `infer_actions`).
        Returns uint8 [B, F, C, H, W].
        """
        self.check_frames(context, "context")
        actions = actions.to(self.device).long()
        self.check_actions(actions)
        if context_actions is None and context.shape[1] > 1:
            context_actions = self.infer_actions(context, dataset)
        context_tokens = self.encode(context)  # [B, T, P]
        new_tokens = self.dynamics.generate(
            context_tokens, actions,
            context_actions=None if context_actions is None else context_actions.to(self.device).long(),
            steps=settings.steps, schedule=settings.schedule, temperature=settings.temperature, seed=settings.seed,
            keep_bias=self.keep_bias(settings),
        )  # [B, N, P]
        frames = self.decode(torch.cat([context_tokens, new_tokens], dim=1))[:, context.shape[1]:]  # [B, N, C, H, W]
        if not settings.carry_unchanged:
            return frames
        return carry_unchanged_patches(frames, new_tokens, context[:, -1].to(self.device), context_tokens[:, -1],
                                       self.tokenizer.config.patch_size)


def check_keep_bias(value: float | str, what: str = "keep_bias") -> None:
    """One-line error unless `value` is "auto" or a finite number."""
    if value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TinyWorldsError(f"{what}={value!r}: must be auto or a number")


def resolve_keep_bias(value: float | str, dynamics: DynamicsModel) -> float:
    check_keep_bias(value)
    return dynamics.calibrated_keep_bias() if value == "auto" else float(value)


def carry_unchanged_patches(decoded: torch.Tensor, tokens: torch.Tensor, shown: torch.Tensor, shown_tokens: torch.Tensor,
                            patch_size: int) -> torch.Tensor:
    """New frames as decoded, uint8 [B, N, C, H, W], their tokens [B, N, P], and the frame on
    screen before them [B, C, H, W] with its tokens [B, P] -> the frames to show [B, N, C, H, W]:
    frame by frame, each patch whose token equals the frame before's keeps that frame's shown pixels."""
    grid = decoded.shape[-1] // patch_size
    frames = []
    for n in range(tokens.shape[1]):
        kept = repeat(tokens[:, n] == shown_tokens, "b (hp wp) -> b 1 (hp s1) (wp s2)",
                      hp=grid, s1=patch_size, s2=patch_size)  # [B, 1, H, W]
        shown, shown_tokens = torch.where(kept, shown, decoded[:, n]), tokens[:, n]  # [B, C, H, W], [B, P]
        frames.append(shown)
    return torch.stack(frames, dim=1)  # [B, N, C, H, W]
