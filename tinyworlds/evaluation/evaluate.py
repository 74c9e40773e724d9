"""Stage `evaluate`: how good is the trained world model, on the held-out frames.

For each dataset in `data.train_on`, on clips of context + horizon frames from the
validation split (the same time blocks every training stage held out):

    tokenizer   reconstruction PSNR / SSIM, codebook usage and perplexity
    actions     latent action usage and entropy over every held-out transition; with
                ground-truth actions: NMI, best many-to-one mapping accuracy, chance level
    dynamics    teacher-forced next-frame PSNR, rollout PSNR per horizon beside the
                copy-last-frame baseline and the tokenizer ceiling, Genie's ΔtPSNR
    throughput  generated frames/s at batch 1 and 8 on the device used

Metric definitions are in the README's "Metrics" section. Everything goes to
data/metrics/evaluate.json (nested by dataset; `dvc metrics diff` flattens it to
`pong.dynamics.rollout_psnr.h4`) and to one MLflow run with a PNG grid and rollout videos.

Dimension keys (the package's key): B clips, T frames per clip (context c + horizon k), C channels, H/W pixels,
P patches per frame, A latent actions.
"""

from __future__ import annotations

import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange, repeat

from tinyworlds import metrics as M
from tinyworlds.core.atomic import write_json
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
from tinyworlds.inference.world import GenerationSettings, WorldModel
from tinyworlds.models.fsq import id_usage, perplexity
from tinyworlds.tracking.flatten import flatten
from tinyworlds.tracking.run import open_stage_run

STAGE = "evaluate"


