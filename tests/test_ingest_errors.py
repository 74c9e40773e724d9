"""Bad input: one-line errors naming the file, exit status 1, nothing left behind, old store intact."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import solid_frames, truncate, write_video
from tinyworlds.apps.cli import app
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.data.ingest import ingest
from tinyworlds.data.stores import open_frame_store


def _noisy_frames(n: int) -> list[np.ndarray]:
    """Frames that do not compress away, so that cutting a file loses many of them."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (36, 48, 3), dtype=np.uint8) for _ in range(n)]


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return path


def _cut_faststart_mp4(d: Path) -> Path:
    whole = write_video(d / "whole.mp4", _noisy_frames(90), container_options={"movflags": "faststart"})
    return truncate(whole, d / "cut_faststart.mp4", 0.5)


def _cut_mkv(d: Path) -> Path:
    whole = write_video(d / "whole.mkv", _noisy_frames(90), codec="ffv1")
    return truncate(whole, d / "cut.mkv", 0.5)


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _good(d: Path) -> Path:
    return write_video(d / "good.mp4", solid_frames(30, 48, 36))


# name -> (make source in dir d, extra ingest kwargs, words the message must contain)
CASES = {
    "missing": (lambda d: d / "missing.mp4", {}, "no such file"),
    "empty": (lambda d: _file(d / "empty.mp4", b""), {}, "empty"),
    "not_a_video": (lambda d: _file(d / "notes.mkv", b"just text\n" * 50), {}, "not a video"),
    "audio_only": (lambda d: _audio_only(d / "sound.wav"), {}, "no video stream"),
    "moov_cut_off": (lambda d: truncate(write_video(d / "w.mp4", _noisy_frames(60)), d / "cut.mp4", 0.7), {}, "moov"),
    "cut_mid_stream_mp4": (_cut_faststart_mp4, {}, "allow-partial"),
    "cut_mid_stream_mkv": (_cut_mkv, {}, "allow-partial"),
    "size_zero": (_good, {"size": 0}, "size"),
    "size_negative": (_good, {"size": -64}, "size"),
    "fps_zero": (_good, {"fps": 0.0}, "fps"),
    "fps_negative": (_good, {"fps": -15.0}, "fps"),
    "fps_nan": (_good, {"fps": float("nan")}, "fps"),
    "start_after_end": (_good, {"start": 1.0, "end": 0.5}, "before end"),
    "start_equals_end": (_good, {"start": 0.5, "end": 0.5}, "before end"),
    "start_past_video": (_good, {"start": 5.0}, "end of the video"),
    "crop_outside": (_good, {"crop": (40, 0, 16, 16)}, "outside the 48x36 frame"),
    "unknown_fit": (_good, {"fit": "zoom"}, "fit"),
    "unknown_format": (_good, {"fmt": "tiff"}, "unknown format"),
    "sidecar_wrong_length": (_good, {"actions": "SIDECAR"}, "frames"),
}

CLI_FLAGS = {
    "size": "--size", "fps": "--fps", "start": "--start", "end": "--end", "fit": "--fit", "fmt": "--format",
    "crop": "--crop", "actions": "--actions",
}


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file below `directory` (relative path -> bytes), to compare before and after."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def previous_store(tmp_path: Path) -> Path:
    """A good store at out/frames.zarr, made before the failing call."""
    out = tmp_path / "out" / "frames.zarr"
    ingest(write_video(tmp_path / "prev.mkv", solid_frames(20, 16, 16), codec="ffv1"), out, size=8, progress=False)
    return out


def _prepare(name: str, tmp_path: Path) -> tuple[Path, dict, str]:
    make, kwargs, words = CASES[name]
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    source = make(src_dir)
    if kwargs.get("actions") == "SIDECAR":
        sidecar = src_dir / "broken.true_actions.json"
        sidecar.write_text('{"game": "pong", "fps": 30, "frames": 5, "action_meanings": ["NOOP"], "actions": [0, 0]}')
        kwargs = {**kwargs, "actions": sidecar}
    return source, kwargs, words


