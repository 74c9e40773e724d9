"""Where a dream or a play session starts: a `Start`, from a dataset clip, a video or an image.

A clip of an ingested dataset, the first frames of any video file (resampled and shaped the
way `ingest` does it), or one still image. Dataset clips and videos also carry their real
continuation, which `replay` turns into actions (the latent action model labels the real
transitions) and `compare` shows beside the dream. Shared by `tinyworlds dream` and `play`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinyworlds.core.errors import ParameterError, TinyWorldsError
from tinyworlds.core.params import Layout
from tinyworlds.inference.world import GenerationSettings, WorldModel

STORE_SUFFIXES = (".zarr", ".h5", ".hdf5")
DEFAULT_FPS = 15.0  # ingest's default rate, so a video is sampled the way training data was


@dataclass(frozen=True)
class StartRequest:
    """Which start to load: at most one of `dataset`, `video`, `image` (none: a random clip of
    a random ingested dataset). `index` picks the clip of `dataset`; `fps`, `crop` and `fit`
    shape a `video` as `ingest` would; `context` frames (default: the dynamics window - 1)."""

    dataset: str | None = None
    index: int | None = None
    video: Path | None = None
    image: Path | None = None
    context: int | None = None
    fps: float = DEFAULT_FPS
    crop: tuple[int, int, int, int] | None = None
    fit: str = "crop"


@dataclass
class Start:
    """A context to dream from and, when the source goes on, the real frames after it."""

    context: np.ndarray  # uint8 [T, H, W, C]
    truth: np.ndarray | None  # uint8 [F, H, W, C] real continuation, or None
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
            raise ParameterError("index", f"out of range; {store_path} has {n} frames and a start needs {what}, "
                                 f"so the index must be in 0..{last}", index)
        clip = store.frames[index : index + need]  # [T+F, H, W, C]
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
        FITS,
        DecodedFrames,
        FrameShaper,
        plan_geometry,
        probe_video,
        resample,
        timestamp_tolerance,
    )

    if not (math.isfinite(fps) and fps > 0):
        raise ParameterError("fps", "must be a number above 0", fps)
    if fit not in FITS:
        raise ParameterError("fit", f"must be one of {', '.join(FITS)}", fit)
    path = Path(path)
    info = probe_video(path)
    if crop is not None and (crop[0] + crop[2] > info.width or crop[1] + crop[3] > info.height):
        raise ParameterError("crop", f"the box (x, y, w, h) lies outside the {info.width}x{info.height} video", crop)
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
    clip = np.stack(frames)  # [T+F, H, W, C]
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
    request: StartRequest = StartRequest(),
    *,
    continuation: int = 0,
    rng: np.random.Generator | None = None,
    root: Path = Path("."),
) -> Start:
    """The start `request` names (rules in `StartRequest`), with `continuation` real frames after it."""
    r = request
    given = tuple(name for name in ("dataset", "video", "image") if getattr(r, name))
    if len(given) > 1:
        raise ParameterError(given, "give one start, not several")
    if r.index is not None and r.dataset is None:
        raise ParameterError("index", "needs a dataset (the clip's dataset)")
    if (r.crop is not None or r.fit != "crop") and r.video is None:
        raise ParameterError(("crop", "fit"), "shape a video; a dataset clip is shaped already")
    context = r.context if r.context is not None else default_context(world)
    if context < 1:
        raise ParameterError("context", "need at least 1 context frame", context)
    size, channels = world.frame_size, world.channels
    if r.image is not None:
        if continuation:
            raise TinyWorldsError(f"{r.image}: a still image has no real continuation (to replay or compare, "
                                  "start from a dataset or a video)")
        return start_from_image(r.image, size=size, channels=channels)
    if r.video is not None:
        return start_from_video(r.video, size=size, channels=channels, context=context, continuation=continuation,
                                fps=r.fps, crop=r.crop, fit=r.fit)
    rng = rng or np.random.default_rng()
    if r.dataset is None:
        stores = [p for p in ingested_stores(root) if _fits(p, size, channels)]
        if not stores:
            raise TinyWorldsError(f"{frames_dir(root)}: no ingested dataset of "
                                  f"{size}x{size}x{channels} frames to start from; start from a video or an image")
        store = stores[int(rng.integers(len(stores)))]
    else:
        store = dataset_store(r.dataset, root)
    return start_from_dataset(store, size=size, channels=channels, context=context, continuation=continuation,
                              index=r.index, rng=rng)


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
        raise ParameterError("steps", "must be a whole number >= 1", settings.steps)
    if settings.schedule not in MASK_SCHEDULES:
        raise ParameterError("schedule", f"must be one of {', '.join(MASK_SCHEDULES)}", settings.schedule)
    if not (math.isfinite(settings.temperature) and settings.temperature >= 0):
        raise ParameterError("temperature", "must be a number >= 0 (0 is greedy)", settings.temperature)


def default_context(world: WorldModel) -> int:
    """As many frames as the dynamics model sees beside the one it makes."""
    return max(1, world.context_frames - 1)
