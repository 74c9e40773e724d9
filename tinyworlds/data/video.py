"""Probe and stream-decode videos with PyAV, and shape their frames for a frame store.

Time. A frame's time is its presentation timestamp (pts * time_base) minus the stream's
start time, in seconds, so variable-frame-rate video keeps its real timing. `resample`
picks output frames by time: output frame i is at `start + i / fps` and shows the latest
source frame whose time is <= that (a source frame that starts within one container tick,
at most 1 ms, after it counts as at it: Matroska/WebM round timestamps to the millisecond).
An output time before the first decoded frame shows the first frame. Output stops before
`end`, or when the last source frame's display interval (its time plus its duration) ends.
Upsampling repeats frames; downsampling drops them; nothing is blended.

Geometry. Each picked frame goes through one FFmpeg filter graph, built once per video:
  1. `crop`: the user's box (x, y, w, h) in source pixels, exact to the pixel;
  2. `fit` for a box that is not square:
       "crop"    the centred square of side min(w, h) (the default; loses the edges),
       "pad"     resize the whole box so its longer side is `size` and letterbox it with
                 black bars, centred (keeps everything, wastes pixels),
       "stretch" resize the box to size x size, distorting the aspect ratio (explicit only);
  3. `scale` with the area filter (each output pixel averages the source pixels it covers),
     converting to RGB (3 channels) or grayscale luma (1 channel) in the same pass.
The graph runs single-threaded: at Atari sizes it is cheaper than a reused VideoReformatter
resize plus a numpy crop, and FFmpeg's own filter threads only add overhead (figures in
bench/README.md, "Ingest").
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TypeVar

import av
import av.logging
import numpy as np

from tinyworlds.core.errors import TinyWorldsError

FITS = ("crop", "pad", "stretch")

# Decoding small frames with FFmpeg's threads is slower than with one thread; from about
# 320x240 up threads win (figures in bench/README.md, "Ingest").
SINGLE_THREAD_MAX_PIXELS = 64_000

Item = TypeVar("Item")


@dataclass(frozen=True)
class VideoInfo:
    """What a video's container says about its first video stream."""

    path: Path
    codec: str
    width: int
    height: int
    pix_fmt: str
    fps: float  # average frame rate the container declares; 0.0 when it declares none
    frames: int  # declared frame count: the container's, else round(duration * fps), else 0
    frames_exact: bool  # True when the container stores the frame count itself
    duration: float  # seconds of video (not of other streams); 0.0 when unknown
    time_base: Fraction | None  # the stream's timestamp unit


@contextlib.contextmanager
def ffmpeg_log() -> Iterator[list]:
    """Collect FFmpeg's error lines (instead of printing them) so messages can quote them."""
    previous = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)
    try:
        with av.logging.Capture() as logs:
            yield logs
    finally:
        av.logging.set_level(previous)


def ffmpeg_detail(err: Exception, logs: list) -> str:
    """The most telling one-line reason for an FFmpeg failure."""
    detail = logs[-1][2].strip().rstrip(".") if logs else (getattr(err, "strerror", None) or str(err))
    if "moov atom not found" in detail:
        detail += ": the mp4 index is missing, e.g. the file was cut off while being written"
    return detail.replace("\n", " ")


def check_source_file(path: Path) -> None:
    """Fail with one line if `path` is not a readable, non-empty regular file."""
    if not path.exists():
        raise TinyWorldsError(f"{path}: no such file")
    if path.is_dir():
        raise TinyWorldsError(f"{path}: is a directory, not a video file")
    if not os.access(path, os.R_OK):
        raise TinyWorldsError(f"{path}: not readable (permission denied)")
    if path.stat().st_size == 0:
        raise TinyWorldsError(f"{path}: file is empty")


