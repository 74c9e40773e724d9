"""Stage `evaluate`: how good is the trained world model, scored on what matters.

On every held-out clip of every dataset in `data.train_on` (clips of c real context frames
and k more, from the validation split every training stage held out):

    tokenizer  the objects: foreground PSNR, recall and precision of its reconstructions,
               with 95% intervals; pixel PSNR and SSIM; codebook usage
    lam        latent-id usage; agreement with the true actions (effect-identical ones merged),
               with the player's displacement sign where the recording knows the player's
               position, beside the ceiling a perfect displacement detector reaches on the same
               transitions; whether opposite directions get different ids
    dynamics   per horizon 1..k, foreground and pixel PSNR of the rollout (the LAM's ids), the
               same rollout with random ids drawn as often as the LAM uses them, copying the
               last real frame (the floor), copying its tokens, and the tokenizer's
               reconstruction of the truth (the ceiling); foreground ΔtPSNR with its interval.
               Rollouts are drawn as `play` draws them (`evaluate.carry_unchanged`): a patch
               whose token the model keeps keeps its pixels, so "nothing moves" scores the floor.
               Where each moves something against where the truth does: change precision and
               recall over patches (a patch moves where a pixel changes by more than the
               foreground threshold from the frame before; a false move and a missed one are
               what the PSNRs cannot tell apart)
    headline   the few figures the README's table and the project's goals read
    throughput generated frames/s at batch 1 and 8 on the device used

Why the foreground: over 99% of an Atari frame is static background, so whole-frame PSNR
rewards a tokenizer that erases the ball and a rollout that freezes the screen. The
foreground of a frame is where it differs from its game's background (the per-pixel median
of the store's frames) by more than `evaluate.foreground_threshold`; a score covers the
pixels that are foreground in the truth or the prediction, so a missing sprite and a ghost
both cost. PSNRs are pooled (the PSNR of the mean squared error over all clips), never
averaged, and intervals are percentile bootstraps over clips (tinyworlds.metrics.objects).

Everything goes to data/metrics/evaluate.json (nested by dataset; `dvc metrics show` flattens
it to `pong.headline.tokenizer_fg_recall`), data/metrics/evaluate_horizons.csv (the per-horizon
curves `dvc plots show` draws) and one MLflow run with pictures and rollout videos.

Shape letters as in the package docstring: B clips, T frames per clip (c + k), N frames of a
store, C channels, H/W pixels, P patches per frame, A latent actions.
"""

from __future__ import annotations

import csv
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange, repeat

from tinyworlds import metrics as M
from tinyworlds.core.atomic import atomic_output, write_json
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.core.params import Layout, dataset_names, section
from tinyworlds.data.clips import (
    TRAIN,
    VAL,
    SplitConfig,
    clip_starts,
    frame_labels,
    open_array,
)
from tinyworlds.data.roots import split_config
from tinyworlds.data.stores import file_sha256, open_frame_store
from tinyworlds.inference.world import GenerationSettings, WorldModel, carry_unchanged_patches, check_keep_bias
from tinyworlds.metrics import objects as O
from tinyworlds.models.fsq import id_usage, perplexity
from tinyworlds.tracking.flatten import flatten
from tinyworlds.tracking.run import open_stage_run

STAGE = "evaluate"
# The conditions every rollout horizon is scored under, in the order tables show them.
CONDITIONS = ("rollout", "random_ids", "copy_last_frame", "copy_tokens", "tokenizer_ceiling")
PSNR_CAP = 100.0  # dB reported for predictions without any error
USED_ID_SHARE = 0.01  # an id counts as used by the LAM above this share of held-out transitions
TRANSITION_BLOCK = 16  # transitions a bootstrap block keeps together: ~1 s at 15 fps, longer than the recorders hold an action


