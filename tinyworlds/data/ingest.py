"""Ingest a gameplay video (or a TinyWorlds HDF5 file) into a frame store, streaming.

The store, a zarr v3 group directory (`NAME.zarr`) or an HDF5 file (`NAME.h5`), holds
  frames   uint8 [N, H, W, C], H = W = size, C = 3 (RGB) or 1 (grayscale luma),
           chunked along time and compressed (choice and figures below);
  true_actions  int16 [N], only with a sidecar (NAME.true_actions.json): the ground-truth action
           of the source frame each output frame shows (resampled with the frames);
and these attributes: tinyworlds_version; source, source_sha256, source_kind ("video" or
"hdf5"), source_codec, source_width, source_height, source_fps, source_frames (declared),
source_duration; fps, size, channels, fit, crop (as given, [x, y, w, h] or null),
crop_box (the box actually resized, after `fit`), start, end; frames (N), frames_decoded
(source frames decoded), partial, partial_reason; with a sidecar also actions_sidecar,
game, action_meanings. (HDF5 cannot store null: such attributes are left out there.)

Frames are picked by timestamp and shaped as `tinyworlds.data.video` describes. Peak
memory does not grow with the video: one chunk of output frames is buffered and written
as soon as it is full; only the actions (2 bytes per output frame) are kept to the end.

A TinyWorlds HDF5 source (a `frames` dataset [N, H, W, 3] uint8) is re-shaped the same
way (area resize when its size differs, grayscale if asked). Its frame j is at time
j / source_fps, where source_fps is its `fps` attribute when it has one (then it is
resampled to `fps` like a video) and otherwise `fps` itself (then no frame is dropped
or repeated).

True-actions sidecar (NAME.true_actions.json, written by `tinyworlds record`): JSON {"game": str, "fps": float,
"frames": N, "action_meanings": [str, ...], "actions": [int per source frame]}, where
actions[j] was applied at source frame j, i.e. at time j / sidecar fps.

Everything is written under a temporary name and renamed into place only when complete
(`tinyworlds.core.atomic`): on any failure no store is left at `out` and a previous one is kept.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import h5py
import numpy as np
import zarr
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from zarr.codecs import ZstdCodec

import tinyworlds
from tinyworlds.core.atomic import atomic_output
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.data.stores import FrameStore, file_sha256, open_frame_store, store_kind
from tinyworlds.data.video import (
    FITS,
    DecodedFrames,
    FrameShaper,
    VideoInfo,
    check_source_file,
    plan_geometry,
    probe_video,
    resample,
    timestamp_tolerance,
)

FORMATS = {".zarr": "zarr", ".h5": "hdf5", ".hdf5": "hdf5"}
MAX_SIZE = 4096
MAX_FPS = 1000.0

# Zstd over whole 128-frame chunks: it sees the redundancy between frames that Blosc's small
# blocks miss, and every option reads far faster than a CPU trains on 64x64 frames, so the
# compression ratio decides (bench/bench_ingest.py compares them; figures in bench/README.md).
ZARR_CHUNK_FRAMES = 128
ZARR_COMPRESSOR = ZstdCodec(level=3)
HDF5_CHUNK_FRAMES = 64
HDF5_COMPRESSION = {"compression": "gzip", "compression_opts": 4}
STORE_READ_FRAMES = 256  # frames read at a time from an HDF5 source


@dataclass(frozen=True)
class IngestReport:
    """What `ingest` wrote."""

    source: Path
    out: Path
    fmt: str  # "zarr" or "hdf5"
    frames: int  # output frames written
    size: int
    channels: int
    fps: float
    frames_decoded: int  # source frames decoded
    partial: bool
    partial_reason: str | None
    actions: bool  # whether ground-truth actions were stored
    seconds: float

    def summary(self) -> str:
        """One line for the CLI."""
        parts = [f"{self.frames_decoded} source frames decoded in {self.seconds:.1f} s"]
        if self.actions:
            parts.append("with actions")
        if self.partial:
            parts.append(f"PARTIAL: {self.partial_reason}")
        return (
            f"wrote {self.out} ({self.fmt}): {self.frames} frames {self.size}x{self.size}x{self.channels} "
            f"at {self.fps:g} fps from {self.source} ({'; '.join(parts)})"
        )


@dataclass(frozen=True)
class ActionSidecar:
    """Ground-truth actions of every source frame, from `tinyworlds record`."""

    path: Path
    game: str
    fps: float
    action_meanings: list[str]
    actions: np.ndarray  # [source frames] int16

    def action_at(self, t: float) -> int:
        """The action applied at the source frame shown from time `t` (seconds)."""
        j = round(t * self.fps)
        if not 0 <= j < len(self.actions):
            raise TinyWorldsError(
                f"{self.path}: has actions for {len(self.actions)} frames, "
                f"but the video has a frame at {t:.3f} s (frame {j})"
            )
        return int(self.actions[j])


def load_sidecar(path: Path) -> ActionSidecar:
    """Read and check an actions sidecar; a one-line TinyWorldsError naming it if it is wrong."""
    check_source_file(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TinyWorldsError(f"{path}: not a readable JSON actions sidecar ({err})") from None
    if not isinstance(doc, dict):
        raise TinyWorldsError(f"{path}: actions sidecar must be a JSON object")
    missing = [k for k in ("game", "fps", "frames", "action_meanings", "actions") if k not in doc]
    if missing:
        raise TinyWorldsError(f"{path}: actions sidecar lacks {', '.join(missing)}")
    meanings, actions, fps = doc["action_meanings"], doc["actions"], doc["fps"]
    if not (isinstance(meanings, list) and meanings and all(isinstance(m, str) for m in meanings)):
        raise TinyWorldsError(f"{path}: action_meanings must be a non-empty list of strings")
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise TinyWorldsError(f"{path}: fps must be a positive number, got {fps!r}")
    if not (isinstance(actions, list) and all(isinstance(a, int) and 0 <= a < len(meanings) for a in actions)):
        raise TinyWorldsError(f"{path}: actions must be whole numbers from 0 to {len(meanings) - 1}")
    if doc["frames"] != len(actions):
        raise TinyWorldsError(f"{path}: declares {doc['frames']} frames but lists {len(actions)} actions")
    return ActionSidecar(path, str(doc["game"]), float(fps), meanings, np.asarray(actions, dtype=np.int16))


def output_format(out: Path, fmt: str | None) -> str:
    """The store format: `fmt` if given, else from the suffix of `out`."""
    if fmt is not None:
        if fmt not in ("zarr", "hdf5"):
            raise TinyWorldsError(f"{out}: unknown format {fmt!r} (use zarr or hdf5)")
        return fmt
    if out.suffix.lower() not in FORMATS:
        raise TinyWorldsError(f"{out}: cannot tell the format from the suffix {out.suffix!r} (use .zarr, .h5 or .hdf5)")
    return FORMATS[out.suffix.lower()]


def _check_options(source, size, fps, crop, fit, start, end) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= MAX_SIZE:
        raise TinyWorldsError(f"{source}: size must be a whole number of pixels from 1 to {MAX_SIZE}, got {size!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not (0 < fps <= MAX_FPS):  # NaN fails too
        raise TinyWorldsError(f"{source}: fps must be a number above 0 and at most {MAX_FPS:g}, got {fps!r}")
    if fit not in FITS:
        raise TinyWorldsError(f"{source}: fit must be one of {', '.join(FITS)}, got {fit!r}")
    for name, value in (("start", start), ("end", end)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise TinyWorldsError(f"{source}: {name} must be a number of seconds >= 0, got {value!r}")
    if start is not None and end is not None and start >= end:
        raise TinyWorldsError(f"{source}: start ({start:g} s) must be before end ({end:g} s)")
    if crop is not None:
        if len(crop) != 4 or any(not isinstance(v, (int, np.integer)) for v in crop):
            raise TinyWorldsError(f"{source}: crop must be four whole numbers x, y, w, h, got {crop!r}")
        x, y, w, h = crop
        if x < 0 or y < 0 or w <= 0 or h <= 0:
            raise TinyWorldsError(f"{source}: crop {tuple(crop)} needs x, y >= 0 and w, h > 0")


def _check_out(out: Path, fmt: str, source: Path) -> None:
    """Only a previous frame store of the same format may be replaced."""
    if not out.exists():
        return
    if out.resolve() == source.resolve():
        raise TinyWorldsError(f"{out}: is the source itself; write the store somewhere else")
    kind = store_kind(out)
    if kind is None:
        raise TinyWorldsError(f"{out}: exists and is not a frame store; refusing to replace it")
    if kind != fmt:
        raise TinyWorldsError(f"{out}: holds a {kind} store; refusing to replace it with {fmt} (remove it first)")



class StoredFrames:
    """A TinyWorlds HDF5 file's frames as (time_s, duration_s, av.VideoFrame); frame j is at j / fps."""

    def __init__(self, store: FrameStore, fps: float, start: float):
        self.store, self.fps, self.start = store, fps, start
        self.decoded = 0
        self.error: str | None = None
        self.finished = False
        self.end_time = 0.0

    def __iter__(self) -> Iterator[tuple[float, float, av.VideoFrame]]:
        first = max(0, math.floor(self.start * self.fps + 1e-6))  # the frame on screen at `start`
        try:
            for a in range(first, len(self.store), STORE_READ_FRAMES):
                block = self.store.frames[a : a + STORE_READ_FRAMES]  # [n, H, W, 3]
                for k, image in enumerate(block):
                    self.decoded += 1
                    self.end_time = (a + k + 1) / self.fps
                    yield (a + k) / self.fps, 1 / self.fps, av.VideoFrame.from_ndarray(image, format="rgb24")
            self.finished = True
        finally:
            self.store.close()


