"""Ingest of real (tiny) videos: frame counts after resampling, shapes, content, attributes."""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest
import zarr

import tinyworlds
from tests.conftest import PALETTE, VP9, nearest_colour, solid_frames, write_video
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.data.ingest import ingest
from tinyworlds.data.stores import open_frame_store

CONTAINERS = [
    ("clip.mp4", "libx264", "h264"),
    ("clip.mkv", "ffv1", "ffv1"),
    ("clip.webm", VP9, VP9.replace("libvpx-", "").replace("libvpx", "vp8")),
    ("clip.avi", "mpeg4", "mpeg4"),
    ("clip.mov", "libx264", "h264"),
]


@pytest.mark.parametrize("name, encoder, codec", CONTAINERS)
def test_containers_resample_30_to_15_fps(make_video, tmp_path, name, encoder, codec):
    source = make_video(name, n=60, codec=encoder)  # 2 s at 30 fps, 48x36
    report = ingest(source, tmp_path / "out.zarr", size=32, fps=15, progress=False)
    assert report.frames == 30 and report.frames_decoded == 60 and not report.partial
    with open_frame_store(tmp_path / "out.zarr") as store:
        frames = store.frames[:]  # [N, H, W, C]
        assert frames.shape == (30, 32, 32, 3) and frames.dtype == np.uint8
        assert store.fps == 15 and store.size == 32 and store.channels == 3 and store.true_actions is None
        expected = PALETTE[(2 * np.arange(30)) % len(PALETTE)]  # output i shows source frame 2i
        assert np.abs(frames.reshape(30, -1, 3).mean(1) - expected).mean() < 6
        attrs = store.attrs
    assert attrs["source_codec"] == codec
    assert (attrs["source_width"], attrs["source_height"]) == (48, 36)
    assert attrs["source_fps"] == pytest.approx(30)
    assert attrs["source_frames"] == 60 and attrs["frames_decoded"] == 60 and attrs["frames"] == 30
    assert attrs["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert attrs["source"] == str(source)
    assert attrs["tinyworlds_version"] == tinyworlds.__version__
    assert (attrs["fps"], attrs["size"], attrs["channels"], attrs["fit"]) == (15.0, 32, 3, "crop")
    assert attrs["partial"] is False and attrs["partial_reason"] is None
    assert attrs["crop"] is None and attrs["crop_box"] == [6, 0, 36, 36]


def test_zarr_layout(make_video, tmp_path):
    report = ingest(make_video("c.mp4", n=30), tmp_path / "out.zarr", size=16, progress=False)
    array = zarr.open_group(report.out, mode="r")["frames"]
    assert array.metadata.zarr_format == 3
    assert array.chunks[1:] == (16, 16, 3) and 64 <= array.chunks[0] <= 256  # chunked along time
    assert [type(c).__name__ for c in array.compressors] == ["ZstdCodec"]


@pytest.mark.parametrize("source_fps, out_fps, n, expected", [
    (30, 60, 30, 60),  # upsampling repeats frames
    (24, 15, 48, 30),  # 2 s
    (30, 7.5, 60, 15),
])
def test_frame_count_after_resampling(make_video, tmp_path, source_fps, out_fps, n, expected):
    source = make_video("c.mkv", n=n, fps=source_fps, codec="ffv1")
    report = ingest(source, tmp_path / "out.zarr", size=8, fps=out_fps, progress=False)
    assert report.frames == expected
    with open_frame_store(report.out) as store:
        shown = nearest_colour(store.frames[:])
    times = np.arange(expected) / out_fps
    np.testing.assert_array_equal(shown, np.floor(times * source_fps + 1e-6).astype(int) % len(PALETTE))


@pytest.mark.parametrize("name, codec", [("vfr.mkv", "ffv1"), ("vfr.mp4", "libx264")])
def test_variable_frame_rate_uses_timestamps(make_video, tmp_path, name, codec):
    times = [0, 0.1, 0.15, 0.4, 0.45, 0.5, 0.9, 1.0, 1.3, 1.35]
    source = make_video(name, n=len(times), codec=codec, times=times)
    report = ingest(source, tmp_path / "out.zarr", size=8, fps=10, end=1.35, progress=False)
    # output i at i/10 s shows the latest frame with time <= i/10
    expected = [0, 1, 2, 2, 3, 5, 5, 5, 5, 6, 7, 7, 7, 8]
    assert report.frames == len(expected)
    with open_frame_store(report.out) as store:
        np.testing.assert_array_equal(nearest_colour(store.frames[:]), expected)


def test_start_end_window(make_video, tmp_path):
    source = make_video("c.mkv", n=90, codec="ffv1")  # 3 s at 30 fps
    report = ingest(source, tmp_path / "out.zarr", size=8, fps=10, start=0.5, end=1.5, progress=False)
    assert report.frames == 10
    with open_frame_store(report.out) as store:
        np.testing.assert_array_equal(nearest_colour(store.frames[:]), (15 + 3 * np.arange(10)) % len(PALETTE))
        assert (store.attrs["start"], store.attrs["end"]) == (0.5, 1.5)


def test_start_seeks_once_and_matches_a_full_decode(make_video, tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (36, 48, 3), dtype=np.uint8) for _ in range(90)]
    source = make_video("gop.mp4", frames=frames, options={"g": "10"})  # a keyframe every 10 frames
    full = ingest(source, tmp_path / "full.zarr", size=16, fps=30, progress=False)
    clip = ingest(source, tmp_path / "clip.zarr", size=16, fps=30, start=1.5, progress=False)
    assert clip.frames == 45 and clip.frames_decoded < full.frames_decoded  # decoding began near 1.5 s
    with open_frame_store(full.out) as whole, open_frame_store(clip.out) as part:
        np.testing.assert_array_equal(part.frames[:], whole.frames[45:])


