"""Labelled frames, tiles, mp4 and gif: shapes, pixels kept crisp, files that decode back."""

import av
import numpy as np
import pytest
import torch
from PIL import Image

from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.evaluation.media import (
    annotate,
    as_rgb_frames,
    tile,
    write_gif,
    write_mp4,
)


def clip(t=5, h=8, w=8, c=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, c), dtype=np.uint8)  # [T, H, W, C]


def test_both_layouts_and_gray_become_rgb_hwc():
    frames = clip()
    assert np.array_equal(as_rgb_frames(torch.from_numpy(frames).permute(0, 3, 1, 2)), frames)
    gray = clip(c=1)
    assert np.array_equal(as_rgb_frames(gray), np.repeat(gray, 3, axis=-1))
    with pytest.raises(TinyWorldsError, match="uint8"):
        as_rgb_frames(frames.astype(np.float32))


def test_annotate_upscales_with_nearest_neighbour_and_writes_each_label_below():
    frames = clip()
    out = annotate(frames, ["a=1", "a=2", None, "a=3", "a=1"], scale=3)
    assert out.shape[0] == 5 and out.shape[2] == 24 and out.shape[1] > 24
    # Each source pixel became a crisp 3x3 block.
    assert np.array_equal(out[:, :24:3, ::3], frames)
    assert np.array_equal(out[:, 1:24:3, 2::3], frames)
    strips = out[:, 24:]
    assert strips[2].max() == 0  # no label: a blank strip
    assert strips[0].max() == 255  # white text
    assert np.array_equal(strips[0], strips[4])  # same label, same pixels
    assert not np.array_equal(strips[0], strips[1])
    with pytest.raises(TinyWorldsError, match="labels"):
        annotate(frames, ["x"], scale=2)


def test_tile_lays_clips_out_with_gaps():
    a, b = clip(h=4, w=6), clip(h=4, w=5, seed=1)
    out = tile([[a, b], [b, a]], gap=1)
    assert out.shape == (5, 9, 12, 3)
    assert np.array_equal(out[:, :4, :6], a) and np.array_equal(out[:, 5:, 6:], a)
    assert (out[:, 4] == 96).all()


def test_mp4_decodes_back_with_every_frame(tmp_path):
    frames = np.zeros((7, 15, 17, 3), dtype=np.uint8)  # odd sizes get padded to even
    for t in range(7):
        frames[t, :, : 2 * t + 2] = 200  # a bar that grows
    path = write_mp4(frames, tmp_path / "clip.mp4", fps=5)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 5
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(decoded) == 7 and decoded[0].shape == (16, 18, 3)
    for t, image in enumerate(decoded):
        assert abs(image[:15, :17].astype(int) - frames[t]).mean() < 8
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


def test_gif_has_every_frame_and_loops(tmp_path):
    frames = annotate(clip(t=4), ["0", "1", "2", "3"], scale=2)
    path = write_gif(frames, tmp_path / "clip.gif", fps=10)
    with Image.open(path) as image:
        assert image.n_frames == 4 and image.info["loop"] == 0 and image.info["duration"] == 100
        image.seek(2)
        assert np.array_equal(np.asarray(image.convert("RGB")), frames[2])