def _open_source(source: Path, fps: float, start: float) -> tuple[VideoInfo, DecodedFrames | StoredFrames, float]:
    """The source's header, its frame iterator, and the timestamp tolerance for resampling."""
    if not h5py.is_hdf5(source):
        info = probe_video(source)
        return info, DecodedFrames(info, start), timestamp_tolerance(info.time_base)
    store = open_frame_store(source)
    if store.channels != 3:
        raise TinyWorldsError(f"{source}: HDF5 source `frames` must be RGB [N, H, W, 3], not {store.channels} channel(s)")
    source_fps = store.fps or fps
    n, height, width = store.frames.shape[:3]
    info = VideoInfo(path=source, codec="hdf5", width=width, height=height, pix_fmt="rgb24", fps=source_fps,
                     frames=n, frames_exact=True, duration=n / source_fps, time_base=None)
    return info, StoredFrames(store, source_fps, start), 1e-6


def _check_fits_source(source: Path, info: VideoInfo, crop, start: float) -> None:
    if crop is not None and (crop[0] + crop[2] > info.width or crop[1] + crop[3] > info.height):
        box = tuple(crop)
        raise TinyWorldsError(f"{source}: crop box {box} (x, y, w, h) lies outside the {info.width}x{info.height} frame")
    if info.duration and start >= info.duration:
        raise TinyWorldsError(f"{source}: start {start:g} s is not before the end of the video ({info.duration:.2f} s)")