@dataclass
class EvaluateConfig:
    """params.yaml `evaluate:`; see the comments there."""

    max_clips: int = 6
    context_frames: int | None = None  # None: the dynamics model's window minus one
    horizon: int = 4
    delta_psnr_horizon: int = 4
    steps: int = 8
    schedule: str = "cosine"
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 64
    throughput_reps: int = 3
    video_clips: int = 2
    video_scale: int = 3
    video_fps: float = 5.0

    def __post_init__(self) -> None:
        for name in ("max_clips", "horizon", "delta_psnr_horizon", "steps", "batch_size", "throughput_reps",
                     "video_scale"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise TinyWorldsError(f"params.yaml: evaluate.{name}={value!r} must be a whole number >= 1")
        if self.context_frames is not None and not (isinstance(self.context_frames, int) and self.context_frames >= 1):
            raise TinyWorldsError(f"params.yaml: evaluate.context_frames={self.context_frames!r} must be null or >= 1")
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
    """Validation clips of one dataset, with their ground-truth actions where recorded."""

    frames: torch.Tensor  # uint8 [B, T, C, H, W]
    true_actions: np.ndarray | None  # [B, T-1]: the recorded action of each transition, or None
    action_meanings: list[str]


def in_batches(fn, *tensors: torch.Tensor, batch_size: int) -> torch.Tensor:
    """fn applied to slices of `batch_size` along dim 0 of every tensor, results concatenated."""
    n = tensors[0].shape[0]
    return torch.cat([fn(*(t[i : i + batch_size] for t in tensors)) for i in range(0, n, batch_size)])


# ---------------------------------------------------------------------------------------------
# data


def held_out_clips(path: Path, split: SplitConfig, *, clip_len: int, frame_skip: int, max_clips: int) -> HeldOutClips:
    """Up to `max_clips` non-overlapping validation clips, evenly spread over the split."""
    store = open_frame_store(path)
    span = (clip_len - 1) * frame_skip + 1
    starts = clip_starts(frame_labels(len(store), split), span, VAL, stride=span)
    if len(starts) == 0:
        raise TinyWorldsError(
            f"{path}: no validation clip of {clip_len} frames (context + evaluate.horizon); lower "
            f"evaluate.horizon or raise data.split.block_frames"
        )
    starts = starts[np.unique(np.linspace(0, len(starts) - 1, min(max_clips, len(starts))).round().astype(int))]
    clips = np.stack([store.frames[s : s + span : frame_skip] for s in starts])  # [B, T, H, W, C]
    true = None
    if store.true_actions is not None:
        true = np.stack([store.true_actions[s : s + span : frame_skip][:-1] for s in starts]).astype(np.int64)  # [B, T-1]
    frames = torch.from_numpy(np.ascontiguousarray(rearrange(clips, "n t h w c -> n t c h w")))
    return HeldOutClips(frames, true, list(store.attrs.get("action_meanings") or []))


def split_transitions(path_latent: Path, path_frames: Path, split: SplitConfig, frame_skip: int):
    """Latent and true action of every transition t -> t + skip, by split: {TRAIN: (latent, true), VAL: ...}.

    A transition belongs to a split when both its frames do. `true` is None without
    ground-truth actions; for frame_skip > 1 it is the action recorded at frame t.
    """
    latent = np.asarray(open_array(path_latent, "latent_actions")[:]).astype(np.int64)  # [N]
    store = open_frame_store(path_frames)
    if len(latent) != len(store):
        raise TinyWorldsError(
            f"{path_latent}: {len(latent)} entries but {path_frames} has {len(store)} frames; rerun `dvc repro`"
        )
    labels = frame_labels(len(latent), split)
    t = np.arange(max(len(latent) - frame_skip, 0))
    out = {}
    for which in (TRAIN, VAL):
        keep = t[(labels[t] == which) & (labels[t + frame_skip] == which) & (latent[t] >= 0)]
        true = None if store.true_actions is None else torch.from_numpy(store.true_actions[keep].astype(np.int64))
        out[which] = (torch.from_numpy(latent[keep]), true)
    return out


# ---------------------------------------------------------------------------------------------
# metrics


def per_horizon(scores: torch.Tensor) -> dict[str, float]:
    """PSNRs [B, k] -> {"h1": mean over clips at horizon 1, ...}."""
    return {f"h{h + 1}": M.finite_mean(scores[:, h]) for h in range(scores.shape[1])}


def tokenizer_metrics(world: WorldModel, clips: torch.Tensor, batch_size: int):
    """Reconstruction PSNR / SSIM and codebook usage on clips [B, T, C, H, W].

    Returns (metrics, tokens [B, T, P], reconstructions [B, T, C, H, W])."""
    tokens = in_batches(world.encode, clips, batch_size=batch_size)  # [B, T, P]
    recon = in_batches(world.decode, tokens, batch_size=batch_size).cpu()  # [B, T, C, H, W]
    usage = id_usage(tokens, world.tokenizer.vocab_size)  # [V]
    return {
        "psnr": M.finite_mean(M.psnr(recon, clips, dims=(2, 3, 4))),
        "ssim": float(M.ssim(recon, clips).mean()),
        "codebook_used": float((usage > 0).float().mean()),
        "codebook_perplexity": float(perplexity(usage)),
    }, tokens.cpu(), recon


def action_metrics(transitions, num_actions: int) -> tuple[dict[str, Any], torch.Tensor]:
    """Usage and entropy of the latent actions on held-out transitions; agreement with the true ones.

    Returns (metrics, usage fractions [A])."""
    val_latent, val_true = transitions[VAL]
    if val_latent.numel() == 0:
        raise TinyWorldsError("no held-out transition has a latent action; rerun stage train_lam")
    fractions = M.label_fractions(val_latent, num_actions)  # [A]
    entropy = M.entropy(fractions)
    out: dict[str, Any] = {
        "held_out_transitions": val_latent.numel(),
        "usage": {str(i): float(f) for i, f in enumerate(fractions)},
        "entropy_nats": entropy,
        "perplexity": float(np.exp(entropy)),
    }
    if val_true is not None:
        out |= {"nmi": M.normalized_mutual_information(val_latent, val_true),
                "chance_accuracy": M.chance_accuracy(val_true)}
        train_latent, train_true = transitions[TRAIN]
        if train_latent.numel():  # the mapping is fit on training transitions, never on the scored ones
            mapping = M.majority_mapping(train_latent, train_true, num_actions)
            out["mapping_accuracy"] = M.mapping_accuracy(mapping, val_latent, val_true)
    return out, fractions


def dynamics_metrics(world: WorldModel, clips: torch.Tensor, tokens: torch.Tensor, recon: torch.Tensor,
                     action_usage: torch.Tensor, config: EvaluateConfig, context: int,
                     settings: GenerationSettings) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Teacher-forced and autoregressive PSNR, baselines and ΔtPSNR on clips [B, c + k, C, H, W].

    tokens [B, T, P] and recon [B, T, C, H, W]: the clips through the tokenizer; action_usage
    [A]: how often the LAM uses each action on held-out transitions (for `delta_psnr_usage`).
    """
    k, c, bs = config.horizon, context, config.batch_size
    n = clips.shape[0]
    inferred = in_batches(world.infer_actions, clips, batch_size=bs).cpu()  # [B, T-1]: LAM id of each transition
    future = clips[:, c:]  # [B, k, C, H, W]

    def roll(ctx, actions, ctx_actions):
        return world.rollout(ctx, actions, context_actions=ctx_actions, settings=settings).cpu()

    # Autoregressive, in one batch: with the LAM's actions, with uniformly random ones (Genie's
    # ΔtPSNR) and with random ones drawn as often as the LAM uses them. After the first step
    # the model's own frames are its context.
    generator = torch.Generator().manual_seed(config.seed)
    random_actions = torch.randint(0, world.num_actions, (n, k), generator=generator)  # [B, k]
    usage_actions = torch.multinomial(action_usage.float(), n * k, replacement=True, generator=generator)
    usage_actions = rearrange(usage_actions, "(n k) -> n k", n=n)  # [B, k]
    rollouts = in_batches(
        roll, clips[:, :c].repeat(3, 1, 1, 1, 1), torch.cat([inferred[:, c - 1 :], random_actions, usage_actions]),
        inferred[:, : c - 1].repeat(3, 1), batch_size=bs,
    )  # [3N, k, C, H, W]
    predicted, randomized, usage_randomized = rollouts[:n], rollouts[n : 2 * n], rollouts[2 * n :]
    # Teacher-forced: every target frame j from the real frames j-c..j-1, one frame at a time.
    windows = torch.stack([clips[:, j - c : j] for j in range(c, c + k)], dim=1)  # [B, k, c, C, H, W]
    window_actions = torch.stack([inferred[:, j - c : j] for j in range(c, c + k)], dim=1)  # [B, k, c]
    next_frames = in_batches(
        roll, rearrange(windows, "n k ... -> (n k) ..."), rearrange(window_actions[..., -1:], "n k 1 -> (n k) 1"),
        rearrange(window_actions[..., :-1], "n k a -> (n k) a"), batch_size=bs,
    )  # [B*k, 1, C, H, W]
    next_frames = rearrange(next_frames, "(n k) 1 ... -> n k ...", n=n)

    def scores(frames):  # [B, k] per-frame PSNR against the real future
        return M.psnr(frames, future, dims=(2, 3, 4))

    # The copy baseline in token space: the last context frame's tokens repeated, decoded like
    # a prediction. The dynamics model can only beat this by predicting change.
    copied_tokens = torch.cat([tokens[:, :c], M.copy_last_frame(tokens[:, :c], k)], dim=1)  # [B, T, P]
    copied = in_batches(world.decode, copied_tokens, batch_size=bs)[:, c:].cpu()  # [B, k, C, H, W]

    t = config.delta_psnr_horizon
    rollout, randomized_scores = scores(predicted), scores(randomized)
    at_t = M.finite_mean(rollout[:, t - 1])
    out = {
        "next_frame_psnr": M.finite_mean(scores(next_frames)),
        "next_frame_ssim": float(M.ssim(next_frames, future).mean()),
        "reconstruction_ceiling_psnr": M.finite_mean(scores(recon[:, c:])),
        "rollout_psnr": per_horizon(rollout),
        "copy_last_psnr": per_horizon(scores(M.copy_last_frame(clips[:, :c], k))),
        "copy_last_tokens_psnr": per_horizon(scores(copied)),
        "random_actions_psnr": per_horizon(randomized_scores),
        "delta_psnr": at_t - M.finite_mean(randomized_scores[:, t - 1]),
        "delta_psnr_usage": at_t - M.finite_mean(scores(usage_randomized)[:, t - 1]),
    }
    return out, {"predicted": predicted, "randomized": randomized, "teacher_forced": next_frames,
                 "inferred": inferred, "random_actions": random_actions, "usage_actions": usage_actions}


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
    ctx = repeat(context[:1], "1 t ... -> b t ...", b=batch).to(world.device)  # [b, c, C, H, W]
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
    """The mean of every metric the datasets all have, as the same nesting."""
    flat = [flatten(m) for m in per_dataset.values()]
    common_keys = [k for k in flat[0] if all(k in f for f in flat[1:])]
    out: dict[str, Any] = {}
    for key in common_keys:
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = float(np.mean([f[key] for f in flat]))
    return out


# ---------------------------------------------------------------------------------------------
# pictures


def action_labels(held: HeldOutClips, i: int, inferred: torch.Tensor) -> list[str]:
    """Labels of the real frames of clip i: the LAM's id of the transition into each, and the true action."""
    labels = ["real"]
    for j, latent in enumerate(inferred[i].tolist()):
        text = f"real a={latent}"
        if held.true_actions is not None:
            true = int(held.true_actions[i, j])
            text += f" true={held.action_meanings[true] if true < len(held.action_meanings) else true}"
        labels.append(text)
    return labels


def labelled_panels(held: HeldOutClips, i: int, recon: torch.Tensor, out: dict[str, torch.Tensor], context: int,
                    scale: int) -> dict[str, np.ndarray]:
    """Clip i as labelled, upscaled clips [T, H', W', 3]: real, reconstruction, and the rollouts
    with the LAM's actions and with uniformly random ones (context frames are the real ones)."""
    from tinyworlds.evaluation.media import annotate

    real = held.frames[i]  # [T, C, H, W]
    panels = {"real": annotate(real, action_labels(held, i, out["inferred"]), scale),
              "reconstruction": annotate(recon[i], ["reconstruction"] * len(real), scale)}
    for key, actions, tag in (("predicted", out["inferred"][i, context - 1 :], "LAM"),
                              ("randomized", out["random_actions"][i], "random")):
        clip = torch.cat([real[:context], out[key][i]])  # [T, C, H, W]
        panels[key] = annotate(clip, ["context"] * context + [f"{tag} a={a}" for a in actions.tolist()], scale)
    return panels


def log_pictures(run, name: str, held: HeldOutClips, recon: torch.Tensor, dynamics: dict[str, Any],
                 out: dict[str, torch.Tensor], context: int, config: EvaluateConfig, scratch: Path) -> None:
    """To MLflow: PSNR over the horizon as curves, a still grid (per clip: real, reconstruction,
    prediction; one frame per column) and a video (per clip: real | LAM actions | random actions)."""
    from tinyworlds.evaluation.media import tile, write_gif, write_mp4

    for h in range(config.horizon):
        run.log_metrics({f"{name}.{key}_by_horizon": dynamics[key][f"h{h + 1}"]
                         for key in ("rollout_psnr", "copy_last_psnr", "copy_last_tokens_psnr", "random_actions_psnr")},
                        step=h + 1)
    clips = [labelled_panels(held, i, recon, out, context, config.video_scale)
             for i in range(min(max(3, config.video_clips), held.frames.shape[0]))]
    still = tile([[row[j : j + 1] for j in range(len(row))]
                  for panels in clips[:3] for row in (panels["real"], panels["reconstruction"], panels["predicted"])])
    run.log_image(still[0], f"{name}_real_reconstruction_prediction.png")
    if config.video_clips:
        video = tile([[p["real"], p["predicted"], p["randomized"]] for p in clips[: config.video_clips]])
        for path in (write_mp4(video, scratch / f"{name}_rollout.mp4", fps=config.video_fps),
                     write_gif(video, scratch / f"{name}_rollout.gif", fps=config.video_fps)):
            run.log_artifact(path, "rollouts")


# ---------------------------------------------------------------------------------------------


def evaluate(params: dict[str, Any], root: Path = Path(".")) -> dict[str, Any]:
    """Evaluate data/models on the validation split of every `data.train_on` dataset.

    Writes data/metrics/evaluate.json and logs one MLflow run; returns the metrics (nested).
    """
    layout = Layout(root)
    names = dataset_names(params)
    config = EvaluateConfig.from_params(params)
    split = split_config(params)
    frame_skip = int(section(params, "data", "frame_skip"))
    world = WorldModel.load(layout.model("tokenizer").parent, device=str(params.get("train", {}).get("device", "auto")))
    context = config.context_frames or world.context_frames - 1
    settings = GenerationSettings(steps=config.steps, schedule=config.schedule, temperature=config.temperature,
                                  seed=config.seed)
    device_text = device_description(world.device)
    run_config = {
        "evaluate": {**asdict(config), "context_frames": context},
        "data": section(params, "data"),
        "device": str(world.device),
        "models": {kind: file_sha256(layout.model(kind) / "model.safetensors")
                   for kind in ("tokenizer", "lam", "dynamics")},
    }

    results: dict[str, Any] = {}
    with open_stage_run(STAGE, params, names, run_config) as run, tempfile.TemporaryDirectory() as scratch:
        run.set_tags({"tinyworlds.device": device_text})
        for name in names:
            began = time.perf_counter()
            held = held_out_clips(layout.frames(name), split, clip_len=context + config.horizon,
                                  frame_skip=frame_skip, max_clips=config.max_clips)
            world.check_frames(held.frames, str(layout.frames(name)))
            tokenizer, tokens, recon = tokenizer_metrics(world, held.frames, config.batch_size)
            transitions = split_transitions(layout.latent_actions(name), layout.frames(name), split, frame_skip)
            actions, usage = action_metrics(transitions, world.num_actions)
            dynamics, out = dynamics_metrics(world, held.frames, tokens, recon, usage, config, context, settings)
            results[name] = {"clips": held.frames.shape[0], "tokenizer": tokenizer, "lam": actions,
                             "dynamics": dynamics}
            log_pictures(run, name, held, recon, dynamics, out, context, config, Path(scratch))
            seconds = time.perf_counter() - began
            print(f"evaluate: {name}: {held.frames.shape[0]} clips in {seconds:.1f}s", file=sys.stderr)

        # Throughput from a real context: the first held-out frames of the first dataset.
        real_context = held_out_clips(layout.frames(names[0]), split, clip_len=context, frame_skip=frame_skip,
                                      max_clips=1).frames  # [1, c, C, H, W]
        if len(names) > 1:
            results["mean"] = mean_over_datasets({n: results[n] for n in names})
        results["throughput"] = {
            f"batch_{b}_frames_per_s": generation_throughput(world, real_context, config.horizon, b,
                                                             config.throughput_reps, settings)
            for b in (1, 8)
        } | {"device": device_text}

        write_json(results, layout.metrics(STAGE))
        run.log_final({k: float(v) for k, v in flatten(results).items() if isinstance(v, (int, float))})
        run.log_artifact(layout.metrics(STAGE))
    return results
