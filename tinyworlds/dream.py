"""`tinyworlds dream`: roll a trained world model forward from a starting context.

Where a dream starts (a `Start`): a clip of an ingested dataset, the first frames of any video
file (resampled and shaped the way `ingest` does it), or one still image. Dataset clips and
videos also carry their real continuation, which `--replay` turns into actions (the latent
action model labels the real transitions, so the dream replays a real episode's controls) and
`--compare` shows beside the dream.

Which actions drive it (`plan_actions`, ids [K, N] for K rollouts of N frames):
  script   "0,0,2,1": the same for every rollout; a script shorter than N is repeated from
           its start (cycled), a longer one is cut to N
  random   uniform ids, different for each rollout, drawn from the seed
  replay   the LAM's ids for the real continuation, the same for every rollout
Rollout k samples with seed + k, so the K rollouts differ even under one script.

What a call writes, into a new data/dreams/<time>-<start> directory (or --out):
  dream.mp4, dream.gif  context then dream, rollouts side by side, each frame labelled
  sheet.png             every frame of every rollout on one image: a row per rollout
  dream.json            start, actions, settings and seed: enough to generate it again
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from einops import rearrange, repeat

from tinyworlds.atomic import atomic_output, ensure_parent_writable
from tinyworlds.errors import TinyWorldsError
from tinyworlds.params import Layout
from tinyworlds.training.device import parse_threads, set_inference_threads
from tinyworlds.world import GenerationSettings, WorldModel

DREAMS_DIR = Path("data") / "dreams"
STORE_SUFFIXES = (".zarr", ".h5", ".hdf5")
DEFAULT_FPS = 15.0  # ingest's default rate, so a video is sampled the way training data was
ROLLOUTS_PER_ROW = 4

Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# Starts


@dataclass
class Start:
    """A context to dream from and, when the source goes on, the real frames after it."""

    context: np.ndarray  # uint8 [T, H, W, C]
    truth: np.ndarray | None  # uint8 [N, H, W, C] real continuation, or None
    name: str  # "pong@1200", "clip.mp4", "title.png": labels and directory names
    dataset: str | None = None  # the dataset's name, for MLflow
    fps: float | None = None  # the source's frame rate, when it has one
    notes: list[str] = field(default_factory=list)  # adjustments made on the way


def dataset_store(dataset: str, root: Path = Path(".")) -> Path:
    """A dataset name (data/frames/NAME.zarr) or a frame store path -> the store's path."""
    as_path = Path(dataset)
    if as_path.suffix in STORE_SUFFIXES or len(as_path.parts) > 1:
        if not as_path.exists():
            raise TinyWorldsError(f"{as_path}: no such frame store")
        return as_path
    store = Layout(root).frames(dataset)
    if not store.exists():
        known = ", ".join(p.stem for p in ingested_stores(root)) or "none; run `dvc repro`"
        raise TinyWorldsError(f"dataset {dataset!r}: {store} does not exist (ingested: {known})")
    return store


def frames_dir(root: Path = Path(".")) -> Path:
    """data/frames: where `Layout` puts every dataset's store."""
    return Layout(root).frames("NAME").parent


def ingested_stores(root: Path = Path(".")) -> list[Path]:
    """Every frame store under data/frames, sorted by name."""
    return sorted(p for p in frames_dir(root).glob("*") if p.suffix in STORE_SUFFIXES and not p.name.startswith("."))


def _check_geometry(what: object, size: int, channels: int, want_size: int, want_channels: int) -> None:
    if (size, channels) != (want_size, want_channels):
        raise TinyWorldsError(
            f"{what}: frames are {size}x{size}x{channels}, the model takes {want_size}x{want_size}x{want_channels} "
            "(ingest the video again at the model's size)"
        )


