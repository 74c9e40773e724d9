"""Frames to things people look at: labelled, upscaled frames, side-by-side tiles, mp4 and gif.

Every function takes a clip of uint8 frames as a numpy array or torch tensor, either
[T, H, W, C] or [T, C, H, W] (C = 1 or 3; told apart by which axis has 1 or 3 entries, the
last one first), and works on [T, H, W, 3] RGB internally. Used by the evaluate stage and by
`tinyworlds dream`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
from einops import rearrange, repeat

from tinyworlds.core.atomic import atomic_output
from tinyworlds.core.errors import TinyWorldsError

STRIP_PADDING = 2  # pixels of strip above and below a label
GAP_COLOUR = 96  # grey between tiles


def as_rgb_frames(frames) -> np.ndarray:
    """uint8 frames [T, H, W, C] or [T, C, H, W] (numpy or torch, C = 1 or 3) -> [T, H, W, 3]."""
    array = frames.detach().cpu().numpy() if hasattr(frames, "detach") else np.asarray(frames)
    if array.dtype != np.uint8 or array.ndim != 4:
        raise TinyWorldsError(
            f"expected uint8 frames [T, H, W, C] or [T, C, H, W], got {array.dtype} {list(array.shape)}"
        )
    if array.shape[-1] not in (1, 3):
        if array.shape[1] not in (1, 3):
            raise TinyWorldsError(f"frames {list(array.shape)}: no axis of 1 or 3 channels")
        array = rearrange(array, "t c h w -> t h w c")
    if array.shape[-1] == 1:
        array = repeat(array, "t h w 1 -> t h w c", c=3)
    return np.ascontiguousarray(array)


def label_font():
    """Pillow's built-in bitmap font (about 6 x 11 pixels a character, no font file needed)."""
    from PIL import ImageFont

    # Pillow >= 10.1 made load_default() return a FreeType font; the bitmap one moved here.
    loader = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)
    return loader()


def annotate(frames, labels: Sequence[str | None], scale: int = 4) -> np.ndarray:
    """Upscale each frame `scale` x with nearest neighbour and write its label on a strip below.

    frames: uint8 clip [T, H, W, C] or [T, C, H, W]; labels: one string (or None) per frame.
    Returns uint8 [T, H*scale + strip, W*scale, 3]: white text on black, left-aligned, cut at
    the right edge if too long.
    """
    from PIL import Image, ImageDraw

    clip = as_rgb_frames(frames)
    if len(labels) != len(clip):
        raise TinyWorldsError(f"annotate: {len(labels)} labels for {len(clip)} frames")
    if not (isinstance(scale, int) and scale >= 1):
        raise TinyWorldsError(f"annotate: scale={scale!r} must be a whole number >= 1")
    font = label_font()
    text_height = max(font.getbbox(text or "Ag")[3] for text in [*labels, "Ag"])
    strip = text_height + 2 * STRIP_PADDING
    big = clip.repeat(scale, axis=1).repeat(scale, axis=2)  # [T, H*s, W*s, 3]
    t, h, w, _ = big.shape
    out = np.zeros((t, h + strip, w, 3), dtype=np.uint8)  # [T, H*s + strip, W*s, 3]
    out[:, :h] = big
    for i, text in enumerate(labels):
        if not text:
            continue
        image = Image.fromarray(out[i, h:])
        ImageDraw.Draw(image).text((STRIP_PADDING, STRIP_PADDING), str(text), fill=(255, 255, 255), font=font)
        out[i, h:] = np.asarray(image)
    return out


def tile(rows: Sequence[Sequence], gap: int = 2) -> np.ndarray:
    """Clips laid out in rows and columns -> one clip [T, H_total, W_total, 3], grey gaps between.

    rows: a list of rows, each a list of clips of the same length T (any of the accepted
    layouts); clips in a row need the same height, rows the same total width.
    """
    built = []
    for row in rows:
        clips = [as_rgb_frames(clip) for clip in row]
        lengths = {len(clip) for clip in clips}
        heights = {clip.shape[1] for clip in clips}
        if len(lengths) != 1 or len(heights) != 1:
            raise TinyWorldsError(f"tile: clips in a row need one length and height, got {[c.shape for c in clips]}")
        spacer = np.full((clips[0].shape[0], clips[0].shape[1], gap, 3), GAP_COLOUR, dtype=np.uint8)
        built.append(np.concatenate([part for clip in clips for part in (clip, spacer)][:-1], axis=2))
    if len({row.shape[0] for row in built}) != 1 or len({row.shape[2] for row in built}) != 1:
        raise TinyWorldsError(f"tile: rows need one length and width, got {[row.shape for row in built]}")
    spacer = np.full((built[0].shape[0], gap, built[0].shape[2], 3), GAP_COLOUR, dtype=np.uint8)
    return np.concatenate([part for row in built for part in (row, spacer)][:-1], axis=1)


def write_mp4(frames, path: str | os.PathLike, fps: float = 15, crf: int = 18) -> Path:
    """Encode a clip as H.264 (yuv420p, plays everywhere) with PyAV; written atomically.

    Odd heights or widths are padded by one black row or column (yuv420p needs even sizes).
    `crf` is x264's quality: 0 lossless, 18 visually lossless, 23 its default.
    """
    import av

    clip = as_rgb_frames(frames)
    t, h, w, _ = clip.shape
    clip = np.pad(clip, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    path = Path(path)
    with atomic_output(path) as tmp:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.height, stream.width = clip.shape[1:3]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for image in clip:
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path


def write_gif(frames, path: str | os.PathLike, fps: float = 15, loop: bool = True) -> Path:
    """Write a clip as an animated GIF with Pillow (256 colours per frame); written atomically.

    GIF delays are whole hundredths of a second, so the rate is rounded to the nearest one
    (15 fps plays at 1/0.07 = 14.3 fps).
    """
    from PIL import Image

    clip = as_rgb_frames(frames)
    images = [Image.fromarray(image) for image in clip]
    duration_ms = max(10, round(100 / fps) * 10)
    path = Path(path)
    with atomic_output(path) as tmp:
        looping = {"loop": 0} if loop else {}  # 0: forever; no loop entry: play once
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms,
                       disposal=1, **looping)
    return path