def _bands(width: int = 64, height: int = 48) -> np.ndarray:
    """Green frame [H, W, 3] with 8-pixel red columns at both sides and a blue 16x16 top-left box."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:] = (0, 200, 0)
    image[:, :8] = image[:, -8:] = (200, 0, 0)
    image[:16, :16] = (0, 0, 200)
    return image


@pytest.mark.parametrize("fit", ["crop", "pad", "stretch"])
def test_non_square_fit(make_video, tmp_path, fit):
    source = make_video("bands.mkv", frames=[_bands()] * 10, codec="ffv1", pix_fmt="yuv444p")
    report = ingest(source, tmp_path / "out.zarr", size=32, fps=30, fit=fit, progress=False)
    with open_frame_store(report.out) as store:
        image = store.frames[0:1][0].astype(int)  # [32, 32, 3]
        assert store.attrs["fit"] == fit
    red, green, black = np.array([200, 0, 0]), np.array([0, 200, 0]), np.zeros(3)
    near = lambda region, colour: np.abs(region - colour).max() <= 12  # noqa: E731
    if fit == "crop":  # centre 48x48 square: the red side bands are cut off, the blue box partly
        assert near(image[12:, :], green)
    elif fit == "stretch":  # whole 64x48 frame squeezed: 4-pixel red edges
        assert near(image[12:, :4], red) and near(image[12:, -4:], red) and near(image[12:, 5:-5], green)
    else:  # 64x48 -> 32x24 centred: black bars of 4 rows above and below
        assert near(image[:4], black) and near(image[-4:], black)
        assert near(image[12:27, :4], red) and near(image[12:27, 5:-5], green)


def test_crop_box_in_source_pixels(make_video, tmp_path):
    source = make_video("bands.mkv", frames=[_bands()] * 5, codec="ffv1", pix_fmt="yuv444p")
    report = ingest(source, tmp_path / "out.zarr", size=8, fps=30, crop=(0, 0, 16, 16), progress=False)
    with open_frame_store(report.out) as store:
        assert np.abs(store.frames[:].astype(int) - [0, 0, 200]).max() <= 12
        assert store.attrs["crop"] == [0, 0, 16, 16]


def test_grayscale(make_video, tmp_path):
    report = ingest(make_video("c.mkv", n=20, codec="ffv1"), tmp_path / "g.zarr", size=16, fps=30,
                    grayscale=True, progress=False)
    with open_frame_store(report.out) as store:
        frames = store.frames[:]
        assert frames.shape == (20, 16, 16, 1) and store.channels == 1
    luma = PALETTE[np.arange(20) % len(PALETTE)] @ [0.299, 0.587, 0.114]
    assert np.abs(frames.reshape(20, -1).mean(1) - luma).max() < 6


def test_hdf5_output(make_video, tmp_path):
    source = make_video("c.mp4", n=60)
    report = ingest(source, tmp_path / "out.h5", size=16, progress=False)
    assert report.fmt == "hdf5" and report.frames == 30
    with h5py.File(tmp_path / "out.h5", "r") as f:
        frames = f["frames"]
        assert frames.shape == (30, 16, 16, 3) and frames.dtype == np.uint8
        assert frames.chunks[1:] == (16, 16, 3) and frames.compression == "gzip"
        assert f.attrs["source_codec"] == "h264" and f.attrs["partial"] == False  # noqa: E712
    with open_frame_store(tmp_path / "out.h5") as store:
        assert store.kind == "hdf5" and len(store) == 30 and store.fps == 15
        assert store.attrs["crop_box"] == [6, 0, 36, 36]
        expected = PALETTE[(2 * np.arange(30)) % len(PALETTE)]
        assert np.abs(store.frames[:].reshape(30, -1, 3).mean(1) - expected).mean() < 6


def test_explicit_format_overrides_suffix(make_video, tmp_path):
    report = ingest(make_video("c.mp4", n=10), tmp_path / "frames.store", fmt="hdf5", progress=False)
    assert h5py.is_hdf5(report.out) and open_frame_store(report.out).kind == "hdf5"


def _tinyworlds_h5(path, n: int, side: int, fps: float | None = None):
    with h5py.File(path, "w") as f:
        f.create_dataset("frames", data=np.stack(solid_frames(n, side, side)), compression="lzf")
        if fps is not None:
            f.attrs["fps"] = fps
    return path


def test_import_tinyworlds_hdf5_resizes_without_resampling(tmp_path):
    source = _tinyworlds_h5(tmp_path / "pong_frames.h5", n=20, side=48)
    report = ingest(source, tmp_path / "out.zarr", size=16, fps=15, progress=False)
    assert report.frames == 20
    with open_frame_store(report.out) as store:
        frames = store.frames[:]
        assert frames.shape == (20, 16, 16, 3)
        np.testing.assert_array_equal(nearest_colour(frames), np.arange(20) % len(PALETTE))
        assert np.abs(frames.astype(int) - PALETTE[np.arange(20) % 10][:, None, None]).max() <= 2
        assert store.attrs["source_kind"] == "hdf5" and store.attrs["source_fps"] == 15


def test_import_hdf5_with_fps_attribute_is_resampled(tmp_path):
    source = _tinyworlds_h5(tmp_path / "f.h5", n=20, side=16, fps=30.0)
    report = ingest(source, tmp_path / "out.zarr", size=16, fps=15, progress=False)
    assert report.frames == 10
    with open_frame_store(report.out) as store:
        np.testing.assert_array_equal(nearest_colour(store.frames[:]), (2 * np.arange(10)) % len(PALETTE))


def _sidecar(path, frames: int, fps: float = 60.0):
    actions = [(j // 3) % 4 for j in range(frames)]
    doc = {"game": "pong", "fps": fps, "frames": frames, "action_meanings": ["NOOP", "FIRE", "RIGHT", "LEFT"],
           "actions": actions}
    path.write_text(json.dumps(doc))
    return np.array(actions)


@pytest.mark.parametrize("out_name", ["out.zarr", "out.h5"])
def test_sidecar_actions_are_resampled_with_frames(make_video, tmp_path, out_name):
    source = make_video("game.mp4", n=120, fps=60)  # 2 s at 60 fps
    actions = _sidecar(tmp_path / "game.true_actions.json", 120)  # auto-detected beside the video
    report = ingest(source, tmp_path / out_name, size=8, fps=15, progress=False)
    assert report.actions and report.frames == 30
    with open_frame_store(report.out) as store:
        assert store.true_actions.dtype == np.int16
        np.testing.assert_array_equal(store.true_actions, actions[4 * np.arange(30)])  # output i <- source 4i
        assert store.attrs["game"] == "pong"
        assert store.attrs["action_meanings"] == ["NOOP", "FIRE", "RIGHT", "LEFT"]


def test_explicit_sidecar_and_start(make_video, tmp_path):
    source = make_video("game.mkv", n=120, fps=60, codec="ffv1")
    actions = _sidecar(tmp_path / "elsewhere.json", 120)
    report = ingest(source, tmp_path / "out.zarr", size=8, fps=20, start=1.0,
                    actions=tmp_path / "elsewhere.json", progress=False)
    with open_frame_store(report.out) as store:
        np.testing.assert_array_equal(store.true_actions, actions[60 + 3 * np.arange(20)])


def test_replaces_previous_store(make_video, tmp_path):
    source = make_video("c.mp4", n=30)
    ingest(source, tmp_path / "out.zarr", size=16, progress=False)
    ingest(source, tmp_path / "out.zarr", size=8, grayscale=True, progress=False)
    with open_frame_store(tmp_path / "out.zarr") as store:
        assert (store.size, store.channels) == (8, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.mp4", "out.zarr"]


def test_summary_is_one_line(make_video, tmp_path):
    report = ingest(make_video("c.mp4", n=30), tmp_path / "out.zarr", progress=False)
    line = report.summary()
    assert "\n" not in line and "15 frames" in line and str(report.out) in line


def _state_sidecar(path, frames: int, fps: float = 60.0):
    """A sidecar with the player's position (a null every 7th frame), as `record_state` writes it."""
    actions = [(j // 3) % 4 for j in range(frames)]
    positions = [None if j % 7 == 3 else 40.0 + j for j in range(frames)]
    doc = {"game": "pong", "fps": fps, "frames": frames, "action_meanings": ["NOOP", "FIRE", "RIGHT", "LEFT"],
           "actions": actions, "lives": [0] * frames, "player_axis": "y", "player_range": [38, 203],
           "player_position": positions}
    path.write_text(json.dumps(doc))
    return np.array(actions), np.array([np.nan if p is None else p for p in positions], np.float32)


@pytest.mark.parametrize("out_name", ["out.zarr", "out.h5"])
def test_player_position_is_stored_aligned_with_actions(make_video, tmp_path, out_name):
    source = make_video("game.mp4", n=120, fps=60)
    actions, positions = _state_sidecar(tmp_path / "game.true_actions.json", 120)
    report = ingest(source, tmp_path / out_name, size=8, fps=15, progress=False)
    picked = 4 * np.arange(30)  # output i <- source frame 4i, for the actions and the positions alike
    if out_name.endswith(".zarr"):
        group = zarr.open_group(str(report.out), mode="r")
        stored, axis, names = group["player_position"][:], group.attrs["player_axis"], set(group.keys())
    else:
        with h5py.File(report.out, "r") as f:
            stored, axis, names = f["player_position"][:], f.attrs["player_axis"], set(f.keys())
    assert stored.dtype == np.float32 and stored.shape == (30,) and axis == "y"
    np.testing.assert_array_equal(stored, positions[picked])  # NaN where the sidecar had null
    assert np.isnan(stored).sum() == np.isnan(positions[picked]).sum() > 0
    assert "segment" not in names
    with open_frame_store(report.out) as store:
        np.testing.assert_array_equal(store.true_actions, actions[picked])


def test_player_position_follows_start_and_resampling(make_video, tmp_path):
    source = make_video("game.mkv", n=120, fps=60, codec="ffv1")
    _, positions = _state_sidecar(tmp_path / "game.true_actions.json", 120)
    report = ingest(source, tmp_path / "out.zarr", size=8, fps=20, start=1.0, progress=False)
    stored = zarr.open_group(str(report.out), mode="r")["player_position"][:]
    np.testing.assert_array_equal(stored, positions[60 + 3 * np.arange(20)])


def test_older_sidecar_stores_no_position(make_video, tmp_path):
    source = make_video("game.mp4", n=60, fps=60)
    _sidecar(tmp_path / "game.true_actions.json", 60)
    report = ingest(source, tmp_path / "out.zarr", size=8, fps=15, progress=False)
    group = zarr.open_group(str(report.out), mode="r")
    assert set(group.keys()) == {"frames", "true_actions"}
    assert "player_axis" not in group.attrs and "drop_idle" not in group.attrs


@pytest.mark.parametrize("doc_update, needle", [
    ({"player_position": [1.0, 2.0]}, "player_position must list a number or null for each of the 8 frames"),
    ({"player_position": [True] * 8}, "player_position must list a number or null"),
    ({"player_position": [1.0] * 8, "player_axis": "z"}, "player_axis must be"),
    ({"player_position": [1.0] * 8}, "player_axis must be"),
])
def test_bad_position_sidecar(make_video, tmp_path, doc_update, needle):
    source = make_video("game.mp4", n=8, fps=60)
    doc = {"game": "pong", "fps": 60.0, "frames": 8, "action_meanings": ["NOOP"], "actions": [0] * 8, **doc_update}
    (tmp_path / "game.true_actions.json").write_text(json.dumps(doc))
    with pytest.raises(TinyWorldsError) as err:
        ingest(source, tmp_path / "out.zarr", size=8, fps=15, progress=False)
    assert needle in str(err.value) and "\n" not in str(err.value)


def _idle_clip(path, sidecar_path):
    """15 fps, 64x64: a square moving for 20 frames, 40 copies of the last one, moving again for 20.

    The sidecar (15 fps, so source frame j is output frame j) labels frame j with action j % 4
    and position j, so a stored frame's action and position tell which source frame it is.
    """
    frames = []
    for j in range(80):
        x = 2 * min(j, 19) if j < 60 else 38 + 2 * (j - 59) - 40
        image = np.full((64, 64, 3), 30, np.uint8)
        image[20:36, x + 4 : x + 20] = (230, 230, 40)
        frames.append(image)
    write_video(path, frames, fps=15, codec="ffv1", pix_fmt="yuv444p")
    doc = {"game": "synthetic", "fps": 15.0, "frames": 80, "action_meanings": ["A", "B", "C", "D"],
           "actions": [j % 4 for j in range(80)], "player_axis": "x", "player_position": [float(j) for j in range(80)]}
    sidecar_path.write_text(json.dumps(doc))
    return np.stack(frames)


@pytest.mark.parametrize("drop_idle, kept", [
    (5, list(range(25)) + list(range(60, 80))),  # the first 5 of the 40 idle frames stay
    (0, list(range(20)) + list(range(60, 80))),  # every idle frame goes
    (40, list(range(80))),  # a run of exactly 40 is not more than 40: nothing dropped
])
def test_drop_idle_keeps_alignment_and_marks_segments(tmp_path, drop_idle, kept):
    source = tmp_path / "idle.mkv"
    _idle_clip(source, tmp_path / "idle.true_actions.json")
    full = ingest(source, tmp_path / "full.zarr", size=32, fps=15, progress=False)
    report = ingest(source, tmp_path / "dropped.zarr", size=32, fps=15, drop_idle=drop_idle, progress=False)
    assert full.frames == 80 and report.frames == len(kept) and report.frames_dropped_idle == 80 - len(kept)
    kept = np.array(kept)
    group = zarr.open_group(str(report.out), mode="r")
    whole = zarr.open_group(str(full.out), mode="r")
    np.testing.assert_array_equal(group["frames"][:], whole["frames"][:][kept])
    np.testing.assert_array_equal(group["true_actions"][:], kept % 4)
    np.testing.assert_array_equal(group["player_position"][:], kept.astype(np.float32))
    cut = np.concatenate([[0], np.cumsum(np.diff(kept) > 1)])  # a new segment after each gap
    assert group["segment"].dtype == np.int32
    np.testing.assert_array_equal(group["segment"][:], cut)
    attrs = group.attrs
    assert (attrs["drop_idle"], attrs["frames_dropped_idle"], attrs["frames"]) == (drop_idle, 80 - len(kept), len(kept))
    assert attrs["idle_tolerance"] == 8
    assert "segment" not in whole and "drop_idle" not in whole.attrs
    assert "idle frames dropped" in report.summary()


def test_drop_idle_h264_and_hdf5(tmp_path):
    # Lossy H.264 (what `tinyworlds record` writes) leaves still frames within the tolerance.
    source = tmp_path / "idle.mp4"
    frames = _idle_clip(tmp_path / "idle.mkv", tmp_path / "idle.true_actions.json")
    write_video(source, list(frames), fps=15)
    report = ingest(source, tmp_path / "out.h5", size=32, fps=15, drop_idle=3,
                    actions=tmp_path / "idle.true_actions.json", progress=False)
    assert report.frames == 80 - 37
    with h5py.File(report.out, "r") as f:
        np.testing.assert_array_equal(f["segment"][:], [0] * 23 + [1] * 20)
        np.testing.assert_array_equal(f["player_position"][:], list(range(23)) + list(range(60, 80)))
        assert f.attrs["frames_dropped_idle"] == 37


@pytest.mark.parametrize("value", [-1, 1.5, True, "3", float("nan")])
def test_bad_drop_idle(make_video, tmp_path, value):
    source = make_video("c.mp4", n=10)
    with pytest.raises(TinyWorldsError) as err:
        ingest(source, tmp_path / "out.zarr", drop_idle=value, progress=False)
    assert f"drop_idle={value!r}" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out.zarr").exists()