def start_from_dataset(
    store_path: Path,
    *,
    size: int,
    channels: int,
    context: int,
    continuation: int = 0,
    index: int | None = None,
    rng: np.random.Generator | None = None,
) -> Start:
    """`context` frames from frame `index` of a frame store (random when None), and the
    `continuation` real frames after them."""
    from tinyworlds.data.stores import open_frame_store

    need = context + continuation
    with open_frame_store(store_path) as store:
        _check_geometry(store_path, store.size, store.channels, size, channels)
        n = len(store)
        what = f"{context} context frames" + (f" + {continuation} real frames to follow" if continuation else "")
        if n < need:
            raise TinyWorldsError(f"{store_path}: has {n} frames, too few for {what}")
        last = n - need
        if index is None:
            index = int((rng or np.random.default_rng()).integers(0, last + 1))
        elif not 0 <= index <= last:
            raise TinyWorldsError(
                f"--index {index}: out of range; {store_path} has {n} frames and a start needs {what}, "
                f"so the index must be in 0..{last}"
            )
        clip = store.frames[index : index + need]  # [T+N, H, W, C]
        fps = store.fps
    name = store_path.name.split(".")[0]
    return Start(clip[:context], clip[context:] if continuation else None, f"{name}@{index}", name, fps)


def start_from_video(
    path: Path,
    *,
    size: int,
    channels: int,
    context: int,
    continuation: int = 0,
    fps: float = DEFAULT_FPS,
    crop: tuple[int, int, int, int] | None = None,
    fit: str = "crop",
) -> Start:
    """The first `context` (+ `continuation`) frames of a video, resampled to `fps` and shaped
    as `ingest` shapes them (`crop` box, then `fit`: crop | pad | stretch, then area resize)."""
    from tinyworlds.data.video import (
        FITS, DecodedFrames, FrameShaper, plan_geometry, probe_video, resample, timestamp_tolerance,
    )

    if not (math.isfinite(fps) and fps > 0):
        raise TinyWorldsError(f"--fps {fps!r}: must be a number above 0")
    if fit not in FITS:
        raise TinyWorldsError(f"--fit {fit!r}: must be one of {', '.join(FITS)}")
    path = Path(path)
    info = probe_video(path)
    if crop is not None and (crop[0] + crop[2] > info.width or crop[1] + crop[3] > info.height):
        raise TinyWorldsError(f"--crop {crop}: the box (x, y, w, h) lies outside the {info.width}x{info.height} video")
    geometry = plan_geometry(info.width, info.height, size, crop, fit)
    shaper = FrameShaper((info.width, info.height), geometry, grayscale=channels == 1, source=path)
    need = context + continuation
    decoded = DecodedFrames(info)
    picked = resample(decoded, fps, tol=timestamp_tolerance(info.time_base))
    frames = [shaper(frame) for _, frame in itertools.islice(picked, need)]  # each [H, W, C]
    picked.close()
    if len(frames) < need:
        what = f"{context} context frames" + (f" + {continuation} real frames to follow" if continuation else "")
        broken = f" (decoding stopped: {decoded.error})" if decoded.error else ""
        raise TinyWorldsError(f"{path}: has {len(frames)} frames at {fps:g} fps, too few for {what}{broken}")
    clip = np.stack(frames)  # [T+N, H, W, C]
    notes = []
    if (info.width, info.height) != (size, size) or crop is not None:
        x, y, w, h = crop if crop is not None else (0, 0, info.width, info.height)
        shaping = [f"cropped to {w}x{h} at ({x}, {y})"] if crop is not None else []
        if w != h:
            shaping.append({"crop": "centre square taken", "pad": "letterboxed", "stretch": "stretched"}[fit])
        shaping.append(f"resized to {size}x{size}")
        notes.append(f"{path}: {info.width}x{info.height} video, {', '.join(shaping)}")
    return Start(clip[:context], clip[context:] if continuation else None, path.name, None, fps, notes)