def _find_sidecar(source: Path, actions: Path | None, info: VideoInfo) -> ActionSidecar | None:
    """The given sidecar, else SOURCE's .true_actions.json if it exists; checked against the video."""
    path = Path(actions) if actions is not None else source.with_suffix(".true_actions.json")
    if actions is None and not path.exists():
        return None
    sidecar = load_sidecar(path)
    if info.codec != "hdf5" and info.fps and abs(info.fps - sidecar.fps) > 0.01 * sidecar.fps:
        raise TinyWorldsError(f"{path}: is for {sidecar.fps:g} fps, but {source} is {info.fps:g} fps")
    if info.codec != "hdf5" and info.frames_exact and info.frames != len(sidecar.actions):
        raise TinyWorldsError(f"{path}: has {len(sidecar.actions)} frames, but {source} declares {info.frames}")
    return sidecar


def _partial_reason(frames: DecodedFrames | StoredFrames, info: VideoInfo, start: float, end: float) -> str | None:
    """Why the decode ended short of what the container declares, or None if it did not."""
    if frames.error:
        return f"decoding failed after {frames.decoded} frames ({frames.end_time:.2f} s): {frames.error}"
    if not frames.finished:  # resampling stopped it at `end`, as asked
        return None
    if info.frames_exact and start == 0 and frames.decoded < info.frames:
        return f"decoded {frames.decoded} of the {info.frames} frames the container declares"
    slack = 2 / info.fps if info.fps else 0.1
    if info.duration and frames.end_time < min(end, info.duration) - slack:
        return f"frames stop at {frames.end_time:.2f} s of the {info.duration:.2f} s the container declares"
    return None


