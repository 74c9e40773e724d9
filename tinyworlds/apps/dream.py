"""`tinyworlds dream`: roll a trained world model forward from a start, and write the result.

Starts are `tinyworlds.apps.start`, actions `tinyworlds.apps.actions`. Rollout k samples
with seed + k, so the B rollouts differ even under one script.

What a call writes, into a new data/dreams/<time>-<start> directory (or `out`):
  dream.mp4, dream.gif  context then dream, rollouts side by side, each frame labelled
  sheet.png             every frame of every rollout on one image: a row per rollout
  dream.json            start, actions, settings and seed: enough to generate it again
"""

from __future__ import annotations

import contextlib
import itertools
import re
import secrets
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from einops import rearrange, repeat

from tinyworlds.apps.actions import (
    ActionPlan,
    ActionRequest,
    Say,
    check_action_choice,
    parse_action_script,
    plan_actions,
    quiet,
)
from tinyworlds.apps.start import Start, StartRequest, check_settings, load_start
from tinyworlds.core.atomic import atomic_output, ensure_parent_writable, write_json
from tinyworlds.core.device import parse_threads, set_inference_threads
from tinyworlds.core.errors import ParameterError
from tinyworlds.inference.world import GenerationSettings, WorldModel

DREAMS_DIR = Path("data") / "dreams"
ROLLOUTS_PER_ROW = 4


@dataclass(frozen=True)
class DreamOutput:
    """Where and how to write: `out` (default a new data/dreams/<time>-<start>), frames upscaled
    `scale` times, the real continuation beside the dream (`compare`), an MLflow run (`log`)."""

    out: Path | None = None
    scale: int = 4
    compare: bool = False
    log: bool = False