def start_from_image(path: Path, *, size: int, channels: int) -> Start:
    """One still image (PNG, JPEG, anything Pillow reads) as a one-frame context; an image of
    another size is centre-cropped to a square and resized, other channels converted."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise TinyWorldsError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise TinyWorldsError(f"{path}: not an image Pillow can read ({' '.join(str(err).split())})") from None
    notes = []
    mode = "L" if channels == 1 else "RGB"
    if image.mode != mode:
        notes.append(f"{path}: converted {image.mode} to {mode} ({channels} channel{'s' if channels > 1 else ''})")
        image = image.convert(mode)
    if image.size != (size, size):
        w, h = image.size
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        cropped = ", centre-cropped" if w != h else ""
        notes.append(f"{path}: image is {w}x{h}, the model takes {size}x{size}: resized{cropped}")
        image = image.resize((size, size), Image.Resampling.BOX, box=box)
    frame = np.array(image, dtype=np.uint8).reshape(size, size, channels)  # [H, W, C]
    return Start(frame[None], None, path.name, None, None, notes)


def load_start(
    world: WorldModel,
    *,
    dataset: str | None = None,
    index: int | None = None,
    video: Path | None = None,
    image: Path | None = None,
    context: int | None = None,
    continuation: int = 0,
    fps: float = DEFAULT_FPS,
    crop: tuple[int, int, int, int] | None = None,
    fit: str = "crop",
    rng: np.random.Generator | None = None,
    root: Path = Path("."),
) -> Start:
    """The start the options name; with none of them, a random clip of a random ingested dataset."""
    given = [flag for flag, value in (("--dataset", dataset), ("--video", video), ("--image", image)) if value]
    if len(given) > 1:
        raise TinyWorldsError(f"{' and '.join(given)}: give one start, not several")
    if index is not None and dataset is None:
        raise TinyWorldsError("--index: needs --dataset NAME (the clip's dataset)")
    if (crop is not None or fit != "crop") and video is None:
        raise TinyWorldsError("--crop and --fit: shape a --video; a dataset clip is shaped already")
    context = context if context is not None else default_context(world)
    if context < 1:
        raise TinyWorldsError(f"--context {context}: need at least 1 context frame")
    size, channels = world.frame_size, world.channels
    if image is not None:
        if continuation:
            raise TinyWorldsError(f"{image}: a still image has no real continuation (for --replay or --compare "
                                  "start from --dataset or --video)")
        return start_from_image(image, size=size, channels=channels)
    if video is not None:
        return start_from_video(video, size=size, channels=channels, context=context, continuation=continuation,
                                fps=fps, crop=crop, fit=fit)
    rng = rng or np.random.default_rng()
    if dataset is None:
        stores = [p for p in ingested_stores(root) if _fits(p, size, channels)]
        if not stores:
            raise TinyWorldsError(f"{frames_dir(root)}: no ingested dataset of "
                                  f"{size}x{size}x{channels} frames to start from; give --video or --image")
        store = stores[int(rng.integers(len(stores)))]
    else:
        store = dataset_store(dataset, root)
    return start_from_dataset(store, size=size, channels=channels, context=context, continuation=continuation,
                              index=index, rng=rng)


def _fits(store_path: Path, size: int, channels: int) -> bool:
    from tinyworlds.data.stores import open_frame_store

    try:
        with open_frame_store(store_path) as store:
            return (store.size, store.channels) == (size, channels)
    except TinyWorldsError:
        return False


def check_settings(settings: GenerationSettings) -> None:
    """One-line errors for generation settings, before any model is loaded."""
    from tinyworlds.models.dynamics import MASK_SCHEDULES

    if isinstance(settings.steps, bool) or not isinstance(settings.steps, int) or settings.steps < 1:
        raise TinyWorldsError(f"--steps {settings.steps!r}: must be a whole number >= 1")
    if settings.schedule not in MASK_SCHEDULES:
        raise TinyWorldsError(f"--schedule {settings.schedule!r}: must be one of {', '.join(MASK_SCHEDULES)}")
    if not (math.isfinite(settings.temperature) and settings.temperature >= 0):
        raise TinyWorldsError(f"--temperature {settings.temperature!r}: must be a number >= 0 (0 is greedy)")


def default_context(world: WorldModel) -> int:
    """As many frames as the dynamics model sees beside the one it makes."""
    return max(1, world.context_frames - 1)


# ---------------------------------------------------------------------------------------------
# Actions


def parse_action_script(text: str, num_actions: int) -> list[int]:
    """`"0,0,2,1"` -> [0, 0, 2, 1]; one-line errors for anything else or an id out of range."""
    parts = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
    if not parts or not all(re.fullmatch(r"-?\d+", p) for p in parts):
        raise TinyWorldsError(f"--actions {text!r}: expected action ids separated by commas, e.g. 0,0,2,1")
    ids = [int(p) for p in parts]
    bad = [a for a in ids if not 0 <= a < num_actions]
    if bad:
        raise TinyWorldsError(
            f"--actions: action id {bad[0]} is out of range; this model has {num_actions} latent actions, "
            f"ids 0..{num_actions - 1}"
        )
    return ids


def script_actions(script: list[int], frames: int) -> list[int]:
    """A script cycled (shorter) or cut (longer) to exactly `frames` ids."""
    return list(itertools.islice(itertools.cycle(script), frames))


def check_action_choice(script: str | None, random_actions: bool, replay: bool) -> None:
    chosen = [flag for flag, on in (("--actions", script is not None), ("--random-actions", random_actions),
                                    ("--replay", replay)) if on]
    if len(chosen) > 1:
        raise TinyWorldsError(f"{' and '.join(chosen)}: choose one way to pick actions")


@dataclass
class ActionPlan:
    actions: torch.Tensor  # [K, N] ids into each new frame
    context_actions: torch.Tensor | None  # [K, T-1], or None: the LAM labels the context
    source: str  # "script", "random" or "replay"


def plan_actions(
    world: WorldModel,
    start: Start,
    *,
    frames: int,
    batch: int,
    script: str | None = None,
    random_actions: bool = False,
    replay: bool = False,
    rng: np.random.Generator | None = None,
    say: Say = _quiet,
) -> ActionPlan:
    """The actions of K rollouts of N frames (rules in the module docstring)."""
    check_action_choice(script, random_actions, replay)
    if replay:
        if start.truth is None or len(start.truth) < frames:
            raise TinyWorldsError(f"--replay: {start.name} has no real continuation of {frames} frames to replay")
        clip = np.concatenate([start.context, start.truth[:frames]])  # [T+N, H, W, C]
        clip = rearrange(torch.from_numpy(clip), "t h w c -> 1 t c h w")
        ids = world.infer_actions(clip).cpu()  # [1, T+N-1]
        t = len(start.context)
        return ActionPlan(repeat(ids[0, t - 1:], "n -> k n", k=batch),
                          repeat(ids[0, : t - 1], "n -> k n", k=batch) if t > 1 else None, "replay")
    if script is not None:
        ids = parse_action_script(script, world.num_actions)
        if len(ids) > frames:
            say(f"--actions: {len(ids)} ids given for {frames} frames; using the first {frames}")
        full = torch.tensor(script_actions(ids, frames))  # [N]
        return ActionPlan(repeat(full, "n -> k n", k=batch), None, "script")
    rng = rng or np.random.default_rng()
    return ActionPlan(torch.from_numpy(rng.integers(0, world.num_actions, size=(batch, frames))), None, "random")


# ---------------------------------------------------------------------------------------------
# Output


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

    dreams: uint8 [K, N, H, W, C]. Returns uint8 [T+N, H', W', 3] and the sheet [1, H'', W'', 3].
    """
    from tinyworlds.evaluation.media import annotate, tile

    t, n = len(start.context), dreams.shape[1]
    clips = []  # each [T+N, H*scale + strip, W*scale, 3]
    if compare:
        real = np.concatenate([start.context, start.truth[:n]])  # [T+N, H, W, C]
        clips.append(annotate(real, ["context"] * t + ["real"] * n, scale))
    for k, dream in enumerate(dreams):
        clip = np.concatenate([start.context, dream])  # [T+N, H, W, C]
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