class ZarrFrameWriter:
    """Appends frame chunks to a zarr v3 group; see the module docstring for the layout."""

    chunk_frames = ZARR_CHUNK_FRAMES

    def __init__(self, path: Path, size: int, channels: int):
        self.group = zarr.open_group(path, mode="w", zarr_format=3)
        self.frames = self.group.create_array(
            "frames", shape=(0, size, size, channels), chunks=(self.chunk_frames, size, size, channels),
            dtype="uint8", compressors=ZARR_COMPRESSOR, fill_value=0, dimension_names=("T", "H", "W", "C"),
            # zarr's check for all-fill chunks costs most of a chunk write, and a chunk of
            # video frames is practically never all black.
            config={"write_empty_chunks": True},
            # Flat chunk files (c.0.0.0.0) instead of a directory per chunk (c/0/0/0/0): creating
            # and deleting those directories took longer than decoding the video.
            chunk_key_encoding={"name": "default", "separator": "."},
        )

    def append(self, block: np.ndarray) -> None:  # block: [n, H, W, C]
        self.frames.append(block, axis=0)

    def finish(self, actions: np.ndarray | None, attrs: dict) -> None:
        if actions is not None:
            self.group.create_array("true_actions", data=actions, chunks=(max(1, len(actions)),),
                                    compressors=ZARR_COMPRESSOR, dimension_names=("T",))
        self.group.attrs.update(attrs)

    def close(self) -> None:
        pass


class Hdf5FrameWriter:
    """Appends frame chunks to an HDF5 file with the same names and attributes as the zarr store."""

    chunk_frames = HDF5_CHUNK_FRAMES

    def __init__(self, path: Path, size: int, channels: int):
        self.file = h5py.File(path, "w")
        self.frames = self.file.create_dataset(
            "frames", shape=(0, size, size, channels), maxshape=(None, size, size, channels),
            chunks=(self.chunk_frames, size, size, channels), dtype="uint8", **HDF5_COMPRESSION,
        )

    def append(self, block: np.ndarray) -> None:  # block: [n, H, W, C]
        n = self.frames.shape[0]
        self.frames.resize(n + len(block), axis=0)
        self.frames[n:] = block

    def finish(self, actions: np.ndarray | None, attrs: dict) -> None:
        if actions is not None:
            self.file.create_dataset("true_actions", data=actions, dtype="int16")
        for key, value in attrs.items():
            if value is None:
                continue
            if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
                value = np.array(value, dtype=h5py.string_dtype())
            self.file.attrs[key] = value

    def close(self) -> None:
        self.file.close()


@contextlib.contextmanager
def _writer(fmt: str, path: Path, size: int, channels: int) -> Iterator[ZarrFrameWriter | Hdf5FrameWriter]:
    writer = (ZarrFrameWriter if fmt == "zarr" else Hdf5FrameWriter)(path, size, channels)
    try:
        yield writer
    finally:
        writer.close()


def _progress(enabled: bool) -> Progress:
    """A bar of output frames on stderr; off when asked or when stderr is not a terminal."""
    console = Console(stderr=True)
    return Progress(
        TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=True, disable=not (enabled and console.is_terminal),
    )


def _stream_frames(
    picked: Iterator[tuple[float, av.VideoFrame]],
    shaper: FrameShaper,
    writer: ZarrFrameWriter | Hdf5FrameWriter,
    sidecar: ActionSidecar | None,
    bar: Progress,
    total: int | None,
) -> tuple[int, np.ndarray | None]:
    """Shape the picked frames and write them a chunk at a time; returns (frames, actions [N])."""
    task = bar.add_task("ingest", total=total)
    size, channels = shaper.geometry.size, shaper.channels
    chunk = np.empty((writer.chunk_frames, size, size, channels), np.uint8)  # [T, H, W, C]
    actions = array("h")
    n, shown_t, image = 0, None, None
    for t, frame in picked:
        if t != shown_t:  # a repeated frame (upsampling) is shaped once
            image, shown_t = shaper(frame), t  # [H, W, C]
        chunk[n % len(chunk)] = image
        if sidecar is not None:
            actions.append(sidecar.action_at(t))
        n += 1
        if n % len(chunk) == 0:
            writer.append(chunk)
            bar.advance(task, len(chunk))
    if n % len(chunk):
        writer.append(chunk[: n % len(chunk)])
    return n, (np.frombuffer(actions, np.int16) if sidecar is not None else None)