@dataclass
class EvaluateConfig:
    """params.yaml `evaluate:`; see the comments there."""

    max_clips: int | None = None  # None: every non-overlapping held-out clip
    context_frames: int | None = None  # None: the dynamics model's window minus one
    horizon: int = 8
    delta_psnr_horizon: int = 4
    foreground_threshold: int = 24
    cut_fraction: float | None = 0.5  # a step changing more of the pixels is a cut; None: keep every clip
    bootstrap_resamples: int = 1000
    steps: int = 8
    schedule: str = "cosine"
    temperature: float = 0.0
    carry_unchanged: bool = True  # rollouts keep the pixels of patches whose token they keep (inference/world.py)
    keep_bias: float | str = "auto"  # added to the logit of keeping a patch's token (inference/world.py)
    seed: int = 0
    batch_size: int = 64
    throughput_reps: int = 3
    video_clips: int = 2
    video_frames: int = 16
    video_scale: int = 3
    video_fps: float = 5.0

    def __post_init__(self) -> None:
        for name in ("horizon", "delta_psnr_horizon", "steps", "batch_size", "throughput_reps", "video_scale",
                     "video_frames", "bootstrap_resamples"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise TinyWorldsError(f"params.yaml: evaluate.{name}={value!r} must be a whole number >= 1")
        for name in ("max_clips", "context_frames"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise TinyWorldsError(f"params.yaml: evaluate.{name}={value!r} must be null or a whole number >= 1")
        if not (isinstance(self.foreground_threshold, int) and 0 <= self.foreground_threshold < 255):
            raise TinyWorldsError(f"params.yaml: evaluate.foreground_threshold={self.foreground_threshold!r} "
                                  "must be a whole number in 0..254")
        if self.cut_fraction is not None and (isinstance(self.cut_fraction, bool)
                                              or not isinstance(self.cut_fraction, (int, float))
                                              or not 0 < self.cut_fraction <= 1):
            raise TinyWorldsError(f"params.yaml: evaluate.cut_fraction={self.cut_fraction!r} must be null or in (0, 1]")
        if not isinstance(self.carry_unchanged, bool):
            raise TinyWorldsError(f"params.yaml: evaluate.carry_unchanged={self.carry_unchanged!r} must be true or false")
        check_keep_bias(self.keep_bias, "params.yaml: evaluate.keep_bias")
        if self.delta_psnr_horizon > self.horizon:
            raise TinyWorldsError(
                f"params.yaml: evaluate.delta_psnr_horizon={self.delta_psnr_horizon} is past horizon={self.horizon}"
            )
        if self.video_clips < 0 or not self.video_fps > 0:
            raise TinyWorldsError("params.yaml: evaluate.video_clips must be >= 0 and evaluate.video_fps > 0")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> EvaluateConfig:
        given = dict(params.get(STAGE) or {})
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise TinyWorldsError(f"params.yaml: unknown evaluate setting(s) {unknown}")
        return cls(**given)


@dataclass
class HeldOutClips:
    """Validation clips of one dataset, with what the recording knows about them."""

    frames: torch.Tensor  # uint8 [B, T, C, H, W]
    true_actions: np.ndarray | None  # [B, T-1]: the recorded action of each transition, or None
    action_meanings: list[str]
    background: np.ndarray  # uint8 [H, W, C]: the game's static background (per-pixel median)
    clips_with_cuts: int = 0  # clips left out because a step of theirs is a cut (O.clips_with_cuts)


def in_batches(fn, *tensors: torch.Tensor, batch_size: int) -> torch.Tensor:
    """fn applied to slices of `batch_size` along dim 0 of every tensor, results concatenated."""
    n = tensors[0].shape[0]
    return torch.cat([fn(*(t[i : i + batch_size] for t in tensors)) for i in range(0, n, batch_size)])


def channels_last(frames: torch.Tensor) -> np.ndarray:
    """uint8 [..., C, H, W] -> numpy [..., H, W, C], as the foreground scores take frames."""
    return rearrange(frames, "... c h w -> ... h w c").numpy()


# ---------------------------------------------------------------------------------------------
# data


def held_out_clips(path: Path, split: SplitConfig, *, clip_len: int, frame_skip: int,
                   max_clips: int | None, background: np.ndarray | None = None,
                   cut_fraction: float | None = None, threshold: int = 24) -> HeldOutClips:
    """Non-overlapping validation clips (all of them, or `max_clips` evenly spread); `background`:
    the store's, when the caller has it already (else it is computed from the store).

    With `cut_fraction`, clips with a cut (a step that changes more than that share of the
    pixels by more than `threshold`: a game reset, a scene change) are left out and counted.
    No model of play predicts a cut, and its frame, all foreground, would outweigh every
    sprite of the game in the pooled scores (one reset frame in Pong's 35 clips held 94% of
    the `large` tokenizer's foreground error)."""
    store = open_frame_store(path)
    span = (clip_len - 1) * frame_skip + 1
    starts = clip_starts(frame_labels(len(store), split), span, VAL, stride=span, segment=store.segment)
    if len(starts) == 0:
        raise TinyWorldsError(
            f"{path}: no validation clip of {clip_len} frames (context + evaluate.horizon); lower "
            f"evaluate.horizon or raise data.split.block_frames"
        )
    if max_clips is not None:
        starts = starts[np.unique(np.linspace(0, len(starts) - 1, min(max_clips, len(starts))).round().astype(int))]
    clips = np.stack([store.frames[s : s + span : frame_skip] for s in starts])  # [B, T, H, W, C]
    cut = np.zeros(len(starts), dtype=bool)
    if cut_fraction is not None:
        cut = O.clips_with_cuts(clips, threshold, cut_fraction)  # [B]
        if cut.all():
            raise TinyWorldsError(f"{path}: every validation clip of {clip_len} frames has a cut (a step changing "
                                  f"more than {cut_fraction:.0%} of the pixels); raise evaluate.cut_fraction")
        clips, starts = clips[~cut], starts[~cut]
    true = None
    if store.true_actions is not None:
        true = np.stack([store.true_actions[s : s + span : frame_skip][:-1] for s in starts]).astype(np.int64)  # [B, T-1]
    frames = torch.from_numpy(np.ascontiguousarray(rearrange(clips, "b t h w c -> b t c h w")))
    background = O.background_frame(store.frames) if background is None else background
    return HeldOutClips(frames, true, list(store.attrs.get("action_meanings") or []), background,
                        clips_with_cuts=int(cut.sum()))


@dataclass
class Transitions:
    """Every transition t -> t + skip of one split with a latent id: the id, and what the
    recording says about it (None where it does not know)."""

    latent: np.ndarray  # [n]
    true: np.ndarray | None  # [n] recorded action at t
    displacement: np.ndarray | None  # [n] sign of the player's move, O.UNKNOWN where unknown


def split_transitions(path_latent: Path, path_frames: Path, split: SplitConfig, frame_skip: int) -> dict[str, Transitions]:
    """Transitions by split, {TRAIN: ..., VAL: ...}; a transition belongs to a split when both its
    frames do. For frame_skip > 1 the true action is the one recorded at frame t."""
    latent = np.asarray(open_array(path_latent, "latent_actions")[:]).astype(np.int64)  # [N]
    store = open_frame_store(path_frames)
    if len(latent) != len(store):
        raise TinyWorldsError(
            f"{path_latent}: {len(latent)} entries but {path_frames} has {len(store)} frames; rerun `dvc repro`"
        )
    position = store.player_position  # [N] or None
    labels = frame_labels(len(latent), split)
    t = np.arange(max(len(latent) - frame_skip, 0))
    out = {}
    for which in (TRAIN, VAL):
        keep = t[(labels[t] == which) & (labels[t + frame_skip] == which) & (latent[t] >= 0)]
        true = None if store.true_actions is None else store.true_actions[keep].astype(np.int64)
        moved = None
        if position is not None and keep.size:
            moved = O.move_sign(position[keep + frame_skip] - position[keep])  # [n]
        out[which] = Transitions(latent[keep], true, moved)
    return out


# ---------------------------------------------------------------------------------------------
# metrics


def foreground_scores(prediction: torch.Tensor, truth: torch.Tensor, background: np.ndarray,
                      config: EvaluateConfig) -> dict[str, np.ndarray]:
    """`O.foreground_scores` of uint8 predictions against the truth [..., C, H, W] -> arrays [...]."""
    return O.foreground_scores(channels_last(prediction), channels_last(truth), background, config.foreground_threshold)


def foreground_summary(prediction: torch.Tensor, truth: torch.Tensor, background: np.ndarray,
                       config: EvaluateConfig, scores: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Foreground PSNR / recall / precision with 95% intervals, and pooled pixel PSNR, of
    predictions against the truth, uint8 [B, ..., C, H, W] with clips first. `scores`: their
    `foreground_scores` where the caller has them already."""
    if scores is None:
        scores = foreground_scores(prediction, truth, background, config)
    summary = O.summarize_foreground(scores, resamples=config.bootstrap_resamples, seed=config.seed)
    error = ((prediction.double() - truth.double()) ** 2).mean().item()
    summary["psnr"] = float(10 * np.log10(255.0**2 / error)) if error > 0 else float("inf")
    # No error at all is +inf dB; report it as PSNR_CAP so that JSON, MLflow and differences hold.
    return {key: min(value, PSNR_CAP) if "psnr" in key else value for key, value in summary.items()}


def tokenizer_metrics(world: WorldModel, held: HeldOutClips, config: EvaluateConfig):
    """The tokenizer's reconstructions of every held-out frame, scored on the objects first.

    Returns (metrics, tokens [B, T, P], reconstructions [B, T, C, H, W])."""
    clips = held.frames
    tokens = in_batches(world.encode, clips, batch_size=config.batch_size)  # [B, T, P]
    recon = in_batches(world.decode, tokens, batch_size=config.batch_size).cpu()  # [B, T, C, H, W]
    usage = id_usage(tokens, world.tokenizer.vocab_size)  # [V]
    tokens = tokens.cpu()
    return {
        **foreground_summary(recon, clips, held.background, config),
        "ssim": float(M.ssim(recon, clips).mean()),
        "codebook_used": float((usage > 0).float().mean()),
        "codebook_perplexity": float(perplexity(usage)),
        "still_token_changes": M.still_token_changes(clips, tokens, world.tokenizer.config.patch_size),
    }, tokens, recon


def lam_metrics(transitions: dict[str, Transitions], num_actions: int, action_meanings: list[str], *,
                resamples: int = 1000, seed: int = 0) -> tuple[dict[str, Any], torch.Tensor]:
    """How the LAM uses its ids on held-out transitions, and how well they name the controls.

    The NMIs with the move sign and over the ceiling come with `_low` / `_high`: a 95% block
    bootstrap over the transitions (`TRANSITION_BLOCK` in a row), since a game's few held-out
    stretches make them vary far more than their many transitions suggest.
    Returns (metrics, usage fractions [A])."""
    held = transitions[VAL]
    if held.latent.size == 0:
        raise TinyWorldsError("no held-out transition has a latent action; rerun stage train_lam")
    latent = torch.from_numpy(held.latent)
    fractions = M.label_fractions(latent, num_actions)  # [A]
    entropy = M.entropy(fractions)
    out: dict[str, Any] = {
        "held_out_transitions": int(held.latent.size),
        "usage": {str(i): float(f) for i, f in enumerate(fractions)},
        "used_ids": int((fractions > USED_ID_SHARE).sum()),
        "entropy_nats": entropy,
        "perplexity": float(np.exp(entropy)),
    }
    def merged(true: np.ndarray) -> tuple[np.ndarray, list[str]]:
        # Actions with one effect on the screen (Pong's FIRE variants) cannot be told apart from
        # video: score against their merged ids.
        return O.merge_equivalent_actions(true, action_meanings) if action_meanings else (true, [])

    if held.true is not None:
        out |= {"nmi_raw": M.normalized_mutual_information(latent, torch.from_numpy(held.true)),
                "chance_accuracy_raw": M.chance_accuracy(torch.from_numpy(held.true))}
        held_true, names = merged(held.true)
        merged_t = torch.from_numpy(held_true)
        out |= {"nmi": M.normalized_mutual_information(latent, merged_t), "chance_accuracy": M.chance_accuracy(merged_t),
                "merged_actions": names}
        train = transitions[TRAIN]
        if train.latent.size:  # the mapping is fit on training transitions, never on the scored ones
            mapping = M.majority_mapping(torch.from_numpy(train.latent), torch.from_numpy(merged(train.true)[0]),
                                         num_actions)
            out["mapping_accuracy"] = M.mapping_accuracy(mapping, latent, merged_t)
    if held.displacement is not None:
        known = held.displacement != O.UNKNOWN
        moved = held.displacement[known]
        ids_known = held.latent[known]
        out["displacement_transitions"] = int(known.sum())
        def nmi_displacement(rows: np.ndarray) -> float:
            return M.normalized_mutual_information(torch.from_numpy(ids_known[rows]), torch.from_numpy(moved[rows] + 1))
        out |= interval("nmi_displacement", nmi_displacement, moved.size, resamples, seed)
        separation = O.opposite_directions_separated(ids_known, moved)
        out["directions_separated"] = float(separation.separated)
        out["id_for_positive_move"] = -1 if separation.latent_for_positive is None else separation.latent_for_positive
        out["id_for_negative_move"] = -1 if separation.latent_for_negative is None else separation.latent_for_negative
        if held.true is not None:
            true_known = held_true[known]
            ceiling = O.perfect_detector_nmi(true_known, moved)
            out["nmi_ceiling"] = ceiling  # a perfect detector of the move's sign, on the same transitions
            def over_ceiling(rows: np.ndarray) -> float:
                # The ceiling is recomputed on each resample: it is a property of the same transitions.
                ceiling = O.perfect_detector_nmi(true_known[rows], moved[rows])
                nmi = M.normalized_mutual_information(torch.from_numpy(ids_known[rows]), torch.from_numpy(true_known[rows]))
                return nmi / ceiling if ceiling > 0 else float("nan")
            out |= interval("nmi_over_ceiling", over_ceiling, moved.size, resamples, seed)
    return out, fractions


def interval(name: str, statistic: Callable[[np.ndarray], float], num_items: int, resamples: int,
             seed: int) -> dict[str, float]:
    """{name, name_low, name_high}: `statistic` of the transitions and its 95% block bootstrap interval."""
    estimate, low, high = O.bootstrap_block_ci(num_items, statistic, block=TRANSITION_BLOCK, resamples=resamples, seed=seed)
    return {name: estimate, f"{name}_low": low, f"{name}_high": high}


def horizon_rows(name: str, condition: str, frames: torch.Tensor, future: torch.Tensor, background: np.ndarray,
                 config: EvaluateConfig, scores: dict[str, np.ndarray], moved: torch.Tensor,
                 true_moved: torch.Tensor) -> list[dict[str, Any]]:
    """One row per horizon h = 1..k: the condition's frames [B, k, C, H, W] scored against the
    real ones at h (from their `foreground_scores`, arrays [B, k]), and where they move (patches
    [B, k, P], `moved_patches`) against where the real ones move."""
    rows = []
    for h in range(frames.shape[1]):
        at_h = {key: values[:, h] for key, values in scores.items()}  # each [B]
        summary = foreground_summary(frames[:, h], future[:, h], background, config, at_h)
        changes = M.change_agreement(moved[:, h], true_moved[:, h])
        rows.append({"dataset": name, "condition": condition, "horizon": h + 1, **summary, **changes})
    return rows


def dynamics_metrics(world: WorldModel, name: str, held: HeldOutClips, tokens: torch.Tensor, recon: torch.Tensor,
                     usage: torch.Tensor, config: EvaluateConfig, context: int, settings: GenerationSettings):
    """Rollouts and their baselines on held-out clips, scored per horizon on the objects.

    tokens [B, T, P] and recon [B, T, C, H, W]: the clips through the tokenizer; usage [A]: how
    often the LAM uses each id on held-out transitions (random ids are drawn with it, so ids it
    never uses cannot inflate ΔtPSNR). Returns (metrics, per-horizon rows, frames for pictures).
    """
    clips, k, c, bs = held.frames, config.horizon, context, config.batch_size
    b = clips.shape[0]
    inferred = in_batches(lambda x: world.infer_actions(x, name), clips, batch_size=bs).cpu()  # [B, T-1]: LAM id of each transition
    future = clips[:, c:]  # [B, k, C, H, W]

    def roll(ctx, actions, ctx_actions):
        return world.rollout(ctx, actions, context_actions=ctx_actions, settings=settings).cpu()

    # Autoregressive in one batch, with the LAM's ids and with random ids drawn as it uses them.
    # After the first step the model's own frames are its context.
    generator = torch.Generator().manual_seed(config.seed)
    random_ids = torch.multinomial(usage.float(), b * k, replacement=True, generator=generator)
    random_ids = rearrange(random_ids, "(b k) -> b k", b=b)  # [B, k]
    rollouts = in_batches(roll, clips[:, :c].repeat(2, 1, 1, 1, 1), torch.cat([inferred[:, c - 1 :], random_ids]),
                          inferred[:, : c - 1].repeat(2, 1), batch_size=bs)  # [2B, k, C, H, W]
    # Teacher-forced: the next frame after each real window of c frames.
    windows = torch.stack([clips[:, j - c : j] for j in range(c, c + k)], dim=1)  # [B, k, c, C, H, W]
    window_ids = torch.stack([inferred[:, j - c : j] for j in range(c, c + k)], dim=1)  # [B, k, c]
    teacher_forced = in_batches(
        roll, rearrange(windows, "b k ... -> (b k) ..."), rearrange(window_ids[..., -1:], "b k 1 -> (b k) 1"),
        rearrange(window_ids[..., :-1], "b k a -> (b k) a"), batch_size=bs,
    )  # [B*k, 1, C, H, W]
    # The copy baseline in token space: the last context frame's tokens repeated and decoded like
    # a prediction; it already carries the tokenizer's loss, copying the real frame does not.
    copied_tokens = torch.cat([tokens[:, :c], M.copy_last_frame(tokens[:, :c], k)], dim=1)  # [B, T, P]
    # The true tokens, drawn as rollouts are: with carry_unchanged a patch whose true token stays
    # keeps the last real pixels, so the ceiling is what a dynamics model right about every token shows.
    ceiling = recon[:, c:]  # [B, k, C, H, W]
    if settings.carry_unchanged:
        ceiling = carry_unchanged_patches(ceiling, tokens[:, c:], clips[:, c - 1], tokens[:, c - 1],
                                          world.tokenizer.config.patch_size)
    frames = {
        "rollout": rollouts[:b],
        "random_ids": rollouts[b:],
        "copy_last_frame": M.copy_last_frame(clips[:, :c], k),
        "copy_tokens": in_batches(world.decode, copied_tokens, batch_size=bs)[:, c:].cpu(),
        "tokenizer_ceiling": ceiling,
    }
    # Where each condition moves something, frame after frame from the last real one: a model of
    # change moves what moves and keeps what stays, whatever it draws there.
    last_real, patch, tolerance = clips[:, c - 1], world.tokenizer.config.patch_size, config.foreground_threshold
    moved = {condition: M.moved_patches(frames[condition], M.frame_steps(frames[condition], last_real), patch, tolerance)
             for condition in CONDITIONS}  # each [B, k, P]
    true_moved = M.moved_patches(future, M.frame_steps(future, last_real), patch, tolerance)  # [B, k, P]
    # Each condition's object scores at every horizon, once: the rows, ΔtPSNR and the floor margins read them.
    scores = {condition: foreground_scores(frames[condition], future, held.background, config)
              for condition in CONDITIONS}  # each {name: [B, k]}
    rows = [row for condition in CONDITIONS
            for row in horizon_rows(name, condition, frames[condition], future, held.background, config,
                                    scores[condition], moved[condition], true_moved)]
    table = {condition: {f"h{r['horizon']}": r for r in rows if r["condition"] == condition} for condition in CONDITIONS}

    # Genie's ΔtPSNR on the objects at t: the LAM's ids against random ones, paired over clips.
    t = config.delta_psnr_horizon
    by_lam, by_random = scores["rollout"], scores["random_ids"]  # rollouts on the LAM's ids, on random ones
    delta, low, high = O.bootstrap_delta_psnr_ci(by_lam["fg_sq_error_sum"][:, t - 1], by_lam["fg_count"][:, t - 1],
                                                 by_random["fg_sq_error_sum"][:, t - 1], by_random["fg_count"][:, t - 1],
                                                 resamples=config.bootstrap_resamples, seed=config.seed)
    next_frame = foreground_summary(rearrange(teacher_forced, "(b k) 1 ... -> b k ...", b=b), future,
                                    held.background, config)
    # The floor goal: the rollout over copying the last real frame at every horizon, paired over clips.
    rollout, floor = scores["rollout"], scores["copy_last_frame"]
    margins = O.bootstrap_psnr_margins_ci(rollout["fg_sq_error_sum"], rollout["fg_count"],
                                          floor["fg_sq_error_sum"], floor["fg_count"],
                                          resamples=config.bootstrap_resamples, seed=config.seed,
                                          cap=PSNR_CAP)  # [k] per horizon, capped as the scores are
    out = {
        "next_frame": {key: next_frame[key] for key in ("fg_psnr", "fg_recall", "psnr")},
        **{condition: {metric: {h: table[condition][h][metric] for h in table[condition]}
                       for metric in ("fg_psnr", "fg_recall", "fg_precision", "psnr", "change_precision",
                                      "change_recall")}
           for condition in CONDITIONS},
        "rollout_changes": M.change_agreement(moved["rollout"], true_moved),  # over every horizon
        "rollout_fg_psnr_ci": {h: [table["rollout"][h]["fg_psnr_low"], table["rollout"][h]["fg_psnr_high"]]
                               for h in table["rollout"]},
        "rollout_minus_copy_fg_psnr_ci": {f"h{h + 1}": [float(margins.low[h]), float(margins.high[h])]
                                          for h in range(k)},
        "rollout_minus_copy_fg_psnr_min_low": margins.worst[1],
        "rollout_minus_copy_fg_psnr_min_high": margins.worst[2],
        "delta_fg_psnr": delta, "delta_fg_psnr_low": low, "delta_fg_psnr_high": high,
    }
    pictures = {"frames": frames, "inferred": inferred, "random_ids": random_ids}  # frames per condition
    return out, rows, pictures


def headline(tokenizer: dict[str, Any], lam: dict[str, Any], dynamics: dict[str, Any]) -> dict[str, float]:
    """The figures the README's table and the project's goals read, for `dvc metrics show`."""
    margins = [dynamics["rollout"]["fg_psnr"][h] - dynamics["copy_last_frame"]["fg_psnr"][h]
               for h in dynamics["rollout"]["fg_psnr"]]
    out = {
        "tokenizer_fg_recall": tokenizer["fg_recall"],
        "tokenizer_fg_psnr": tokenizer["fg_psnr"],
        # Not part of the goal, shown beside it: a tokenizer that invents objects keeps its
        # recall (what it invents covers the truth too); its precision falls.
        "tokenizer_fg_precision": tokenizer["fg_precision"],
        "rollout_minus_copy_fg_psnr_min": float(min(margins)),
        "rollout_minus_copy_fg_psnr_min_low": dynamics["rollout_minus_copy_fg_psnr_min_low"],  # its 95% interval
        "rollout_minus_copy_fg_psnr_min_high": dynamics["rollout_minus_copy_fg_psnr_min_high"],
        "delta_fg_psnr": dynamics["delta_fg_psnr"],
        "delta_fg_psnr_low": dynamics["delta_fg_psnr_low"],
        "rollout_change_precision": dynamics["rollout_changes"]["change_precision"],
        "rollout_change_recall": dynamics["rollout_changes"]["change_recall"],
        "lam_used_ids": lam["used_ids"],
    }
    for key in ("nmi", "nmi_displacement", "nmi_displacement_low", "nmi_displacement_high", "nmi_ceiling",
                "nmi_over_ceiling", "nmi_over_ceiling_low", "nmi_over_ceiling_high", "directions_separated"):
        if key in lam:
            out[f"lam_{key}"] = lam[key]
    return out


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return device.type


def generation_throughput(world: WorldModel, context: torch.Tensor, frames: int, batch: int, reps: int,
                          settings: GenerationSettings) -> float:
    """Generated frames/s of `world.rollout` (context encoding and LAM labelling, generation and
    decoding included): the median of `reps` timed runs after one warm-up."""
    ctx = repeat(context[:1], "1 t ... -> b t ...", b=batch).to(world.device)  # [B, c, C, H, W]
    actions = torch.zeros(batch, frames, dtype=torch.long)

    def once(actions: torch.Tensor) -> float:
        if world.device.type == "cuda":
            torch.cuda.synchronize(world.device)
        began = time.perf_counter()
        world.rollout(ctx, actions, settings=settings)
        if world.device.type == "cuda":
            torch.cuda.synchronize(world.device)
        return time.perf_counter() - began

    once(actions[:, :1])  # warm-up (CUDA context, kernels, allocator) on one frame
    return batch * frames / statistics.median(once(actions) for _ in range(reps))


def mean_over_datasets(per_dataset: dict[str, dict]) -> dict[str, Any]:
    """The mean of every numeric metric the datasets all have, as the same nesting."""
    flat = [flatten(m) for m in per_dataset.values()]
    common_keys = [k for k in flat[0] if all(k in f for f in flat[1:])
                   and all(isinstance(f[k], (int, float)) for f in flat)]
    out: dict[str, Any] = {}
    for key in common_keys:
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = float(np.mean([f[key] for f in flat]))
    return out


def write_horizon_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """The per-horizon curves for `dvc plots show`: one row per dataset, condition and horizon."""
    columns = ["dataset", "condition", "horizon", "fg_psnr", "fg_psnr_low", "fg_psnr_high", "fg_recall", "psnr",
               "change_precision", "change_recall"]
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------
# pictures


def action_labels(held: HeldOutClips, i: int, inferred: torch.Tensor, frames: int) -> list[str]:
    """Labels of the first `frames` real frames of clip i: the LAM's id of the transition into
    each, and the true action."""
    labels = ["real"]
    for j, latent in enumerate(inferred[i, : frames - 1].tolist()):
        text = f"real a={latent}"
        if held.true_actions is not None:
            true = int(held.true_actions[i, j])
            text += f" {held.action_meanings[true] if true < len(held.action_meanings) else true}"
        labels.append(text)
    return labels


def log_still(run, name: str, held: HeldOutClips, recon: torch.Tensor, pictures: dict[str, torch.Tensor],
              context: int, config: EvaluateConfig) -> None:
    """Per clip: real, reconstruction, rollout (one frame per column), for the first clips."""
    from tinyworlds.evaluation.media import annotate, tile

    rows = []
    for i in range(min(3, held.frames.shape[0])):
        real = held.frames[i]  # [T, C, H, W]
        rollout = torch.cat([real[:context], pictures["frames"]["rollout"][i]])  # [T, C, H, W]
        ids = pictures["inferred"][i, context - 1 :].tolist()
        rows += [annotate(real, action_labels(held, i, pictures["inferred"], len(real)), config.video_scale),
                 annotate(recon[i], ["reconstruction"] * len(real), config.video_scale),
                 annotate(rollout, ["context"] * context + [f"LAM a={a}" for a in ids], config.video_scale)]
    still = tile([[row[j : j + 1] for j in range(len(row))] for row in rows])
    run.log_image(still[0], f"{name}_real_reconstruction_prediction.png")


def log_videos(run, world: WorldModel, name: str, store_path: Path, background: np.ndarray, split: SplitConfig,
               context: int, frame_skip: int, config: EvaluateConfig, settings: GenerationSettings,
               scratch: Path) -> None:
    """`video_frames`-long rollouts beside the truth for the first `video_clips` held-out clips:
    real | LAM's ids | random ids drawn uniformly, each frame labelled."""
    from tinyworlds.evaluation.media import annotate, tile, write_gif, write_mp4

    try:
        held = held_out_clips(store_path, split, clip_len=context + config.video_frames, frame_skip=frame_skip,
                              max_clips=config.video_clips, background=background,
                              cut_fraction=config.cut_fraction, threshold=config.foreground_threshold)
    except TinyWorldsError:
        return  # held-out blocks shorter than a video: the still pictures say enough
    clips = held.frames  # [B, c + F, C, H, W]
    inferred = world.infer_actions(clips, name).cpu()  # [B, c + F - 1]
    generator = torch.Generator().manual_seed(config.seed)
    random_ids = torch.randint(0, world.num_actions, (clips.shape[0], config.video_frames), generator=generator)
    with_lam = world.rollout(clips[:, :context], inferred[:, context - 1 :], context_actions=inferred[:, : context - 1],
                             settings=settings).cpu()  # [B, F, C, H, W]
    with_random = world.rollout(clips[:, :context], random_ids, context_actions=inferred[:, : context - 1],
                                settings=settings).cpu()
    rows = []
    for i in range(clips.shape[0]):
        real = annotate(clips[i], action_labels(held, i, inferred, clips.shape[1]), config.video_scale)
        lam = annotate(torch.cat([clips[i, :context], with_lam[i]]),
                       ["context"] * context + [f"LAM a={a}" for a in inferred[i, context - 1 :].tolist()],
                       config.video_scale)
        rand = annotate(torch.cat([clips[i, :context], with_random[i]]),
                        ["context"] * context + [f"random a={a}" for a in random_ids[i].tolist()], config.video_scale)
        rows.append([real, lam, rand])
    video = tile(rows)
    for path in (write_mp4(video, scratch / f"{name}_rollout.mp4", fps=config.video_fps),
                 write_gif(video, scratch / f"{name}_rollout.gif", fps=config.video_fps)):
        run.log_artifact(path, "rollouts")


# ---------------------------------------------------------------------------------------------


def evaluate(params: dict[str, Any], root: Path = Path(".")) -> dict[str, Any]:
    """Evaluate data/models on the validation split of every `data.train_on` dataset.

    Writes data/metrics/evaluate.json and evaluate_horizons.csv and logs one MLflow run;
    returns the metrics (nested).
    """
    layout = Layout(root)
    names = dataset_names(params)
    config = EvaluateConfig.from_params(params)
    split = split_config(params)
    frame_skip = int(section(params, "data", "frame_skip"))
    world = WorldModel.load(layout.model("tokenizer").parent, device=str(params.get("train", {}).get("device", "auto")))
    context = config.context_frames or world.context_frames - 1
    settings = GenerationSettings(steps=config.steps, schedule=config.schedule, temperature=config.temperature,
                                  seed=config.seed, carry_unchanged=config.carry_unchanged,
                                  keep_bias=config.keep_bias)
    device_text = device_description(world.device)
    run_config = {
        "evaluate": {**asdict(config), "context_frames": context},
        "data": section(params, "data"),
        "device": str(world.device),
        "models": {kind: file_sha256(layout.model(kind) / "model.safetensors")
                   for kind in ("tokenizer", "lam", "dynamics")},
    }

    results: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    backgrounds: dict[str, np.ndarray] = {}  # each store's, computed once
    with open_stage_run(STAGE, params, names, run_config) as run, tempfile.TemporaryDirectory() as scratch:
        run.set_tags({"tinyworlds.device": device_text})
        for name in names:
            began = time.perf_counter()
            held = held_out_clips(layout.frames(name), split, clip_len=context + config.horizon,
                                  frame_skip=frame_skip, max_clips=config.max_clips,
                                  cut_fraction=config.cut_fraction, threshold=config.foreground_threshold)
            world.check_frames(held.frames, str(layout.frames(name)))
            tokenizer, tokens, recon = tokenizer_metrics(world, held, config)
            transitions = split_transitions(layout.latent_actions(name), layout.frames(name), split, frame_skip)
            lam, usage = lam_metrics(transitions, world.num_actions, held.action_meanings,
                                     resamples=config.bootstrap_resamples, seed=config.seed)
            dynamics, dataset_rows, pictures = dynamics_metrics(world, name, held, tokens, recon, usage, config,
                                                                context, settings)
            rows += dataset_rows
            backgrounds[name] = held.background
            results[name] = {"headline": headline(tokenizer, lam, dynamics), "clips": held.frames.shape[0],
                             "clips_with_cuts": held.clips_with_cuts,
                             "tokenizer": tokenizer, "lam": lam, "dynamics": dynamics}
            for row in dataset_rows:
                run.log_metrics({f"{name}.{row['condition']}.fg_psnr_by_horizon": row["fg_psnr"]}, step=row["horizon"])
            log_still(run, name, held, recon, pictures, context, config)
            if config.video_clips:
                log_videos(run, world, name, layout.frames(name), held.background, split, context, frame_skip,
                           config, settings, Path(scratch))
            seconds = time.perf_counter() - began
            print(f"evaluate: {name}: {held.frames.shape[0]} clips in {seconds:.1f}s", file=sys.stderr)

        # Throughput from a real context: the first held-out frames of the first dataset.
        real_context = held_out_clips(layout.frames(names[0]), split, clip_len=context, frame_skip=frame_skip,
                                      max_clips=1, background=backgrounds[names[0]]).frames  # [1, c, C, H, W]
        if len(names) > 1:
            results["mean"] = mean_over_datasets({n: results[n] for n in names})
        results["throughput"] = {
            f"batch_{b}_frames_per_s": generation_throughput(world, real_context, config.horizon, b,
                                                             config.throughput_reps, settings)
            for b in (1, 8)
        } | {"device": device_text}

        write_json(results, layout.metrics(STAGE))
        write_horizon_csv(rows, layout.metrics_table(STAGE, "horizons"))
        run.log_final({k: float(v) for k, v in flatten(results).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)})
        run.log_artifact(layout.metrics(STAGE))
    return results