def new_dream_dir(name: str, root: Path = Path(".")) -> Path:
    """A directory data/dreams/<time>-<name> that did not exist before (never reuses one)."""
    parent = root / DREAMS_DIR
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}"
    ensure_parent_writable(parent / stem)
    for attempt in itertools.count(1):
        candidate = parent / (stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            candidate.mkdir()  # atomic: two calls in the same second get different directories
            return candidate
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def layout_clips(start: Start, dreams: np.ndarray, plan: ActionPlan, seed: int, compare: bool, scale: int):
    """The movie: one labelled clip per rollout (and the real one first), tiled in rows.

    dreams: uint8 [B, F, H, W, C]. Returns uint8 [T+F, H', W', 3] and the sheet [1, H'', W'', 3].
    """
    from tinyworlds.evaluation.media import annotate, tile

    t, n = len(start.context), dreams.shape[1]
    clips = []  # each [T+N, H*scale + strip, W*scale, 3]
    if compare:
        real = np.concatenate([start.context, start.truth[:n]])  # [T+F, H, W, C]
        clips.append(annotate(real, ["context"] * t + ["real"] * n, scale))
    for k, dream in enumerate(dreams):
        clip = np.concatenate([start.context, dream])  # [T+F, H, W, C]
        labels = [f"seed {seed + k}"] * t + [f"#{k} a{int(a)}" for a in plan.actions[k]]
        clips.append(annotate(clip, labels, scale))
    columns = min(ROLLOUTS_PER_ROW, len(clips))
    padded = clips + [np.zeros_like(clips[0])] * (-len(clips) % columns)
    movie = tile([padded[i : i + columns] for i in range(0, len(padded), columns)])
    # The sheet: a row per clip, a column per frame (each a one-frame clip).
    sheet = tile([[clip[j : j + 1] for j in range(len(clip))] for clip in clips])
    return movie, sheet


def write_png(image: np.ndarray, path: Path) -> Path:
    """uint8 [H, W, 3] -> PNG, written atomically."""
    from PIL import Image

    with atomic_output(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path


@dataclass
class DreamResult:
    out: Path
    mp4: Path
    gif: Path
    sheet: Path
    start: str
    rollouts: int
    frames: int
    size: int
    seconds: float  # generation only
    psnr: float | None  # dream vs the real continuation, when compared

    def summary(self) -> str:
        speed = self.rollouts * self.frames / self.seconds if self.seconds > 0 else float("inf")
        lines = [
            f"dreamed {self.rollouts} x {self.frames} frames ({self.size}x{self.size}) from {self.start} "
            f"in {self.seconds:.1f} s ({speed:.1f} frames/s)",
        ]
        if self.psnr is not None:
            lines.append(f"PSNR against the real continuation: {self.psnr:.2f} dB")
        lines += [f"wrote {self.mp4}", f"      {self.gif}", f"      {self.sheet}"]
        return "\n".join(lines)


def dream(
    start_request: StartRequest = StartRequest(),
    action_request: ActionRequest = ActionRequest(),
    settings: GenerationSettings = GenerationSettings(temperature=1.0, seed=None),
    output: DreamOutput = DreamOutput(),
    *,
    frames: int = 16,
    batch: int = 1,
    models: Path = Path("data/models"),
    device: str = "auto",
    threads: str | int = "auto",
    root: Path = Path("."),
    say: Say = quiet,
) -> DreamResult:
    """Load the models, pick a start and actions, generate `batch` rollouts of `frames` frames,
    write the videos (and log them). `settings.seed` None draws a fresh seed and says which."""
    if frames < 1:
        raise ParameterError("frames", "must be at least 1", frames)
    if batch < 1:
        raise ParameterError("batch", "must be at least 1", batch)
    if output.scale < 1:
        raise ParameterError("scale", "must be at least 1", output.scale)
    if output.out is not None and Path(output.out).exists() and not Path(output.out).is_dir():
        raise ParameterError("out", "exists and is not a directory", Path(output.out))
    fresh_seed = settings.seed is None
    if fresh_seed:
        settings = replace(settings, seed=secrets.randbelow(1_000_000))
    seed, compare = settings.seed, output.compare
    check_settings(settings)
    check_action_choice(action_request)
    parse_threads(threads)  # a bad thread count fails before the models load
    world = WorldModel.load(models, device)
    if action_request.actions is not None:  # fail on a bad script before reading any video
        parse_action_script(action_request.actions, world.num_actions)
    rng = np.random.default_rng(seed)
    start = load_start(world, start_request, continuation=frames if (action_request.replay or compare) else 0,
                       rng=rng, root=root)
    for note in start.notes:
        say(note)
    plan = plan_actions(world, start, action_request, frames=frames, batch=batch, rng=rng, say=say)
    if (note := set_inference_threads(threads, world.device)) is not None:  # every input checked
        say(note)
    say(f"start {start.name}, {len(start.context)} context frames; {plan.source} actions "
        f"{','.join(str(int(a)) for a in plan.actions[0])}" + (" (rollout 0)" if plan.source == "random" else "")
        + (f"; seed {seed} (--seed {seed} dreams this again)" if fresh_seed else ""))

    config = {"models": str(models), "start": start.name, "frames": frames, "batch": batch,
              "actions": plan.source, "context_frames": len(start.context), **asdict(settings)}
    tracking = _tracking(output.log, config, start)
    with tracking as run:
        context_btchw = repeat(torch.from_numpy(start.context), "t h w c -> b t c h w", b=batch)  # [B, T, C, H, W]
        began = time.perf_counter()
        dreams = world.rollout(context_btchw, plan.actions, context_actions=plan.context_actions, settings=settings,
                               dataset=start.dataset)
        seconds = time.perf_counter() - began
        dreams = rearrange(dreams.cpu().numpy(), "b f c h w -> b f h w c")  # [B, F, H, W, C]
        score = _psnr(dreams, start.truth) if compare else None

        target = Path(output.out) if output.out is not None else new_dream_dir(start.name, root)
        try:
            result = _write(target, start, dreams, plan, settings, compare, output.scale, start.fps or start_request.fps,
                            seconds, score)
        except BaseException:
            if output.out is None and not any(target.iterdir()):
                target.rmdir()
            raise
        if run is not None:
            run.log_artifact(target, "dream")
            final = {"seconds": seconds, "frames_per_second": batch * frames / max(seconds, 1e-9)}
            if score is not None:
                final["psnr"] = score
            run.log_final(final)
            say(f"logged to MLflow run {run.run_id}")
    return result


def _tracking(log: bool, config: dict, start: Start):
    if not log:
        return contextlib.nullcontext()
    from tinyworlds.tracking.run import StageRun

    return StageRun("dream", config, datasets=[start.dataset] if start.dataset else [])


def _psnr(dreams: np.ndarray, truth: np.ndarray) -> float:
    """Mean PSNR (dB) of every dreamed frame against the real one at the same step."""
    from tinyworlds.metrics import finite_mean, psnr

    n = dreams.shape[1]
    real = repeat(torch.from_numpy(truth[:n]), "f h w c -> b f h w c", b=dreams.shape[0])
    return finite_mean(psnr(torch.from_numpy(dreams), real, dims=(2, 3, 4)))


def _write(target, start, dreams, plan, settings, compare, scale, fps, seconds, score) -> DreamResult:
    from tinyworlds.evaluation.media import write_gif, write_mp4

    movie, sheet = layout_clips(start, dreams, plan, settings.seed, compare, scale)
    mp4 = write_mp4(movie, target / "dream.mp4", fps=fps)
    gif = write_gif(movie, target / "dream.gif", fps=fps)
    png = write_png(sheet[0], target / "sheet.png")
    write_json({
        "start": start.name,
        "context_frames": len(start.context),
        "frames": dreams.shape[1],
        "rollouts": dreams.shape[0],
        "seeds": [settings.seed + k for k in range(dreams.shape[0])],
        "actions_from": plan.source,
        "actions": plan.actions.tolist(),
        "settings": asdict(settings),
        "fps": fps,
        "compare": compare,
        "psnr": score,
        "notes": start.notes,
    }, target / "dream.json")
    size = dreams.shape[2]
    return DreamResult(target, mp4, gif, png, start.name, dreams.shape[0], dreams.shape[1], size, seconds, score)