def ingest(
    source: Path,
    out: Path,
    *,
    size: int = 64,
    fps: float = 15.0,
    crop: tuple[int, int, int, int] | None = None,
    fit: str = "crop",
    start: float | None = None,
    end: float | None = None,
    grayscale: bool = False,
    fmt: str | None = None,
    allow_partial: bool = False,
    actions: Path | None = None,
    progress: bool = True,
) -> IngestReport:
    """Decode `source` (streaming), resample it to `fps`, shape it to size x size and write a store at `out`.

    `crop` (x, y, w, h, source pixels) applies first, then `fit` for a non-square box
    ("crop" centre square, "pad" letterbox, "stretch"); `start`/`end` are seconds; `fmt` is
    "zarr" or "hdf5" (default: from the suffix of `out`). A video that decodes short of
    what its container declares is an error unless `allow_partial`, which keeps the
    decodable frames and records partial/partial_reason. `actions` is the sidecar (default:
    SOURCE with its suffix replaced by ".true_actions.json", when that exists).
    """
    began = time.perf_counter()
    source, out = Path(source), Path(out)
    _check_options(source, size, fps, crop, fit, start, end)
    fmt = output_format(out, fmt)
    check_source_file(source)
    _check_out(out, fmt, source)
    start_s, end_s = float(start or 0.0), float(end) if end is not None else math.inf

    info, frames, tol = _open_source(source, fps, start_s)
    _check_fits_source(source, info, crop, start_s)
    sidecar = _find_sidecar(source, actions, info)
    geometry = plan_geometry(info.width, info.height, size, crop, fit)
    shaper = FrameShaper((info.width, info.height), geometry, grayscale, source)
    attrs = {
        "tinyworlds_version": tinyworlds.__version__,
        "source": str(source),
        "source_sha256": file_sha256(source),
        "source_kind": "hdf5" if isinstance(frames, StoredFrames) else "video",
        "source_codec": info.codec,
        "source_width": info.width,
        "source_height": info.height,
        "source_fps": info.fps,
        "source_frames": info.frames,
        "source_duration": info.duration,
        "fps": float(fps),
        "size": size,
        "channels": shaper.channels,
        "fit": fit,
        "crop": list(crop) if crop is not None else None,
        "crop_box": list(geometry.crop),
        "start": start,
        "end": end,
    }
    if sidecar is not None:
        attrs |= {"actions_sidecar": str(sidecar.path), "game": sidecar.game,
                  "action_meanings": sidecar.action_meanings}

    span = min(end_s, info.duration or math.inf) - start_s
    total = math.ceil(span * fps) if math.isfinite(span) else None  # for the progress bar

    with atomic_output(out) as tmp, _writer(fmt, tmp, size, shaper.channels) as writer, _progress(progress) as bar:
        picked = resample(frames, fps, start_s, end_s, tol)
        n, picked_actions = _stream_frames(picked, shaper, writer, sidecar, bar, total)
        reason = _partial_reason(frames, info, start_s, end_s)
        if n == 0:
            why = f"({reason})" if reason else f"from {start_s:g} s to {end_s:g} s"
            raise TinyWorldsError(f"{source}: no decodable frames {why}")
        if reason and not allow_partial:
            raise TinyWorldsError(f"{source}: {reason}; allow_partial (--allow-partial) keeps the {n} frames before it")
        attrs |= {"frames": n, "frames_decoded": frames.decoded,
                  "partial": reason is not None, "partial_reason": reason}
        writer.finish(picked_actions, attrs)

    return IngestReport(
        source=source, out=out, fmt=fmt, frames=n, size=size, channels=shaper.channels, fps=float(fps),
        frames_decoded=frames.decoded, partial=reason is not None, partial_reason=reason,
        actions=sidecar is not None, seconds=time.perf_counter() - began,
    )