def write_json(doc: dict, path: Path) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# The command


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
    *,
    models: Path = Path("data/models"),
    device: str = "auto",
    threads: str | int = "auto",
    dataset: str | None = None,
    index: int | None = None,
    video: Path | None = None,
    image: Path | None = None,
    context: int | None = None,
    fps: float = DEFAULT_FPS,
    crop: tuple[int, int, int, int] | None = None,
    fit: str = "crop",
    frames: int = 16,
    actions: str | None = None,
    random_actions: bool = False,
    replay: bool = False,
    batch: int = 1,
    steps: int = 8,
    schedule: str = "cosine",
    temperature: float = 1.0,
    seed: int | None = None,
    compare: bool = False,
    out: Path | None = None,
    scale: int = 4,
    log: bool = False,
    root: Path = Path("."),
    say: Say = _quiet,
) -> DreamResult:
    """Load the models, pick a start and actions, generate, write the videos (and log them)."""
    if frames < 1:
        raise TinyWorldsError(f"--frames {frames}: must be at least 1")
    if batch < 1:
        raise TinyWorldsError(f"--batch {batch}: must be at least 1")
    if scale < 1:
        raise TinyWorldsError(f"--scale {scale}: must be at least 1")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise TinyWorldsError(f"--out {out}: exists and is not a directory")
    fresh_seed = seed is None
    if fresh_seed:
        seed = secrets.randbelow(1_000_000)
    settings = GenerationSettings(steps=steps, schedule=schedule, temperature=temperature, seed=seed)
    check_settings(settings)
    check_action_choice(actions, random_actions, replay)
    parse_threads(threads)  # a bad --threads fails before the models load
    world = WorldModel.load(models, device)
    if actions is not None:  # fail on a bad script before reading any video
        parse_action_script(actions, world.num_actions)
    rng = np.random.default_rng(seed)
    start = load_start(world, dataset=dataset, index=index, video=video, image=image, context=context,
                       continuation=frames if (replay or compare) else 0, fps=fps, crop=crop, fit=fit, rng=rng,
                       root=root)
    for note in start.notes:
        say(note)
    plan = plan_actions(world, start, frames=frames, batch=batch, script=actions, random_actions=random_actions,
                        replay=replay, rng=rng, say=say)
    if (note := set_inference_threads(threads, world.device)) is not None:  # every input checked
        say(note)
    say(f"start {start.name}, {len(start.context)} context frames; {plan.source} actions "
        f"{','.join(str(int(a)) for a in plan.actions[0])}" + (" (rollout 0)" if plan.source == "random" else "")
        + (f"; seed {seed} (--seed {seed} dreams this again)" if fresh_seed else ""))

    config = {"models": str(models), "start": start.name, "frames": frames, "batch": batch,
              "actions": plan.source, "context_frames": len(start.context), **asdict(settings)}
    tracking = _tracking(log, config, start)
    with tracking as run:
        context_btchw = repeat(torch.from_numpy(start.context), "t h w c -> k t c h w", k=batch)  # [K, T, C, H, W]
        began = time.perf_counter()
        dreams = world.rollout(context_btchw, plan.actions, context_actions=plan.context_actions, settings=settings)
        seconds = time.perf_counter() - began
        dreams = rearrange(dreams.cpu().numpy(), "k n c h w -> k n h w c")  # [K, N, H, W, C]
        score = _psnr(dreams, start.truth) if compare else None

        target = Path(out) if out is not None else new_dream_dir(start.name, root)
        try:
            result = _write(target, start, dreams, plan, settings, compare, scale, start.fps or fps, seconds, score)
        except BaseException:
            if out is None and not any(target.iterdir()):
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
    from tinyworlds.tracking import StageRun

    return StageRun("dream", config, datasets=[start.dataset] if start.dataset else [])


def _psnr(dreams: np.ndarray, truth: np.ndarray) -> float:
    """Mean PSNR (dB) of every dreamed frame against the real one at the same step."""
    from tinyworlds.evaluation.metrics import finite_mean, psnr

    n = dreams.shape[1]
    real = repeat(torch.from_numpy(truth[:n]), "n h w c -> k n h w c", k=dreams.shape[0])
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