@pytest.mark.parametrize("name", sorted(CASES))
def test_library_error(name, tmp_path, previous_store):
    source, kwargs, words = _prepare(name, tmp_path)
    before = _snapshot(previous_store.parent)
    with pytest.raises(TinyWorldsError) as caught:
        ingest(source, previous_store, progress=False, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and words in message
    named = kwargs.get("actions", source) if name.startswith("sidecar") else source
    assert str(named) in message or str(previous_store) in message
    assert _snapshot(previous_store.parent) == before  # old store byte-identical, no temp debris


@pytest.mark.parametrize("name", sorted(CASES))
def test_cli_error(name, tmp_path, previous_store):
    source, kwargs, words = _prepare(name, tmp_path)
    before = _snapshot(previous_store.parent)
    args = ["ingest", str(source), "--out", str(previous_store)]
    for key, value in kwargs.items():
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        args += [CLI_FLAGS[key], text]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]
    assert source.name in lines[0] or previous_store.name in lines[0] or "broken.true_actions.json" in lines[0]
    assert _snapshot(previous_store.parent) == before


@pytest.mark.parametrize("maker, declared", [(_cut_faststart_mp4, 90), (_cut_mkv, 90)])
def test_allow_partial_keeps_decodable_frames(tmp_path, maker, declared):
    source = maker(tmp_path)
    report = ingest(source, tmp_path / "part.zarr", size=8, fps=30, allow_partial=True, progress=False)
    assert report.partial and report.partial_reason
    assert 0 < report.frames < declared and report.frames_decoded < declared
    with open_frame_store(tmp_path / "part.zarr") as store:
        assert len(store) == report.frames
        assert store.attrs["partial"] is True and store.attrs["partial_reason"] == report.partial_reason
        assert store.attrs["source_frames"] == declared


def test_cli_allow_partial(tmp_path):
    source = _cut_mkv(tmp_path)
    result = CliRunner().invoke(app, ["ingest", str(source), "--out", str(tmp_path / "p.h5"), "--allow-partial"])
    assert result.exit_code == 0, result.output
    assert "PARTIAL" in result.stdout and open_frame_store(tmp_path / "p.h5").attrs["partial"] is True


def test_output_under_a_regular_file(tmp_path):
    source = _good(tmp_path)
    out = tmp_path / "good.mp4" / "frames.zarr"
    with pytest.raises(TinyWorldsError, match="frames.zarr"):
        ingest(source, out, progress=False)
    result = CliRunner().invoke(app, ["ingest", str(source), "--out", str(out)])
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and "frames.zarr" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.mp4"]


def test_output_where_nobody_can_write(tmp_path):
    with pytest.raises(TinyWorldsError, match="cannot create output directory"):
        ingest(_good(tmp_path), Path("/proc/tinyworlds-test/frames.zarr"), progress=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only directories")
def test_read_only_output_directory(tmp_path, previous_store):
    before = _snapshot(previous_store.parent)
    previous_store.parent.chmod(0o555)
    try:
        with pytest.raises(TinyWorldsError, match="not writable"):
            ingest(_good(tmp_path), previous_store, progress=False)
    finally:
        previous_store.parent.chmod(0o755)
    assert _snapshot(previous_store.parent) == before


def test_refuses_to_replace_what_is_not_a_store(tmp_path):
    keep = tmp_path / "data"
    keep.mkdir()
    (keep / "precious.txt").write_text("keep me")
    with pytest.raises(TinyWorldsError, match="not a frame store"):
        ingest(_good(tmp_path), keep, fmt="zarr", progress=False)
    assert (keep / "precious.txt").read_text() == "keep me"


def test_refuses_to_overwrite_the_source_or_a_store_of_the_other_format(tmp_path, previous_store):
    source = _good(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(TinyWorldsError, match="source itself"):
        ingest(source, source, fmt="zarr", progress=False)
    with pytest.raises(TinyWorldsError, match="holds a zarr store"):
        ingest(source, previous_store, fmt="hdf5", progress=False)
    assert _snapshot(tmp_path) == before


def test_failure_after_decoding_started_leaves_no_debris(tmp_path, previous_store, monkeypatch):
    """An error while writing (here: a failing frame shaper) removes the half-written store."""
    from tinyworlds.data import video

    calls = {"n": 0}
    real_call = video.FrameShaper.__call__

    def failing(self, frame):
        calls["n"] += 1
        if calls["n"] > 150:
            raise TinyWorldsError("boom")
        return real_call(self, frame)

    monkeypatch.setattr(video.FrameShaper, "__call__", failing)
    before = _snapshot(previous_store.parent)
    source = write_video(tmp_path / "long.mkv", solid_frames(200, 16, 16), codec="ffv1")
    with pytest.raises(TinyWorldsError, match="boom"):
        ingest(source, previous_store, size=8, fps=30, progress=False)
    assert calls["n"] > 128  # at least one chunk had been written to the temporary store
    assert _snapshot(previous_store.parent) == before
