"""Ingest a gameplay video (or a TinyWorlds HDF5 file) into a frame store, streaming.

The store, a zarr v3 group directory (`NAME.zarr`) or an HDF5 file (`NAME.h5`), holds
  frames   uint8 [N, H, W, C], H = W = size, C = 3 (RGB) or 1 (grayscale luma),
           chunked along time and compressed (choice and figures below);
  true_actions  int16 [N], only with a sidecar (NAME.true_actions.json): the ground-truth action
           of the source frame each output frame shows (resampled with the frames);
  player_position  float32 [N], only with a sidecar that has `player_position`: the
           player's position in the source frame each output frame shows, aligned exactly
           like `true_actions` (NaN where the sidecar has null);
  segment  int32 [N], only with `drop_idle`: 0 for the first frame, and one more after each
           place where idle frames were dropped, so consecutive frames of one segment are
           consecutive in the video and a clip that stays in one segment never joins
           frames across a cut (the clip readers do not look at it yet);
and these attributes: tinyworlds_version; source, source_sha256, source_kind ("video" or
"hdf5"), source_codec, source_width, source_height, source_fps, source_frames (declared),
source_duration; fps, size, channels, fit, crop (as given, [x, y, w, h] or null),
crop_box (the box actually resized, after `fit`), start, end; frames (N), frames_decoded
(source frames decoded), partial, partial_reason; with a sidecar also actions_sidecar,
game, action_meanings, and player_axis when it has positions; with drop_idle also
drop_idle, idle_tolerance and frames_dropped_idle. (HDF5 cannot store null: such
attributes are left out there.)

Idle frames (`drop_idle`, default None: keep every frame). An output frame is idle when it
matches the output frame before it (whether that one is kept or not) to within
IDLE_TOLERANCE: the largest absolute difference of any pixel channel, after cropping and
resizing, is at most 8 of 255. Measured on 4,000-frame Pong and Breakout recordings
ingested at 64x64 and 15 fps (params.yaml crops): a still screen differs by at most 4 (the
recording's H.264 noise, e.g. at a keyframe), the smallest real change (a ball or paddle
moving) by 22. In a run of more than `drop_idle` consecutive idle frames the first
`drop_idle` are kept and the rest dropped (0 drops every idle frame); the kept frames keep
their own actions and positions. In Breakout's sticky random play, which waits for FIRE
after every lost life, 31% of output frames were idle (Pong 4%); on 16,000-frame
recordings drop_idle 8 dropped 15% of Breakout's sticky random frames (1% of Pong's) and
none of Breakout's `balanced` ones.

Frames are picked by timestamp and shaped as `tinyworlds.data.video` describes. Peak
memory does not grow with the video: one chunk of output frames is buffered and written
as soon as it is full; only the per-frame arrays (actions, position, segment: 10 bytes per
output frame at most) are kept to the end.

A TinyWorlds HDF5 source (a `frames` dataset [N, H, W, 3] uint8) is re-shaped the same
way (area resize when its size differs, grayscale if asked). Its frame j is at time
j / source_fps, where source_fps is its `fps` attribute when it has one (then it is
resampled to `fps` like a video) and otherwise `fps` itself (then no frame is dropped
or repeated).

True-actions sidecar (NAME.true_actions.json, written by `tinyworlds record`): JSON {"game": str, "fps": float,
"frames": N, "action_meanings": [str, ...], "actions": [int per source frame]}, where
actions[j] was applied at source frame j, i.e. at time j / sidecar fps; optionally
"player_axis": "x" or "y" and "player_position": [number or null per source frame], the
player's position shown in source frame j (`tinyworlds record` with record_state). Other
keys are ignored.

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
IDLE_TOLERANCE = 8  # max abs pixel difference (0-255) of an idle frame to the one before it


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
    frames_dropped_idle: int | None = None  # with drop_idle: idle output frames dropped

    def summary(self) -> str:
        """One line for the CLI."""
        parts = [f"{self.frames_decoded} source frames decoded in {self.seconds:.1f} s"]
        if self.actions:
            parts.append("with actions")
        if self.frames_dropped_idle is not None:
            parts.append(f"{self.frames_dropped_idle} idle frames dropped")
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
    player_axis: str | None = None  # "x" or "y", with player_position
    player_position: np.ndarray | None = None  # [source frames] float32, NaN where unknown

    def frame_at(self, t: float) -> int:
        """The source frame shown from time `t` (seconds)."""
        j = round(t * self.fps)
        if not 0 <= j < len(self.actions):
            raise TinyWorldsError(
                f"{self.path}: has actions for {len(self.actions)} frames, "
                f"but the video has a frame at {t:.3f} s (frame {j})"
            )
        return j

    def action_at(self, t: float) -> int:
        """The action applied at the source frame shown from time `t` (seconds)."""
        return int(self.actions[self.frame_at(t)])


def _number_or_null(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


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
    axis, positions = doc.get("player_axis"), doc.get("player_position")
    if positions is not None:
        if not (isinstance(positions, list) and len(positions) == len(actions) and all(map(_number_or_null, positions))):
            raise TinyWorldsError(
                f"{path}: player_position must list a number or null for each of the {len(actions)} frames")
        if axis not in ("x", "y"):
            raise TinyWorldsError(f"{path}: player_axis must be \"x\" or \"y\" with player_position, got {axis!r}")
        positions = np.array([math.nan if v is None else v for v in positions], dtype=np.float32)
    return ActionSidecar(path, str(doc["game"]), float(fps), meanings, np.asarray(actions, dtype=np.int16),
                         axis if positions is not None else None, positions)


def output_format(out: Path, fmt: str | None) -> str:
    """The store format: `fmt` if given, else from the suffix of `out`."""
    if fmt is not None:
        if fmt not in ("zarr", "hdf5"):
            raise TinyWorldsError(f"{out}: unknown format {fmt!r} (use zarr or hdf5)")
        return fmt
    if out.suffix.lower() not in FORMATS:
        raise TinyWorldsError(f"{out}: cannot tell the format from the suffix {out.suffix!r} (use .zarr, .h5 or .hdf5)")
    return FORMATS[out.suffix.lower()]


def _check_options(source, size, fps, crop, fit, start, end, drop_idle=None) -> None:
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
    if drop_idle is not None and (isinstance(drop_idle, bool) or not isinstance(drop_idle, (int, np.integer))
                                  or drop_idle < 0):
        raise TinyWorldsError(f"{source}: drop_idle={drop_idle!r}: must be a whole number of frames >= 0, "
                              "or None to keep every frame")


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

    def finish(self, arrays: dict[str, np.ndarray], attrs: dict) -> None:
        for name, data in arrays.items():  # per-frame arrays [N]: true_actions, player_position, segment
            self.group.create_array(name, data=data, chunks=(max(1, len(data)),),
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

    def finish(self, arrays: dict[str, np.ndarray], attrs: dict) -> None:
        for name, data in arrays.items():  # per-frame arrays [N]: true_actions, player_position, segment
            self.file.create_dataset(name, data=data, dtype=data.dtype)
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
    drop_idle: int | None = None,
) -> tuple[int, dict[str, np.ndarray], int]:
    """Shape the picked frames, drop idle ones (`drop_idle`) and write the rest a chunk at a time.

    Returns (frames written, the per-frame arrays for `writer.finish`, idle frames dropped).
    """
    task = bar.add_task("ingest", total=total)
    size, channels = shaper.geometry.size, shaper.channels
    chunk = np.empty((writer.chunk_frames, size, size, channels), np.uint8)  # [T, H, W, C]
    actions, positions, segment = array("h"), array("f"), array("i")
    keep_positions = sidecar is not None and sidecar.player_position is not None
    n, shown_t, image = 0, None, None
    previous, idle_run, dropped, cut, segment_id = None, 0, 0, False, 0
    for t, frame in picked:
        repeated = t == shown_t
        if not repeated:  # a repeated frame (upsampling) is shaped once
            image, shown_t = shaper(frame), t  # [H, W, C]
        j = sidecar.frame_at(t) if sidecar is not None else None  # checked for dropped frames too
        if drop_idle is not None:
            idle = previous is not None and (
                repeated or int(np.abs(image.astype(np.int16) - previous).max()) <= IDLE_TOLERANCE)
            previous = image
            idle_run = idle_run + 1 if idle else 0
            if idle_run > drop_idle:
                dropped, cut = dropped + 1, True
                continue
            if cut:
                segment_id, cut = segment_id + 1, False
            segment.append(segment_id)
        chunk[n % len(chunk)] = image
        if sidecar is not None:
            actions.append(int(sidecar.actions[j]))
            if keep_positions:
                positions.append(float(sidecar.player_position[j]))
        n += 1
        if n % len(chunk) == 0:
            writer.append(chunk)
            bar.advance(task, len(chunk))
    if n % len(chunk):
        writer.append(chunk[: n % len(chunk)])
    arrays = {}
    if sidecar is not None:
        arrays["true_actions"] = np.frombuffer(actions, np.int16)
    if keep_positions:
        arrays["player_position"] = np.frombuffer(positions, np.float32)
    if drop_idle is not None:
        arrays["segment"] = np.frombuffer(segment, np.int32)
    return n, arrays, dropped


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
    drop_idle: int | None = None,
) -> IngestReport:
    """Decode `source` (streaming), resample it to `fps`, shape it to size x size and write a store at `out`.

    `crop` (x, y, w, h, source pixels) applies first, then `fit` for a non-square box
    ("crop" centre square, "pad" letterbox, "stretch"); `start`/`end` are seconds; `fmt` is
    "zarr" or "hdf5" (default: from the suffix of `out`). A video that decodes short of
    what its container declares is an error unless `allow_partial`, which keeps the
    decodable frames and records partial/partial_reason. `actions` is the sidecar (default:
    SOURCE with its suffix replaced by ".true_actions.json", when that exists); with a sidecar
    that has the player's position it is stored too, aligned with the actions.
    `drop_idle` drops the idle frames of every run of more than `drop_idle` of them
    (module docstring); since that joins frames that were not consecutive into one
    sequence, the store then gets a `segment` array, a new id after each cut, for clip
    readers to avoid crossing cuts. None (default) keeps every frame.
    """
    began = time.perf_counter()
    source, out = Path(source), Path(out)
    _check_options(source, size, fps, crop, fit, start, end, drop_idle)
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
        if sidecar.player_position is not None:
            attrs["player_axis"] = sidecar.player_axis

    span = min(end_s, info.duration or math.inf) - start_s
    total = math.ceil(span * fps) if math.isfinite(span) else None  # for the progress bar

    with atomic_output(out) as tmp, _writer(fmt, tmp, size, shaper.channels) as writer, _progress(progress) as bar:
        picked = resample(frames, fps, start_s, end_s, tol)
        n, arrays, dropped = _stream_frames(picked, shaper, writer, sidecar, bar, total, drop_idle)
        reason = _partial_reason(frames, info, start_s, end_s)
        if n == 0:
            why = f"({reason})" if reason else f"from {start_s:g} s to {end_s:g} s"
            raise TinyWorldsError(f"{source}: no decodable frames {why}")
        if reason and not allow_partial:
            raise TinyWorldsError(f"{source}: {reason}; allow_partial (--allow-partial) keeps the {n} frames before it")
        attrs |= {"frames": n, "frames_decoded": frames.decoded,
                  "partial": reason is not None, "partial_reason": reason}
        if drop_idle is not None:
            attrs |= {"drop_idle": int(drop_idle), "idle_tolerance": IDLE_TOLERANCE, "frames_dropped_idle": dropped}
        writer.finish(arrays, attrs)

    return IngestReport(
        source=source, out=out, fmt=fmt, frames=n, size=size, channels=shaper.channels, fps=float(fps),
        frames_decoded=frames.decoded, partial=reason is not None, partial_reason=reason,
        actions=sidecar is not None, seconds=time.perf_counter() - began,
        frames_dropped_idle=dropped if drop_idle is not None else None,
    )