def _open(path: Path, logs: list) -> av.container.InputContainer:
    try:
        return av.open(str(path))
    except av.FFmpegError as err:
        raise TinyWorldsError(f"{path}: not a video FFmpeg can read ({ffmpeg_detail(err, logs)})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise TinyWorldsError(f"{path}: cannot open ({err})") from None


def _video_stream(container, path: Path):
    if not container.streams.video:
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
        raise TinyWorldsError(f"{path}: has no video stream (streams: {kinds})")
    return container.streams.video[0]


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read a video's header; a one-line TinyWorldsError if it is not a usable video."""
    path = Path(path)
    check_source_file(path)
    with ffmpeg_log() as logs, _open(path, logs) as container:
        stream = _video_stream(container, path)
        ctx = stream.codec_context
        if not ctx.width or not ctx.height:
            raise TinyWorldsError(f"{path}: video stream has no picture size")
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        duration = _stream_duration(container, stream)
        exact = bool(stream.frames and stream.frames > 0)
        frames = stream.frames if exact else round(duration * fps)
        return VideoInfo(
            path=path,
            codec=ctx.name,
            width=ctx.width,
            height=ctx.height,
            pix_fmt=ctx.pix_fmt or "",
            fps=fps,
            frames=int(frames),
            frames_exact=exact,
            duration=duration,
            time_base=stream.time_base,
        )


def _stream_duration(container, stream) -> float:
    """Seconds of the video stream: its own duration, Matroska's per-track DURATION tag, or
    the container's when the video is its only stream (else it may be the audio's); 0 if unknown."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    if tag:
        with contextlib.suppress(ValueError):
            hours, minutes, seconds = tag.split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    if container.duration is not None and len(container.streams) == 1:
        return container.duration / av.time_base
    return 0.0


def decoder_threads(width: int, height: int) -> int:
    """FFmpeg decoder threads for this frame size: 1 for small frames, else one per core."""
    return 1 if width * height <= SINGLE_THREAD_MAX_PIXELS else (os.cpu_count() or 1)


class DecodedFrames:
    """A video's frames as `(time_s, duration_s, av.VideoFrame)`, decoded once, streaming.

    Seeks once, to the keyframe at or before `start`, when `start` > 0. A decoder error
    ends the iteration instead of raising. Afterwards `decoded` counts the frames that came
    out, `end_time` is when the last one stops showing, `finished` says whether the decoder
    reached the end of the stream, and `error` holds FFmpeg's reason for stopping, or None.
    """

    def __init__(self, info: VideoInfo, start: float = 0.0):
        self.info = info
        self.start = start
        self.decoded = 0
        self.error: str | None = None
        self.finished = False  # True once the decoder reached the end of the stream
        self.end_time = 0.0  # when the last decoded frame stops showing (time + duration)

    def __iter__(self) -> Iterator[tuple[float, float, av.VideoFrame]]:
        path = self.info.path
        with ffmpeg_log() as logs, _open(path, logs) as container:
            stream = _video_stream(container, path)
            stream.codec_context.thread_count = decoder_threads(self.info.width, self.info.height)
            stream.thread_type = "AUTO"
            tb = float(stream.time_base or Fraction(1, 1_000_000))
            origin = stream.start_time or 0
            if self.start > 0:
                target = origin + int(self.start / tb)
                with contextlib.suppress(av.FFmpegError):  # unseekable: decode from the top
                    container.seek(target, stream=stream, backward=True, any_frame=False)
            fallback_dur = 1.0 / self.info.fps if self.info.fps > 0 else 0.0
            t = -fallback_dur
            try:
                for frame in container.decode(stream):
                    # A frame without a timestamp follows the previous one at the average rate.
                    t = (frame.pts - origin) * tb if frame.pts is not None else t + fallback_dur
                    dur = frame.duration * tb if frame.duration else fallback_dur
                    self.decoded += 1
                    self.end_time = t + dur
                    yield t, dur, frame
                self.finished = True
            except av.FFmpegError as err:
                self.error = ffmpeg_detail(err, logs)


def timestamp_tolerance(time_base: Fraction | None) -> float:
    """Seconds within which two timestamps count as equal: one container tick, at most 1 ms."""
    return min(float(time_base), 1e-3) if time_base else 1e-3


def resample(
    frames: Iterable[tuple[float, float, Item]],
    fps: float,
    start: float = 0.0,
    end: float = math.inf,
    tol: float = 1e-3,
) -> Iterator[tuple[float, Item]]:
    """Pick output frames by time (rule in the module docstring); yields (source time, item).

    `frames` are (time_s, duration_s, item) in presentation order. Stops consuming them at
    the first one that starts after `end`, so a clip from a long video decodes only its part.
    """
    i = 0
    prev: tuple[float, float, Item] | None = None  # the latest frame so far: what is on screen
    for t, dur, item in frames:
        if t >= end + tol:
            break
        shown = prev or (t, dur, item)  # before the first frame, the first frame stands in
        # Every output time before this frame's is now settled: it shows `shown`.
        while (out_t := start + i / fps) < end - 1e-9 and out_t < t - tol:
            yield shown[0], shown[2]
            i += 1
        if prev is None or t > prev[0]:  # a timestamp going backwards is ignored
            prev = (t, dur, item)
    else:  # the stream ran out: its last frame shows until its display interval ends
        if prev is not None:
            end = min(end, prev[0] + prev[1] - tol)
    if prev is None:
        return
    while start + i / fps < end - 1e-9:
        yield prev[0], prev[2]
        i += 1


@dataclass(frozen=True)
class Geometry:
    """Where a source frame's pixels go: crop box, area-resize target, letterbox offsets."""

    crop: tuple[int, int, int, int]  # x, y, w, h in source pixels
    scaled: tuple[int, int]  # (w, h) after the area resize
    pad: tuple[int, int]  # (left, top) black border in output pixels; (0, 0) unless fit="pad"
    size: int


def plan_geometry(width: int, height: int, size: int, crop: tuple[int, int, int, int] | None, fit: str) -> Geometry:
    """Apply the crop box and the `fit` rule (module docstring) to a width x height source."""
    x, y, w, h = crop if crop is not None else (0, 0, width, height)
    if fit == "crop" and w != h:
        side = min(w, h)
        x, y, w, h = x + (w - side) // 2, y + (h - side) // 2, side, side
    scaled, pad = (size, size), (0, 0)
    if fit == "pad" and w != h:
        long_side = max(w, h)
        scaled = (max(1, round(size * w / long_side)), max(1, round(size * h / long_side)))
        pad = ((size - scaled[0]) // 2, (size - scaled[1]) // 2)
    return Geometry(crop=(x, y, w, h), scaled=scaled, pad=pad, size=size)


class FrameShaper:
    """Crop, area-resize, letterbox and convert frames: `shaper(frame) -> [size, size, C] uint8`."""

    def __init__(self, source_size: tuple[int, int], geometry: Geometry, grayscale: bool, source: object = "video"):
        self.source = source  # named in errors
        self.source_size = source_size  # (width, height)
        self.geometry = geometry
        self.channels = 1 if grayscale else 3
        self._pix_fmt = "gray" if grayscale else "rgb24"
        self._graph: av.filter.Graph | None = None
        self._input_format: str | None = None

    def _build(self, frame: av.VideoFrame) -> av.filter.Graph:
        g = self.geometry
        x, y, w, h = g.crop
        graph = av.filter.Graph()
        graph.threads = 1  # filter threads only add overhead on frames this small
        nodes = [graph.add_buffer(width=frame.width, height=frame.height, format=frame.format.name,
                                  time_base=Fraction(1, 1000))]
        if (x, y, w, h) != (0, 0, *self.source_size):
            nodes.append(graph.add("crop", f"w={w}:h={h}:x={x}:y={y}:exact=1"))
        nodes.append(graph.add("scale", f"w={g.scaled[0]}:h={g.scaled[1]}:flags=area"))
        nodes.append(graph.add("format", self._pix_fmt))
        if g.scaled != (g.size, g.size):
            nodes.append(graph.add("pad", f"w={g.size}:h={g.size}:x={g.pad[0]}:y={g.pad[1]}:color=black"))
        nodes.append(graph.add("buffersink"))
        graph.link_nodes(*nodes).configure()
        return graph

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        if (frame.width, frame.height) != self.source_size:
            raise TinyWorldsError(
                f"{self.source}: frame size changes mid-stream from {self.source_size[0]}x{self.source_size[1]} "
                f"to {frame.width}x{frame.height} (not supported)"
            )
        if self._graph is None or frame.format.name != self._input_format:
            self._graph = self._build(frame)
            self._input_format = frame.format.name
        frame.pts = None  # the graph needs no timing; ours is kept outside it
        self._graph.push(frame)
        out = self._graph.pull().to_ndarray()
        return out.reshape(self.geometry.size, self.geometry.size, self.channels)  # [H, W, C]
