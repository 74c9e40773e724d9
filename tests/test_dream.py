"""`tinyworlds dream`: starts (dataset clip, video, image), actions, output files, one-line errors.

Every test runs against tiny random-init models (16x16 frames, 4 latent actions) saved into a
throwaway project, never the real pipeline: what is checked is the plumbing, not the dreams.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import (
    NUM_ACTIONS,
    PALETTE,
    SIZE,
    decode_mp4,
    make_project,
    save_tiny_models,
    solid_frames,
    store_frames,
    write_video,
)
from tinyworlds.apps.actions import parse_action_script, script_actions
from tinyworlds.apps.cli import app
from tinyworlds.core.errors import TinyWorldsError


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(make_project(tmp_path))
    return tmp_path


def dream(*args: str):
    return CliRunner().invoke(app, ["dream", *args])


def written_dir(result) -> Path:
    mp4 = next(line.split()[-1] for line in result.stdout.splitlines() if line.endswith("dream.mp4"))
    return Path(mp4).parent


def gif_frames(path: Path) -> list[Image.Image]:
    with Image.open(path) as gif:
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(gif.convert("RGB"))
        return frames


# ---------------------------------------------------------------------------------------------
# the happy paths


def test_dataset_clip_writes_a_playable_mp4_and_gif(project):
    result = dream("--dataset", "pong", "--index", "5", "--frames", "5", "--batch", "2", "--replay", "--compare",
                   "--seed", "7", "--scale", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    out = written_dir(result)
    assert out.parent == Path("data/dreams")  # relative to the project
    assert "PSNR against the real continuation" in result.stdout

    # 3 context + 5 dreamed frames; real, seed 7 and seed 8 side by side, 2x upscaled with label strips
    video = decode_mp4(out / "dream.mp4")
    gif = gif_frames(out / "dream.gif")
    assert len(video) == len(gif) == 8
    width, height = gif[0].size
    assert width == 3 * SIZE * 2 + 2 * 2  # three tiles, two 2-pixel gaps
    assert height > SIZE * 2  # the frame plus its label strip
    assert video.shape[1:3] == (height + height % 2, width + width % 2)

    # The left tile shows the real clip: its first frame is the store's frame 5, upscaled.
    first = np.asarray(gif[0])[: SIZE * 2, : SIZE * 2].astype(int)
    expected = store_frames()[5].repeat(2, axis=0).repeat(2, axis=1).astype(int)
    assert np.abs(first - expected).max() <= 8  # GIF palette rounding only

    record = json.loads((out / "dream.json").read_text())
    assert record["start"] == "pong@5" and record["context_frames"] == 3 and record["frames"] == 5
    assert record["seeds"] == [7, 8] and record["actions_from"] == "replay"
    assert record["actions"][0] == record["actions"][1]  # a replay drives every rollout alike
    assert all(0 <= a < NUM_ACTIONS for a in record["actions"][0])
    assert Image.open(out / "sheet.png").size[1] > 3 * SIZE * 2  # three rows: real + two rollouts


def test_same_seed_same_dream_and_each_call_gets_its_own_directory(project):
    args = ("--dataset", "pong", "--index", "0", "--frames", "3", "--seed", "1", "--device", "cpu")
    first, second = dream(*args), dream(*args)
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    a, b = written_dir(first), written_dir(second)
    assert a != b and a.is_dir() and b.is_dir()  # nothing clobbered
    assert json.loads((a / "dream.json").read_text())["actions"] == json.loads((b / "dream.json").read_text())["actions"]
    assert np.array_equal(np.asarray(gif_frames(a / "dream.gif")[-1]), np.asarray(gif_frames(b / "dream.gif")[-1]))


def test_out_dir_is_written_in_place_and_others_files_are_kept(project):
    out = project / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for seed in ("1", "2"):
        result = dream("--random", "--frames", "2", "--seed", seed, "--out", str(out), "--device", "cpu")
        assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["dream.gif", "dream.json", "dream.mp4", "notes.txt", "sheet.png"]
    assert json.loads((out / "dream.json").read_text())["seeds"] == [2]


def test_random_actions_differ_per_rollout_and_scripts_cycle(project):
    result = dream("--dataset", "pong", "--frames", "12", "--batch", "3", "--random-actions", "--seed", "4",
                   "--device", "cpu")
    assert result.exit_code == 0, result.output
    actions = json.loads((written_dir(result) / "dream.json").read_text())["actions"]
    assert len(actions) == 3 and len({tuple(a) for a in actions}) == 3

    result = dream("--dataset", "pong", "--frames", "5", "--actions", "3,1", "--seed", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads((written_dir(result) / "dream.json").read_text())["actions"] == [[3, 1, 3, 1, 3]]


def test_script_rules():
    assert script_actions([1, 2], 5) == [1, 2, 1, 2, 1]
    assert script_actions([0, 1, 2, 3], 2) == [0, 1]
    assert parse_action_script(" 0, 2 ,1", 4) == [0, 2, 1]
    with pytest.raises(TinyWorldsError, match="action id 4 is out of range.*ids 0..3"):
        parse_action_script("0,4", 4)
    with pytest.raises(TinyWorldsError, match="expected action ids"):
        parse_action_script("up,down", 4)


def test_image_start_is_resized_and_converted_and_says_so(project):
    rgba = np.zeros((30, 40, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(project / "title.png")
    result = dream("--image", "title.png", "--frames", "3", "--seed", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "converted RGBA to RGB" in result.stderr
    assert "image is 40x30, the model takes 16x16: resized, centre-cropped" in result.stderr
    video = decode_mp4(written_dir(result) / "dream.mp4")
    assert len(video) == 1 + 3  # a one-frame context


def test_video_start_with_replay(project):
    write_video(project / "clip.mp4", solid_frames(40, 48, 36), fps=30)
    result = dream("--video", "clip.mp4", "--frames", "4", "--replay", "--compare", "--seed", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "clip.mp4: 48x36 video, centre square taken, resized to 16x16" in result.stderr
    # 30 fps sampled at 15: context frames are source frames 0, 2, 4 (solid palette colours)
    context = np.asarray(gif_frames(written_dir(result) / "dream.gif")[2])[:4, :4].reshape(-1, 3).mean(0)
    assert np.abs(context - PALETTE[4]).max() < 12
    record = json.loads((written_dir(result) / "dream.json").read_text())
    assert record["start"] == "clip.mp4" and record["frames"] == 4 and record["fps"] == 15.0
    assert len(decode_mp4(written_dir(result) / "dream.mp4")) == 3 + 4


def test_log_to_mlflow(project, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("TINYWORLDS_PIPELINE_RUN", raising=False)
    result = dream("--dataset", "pong", "--frames", "2", "--compare", "--seed", "0", "--log", "--device", "cpu")
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tinyworlds").experiment_id])
    assert run.data.tags["tinyworlds.stage"] == "dream" and run.info.status == "FINISHED"
    assert "dream/psnr" in run.data.metrics
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "dream")}
    assert {"dream/dream.mp4", "dream/dream.gif", "dream/dream.json", "dream/sheet.png"} <= logged


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit status 1, no traceback


def break_models(root: Path, how: str) -> None:
    models = root / "data" / "models"
    if how == "missing":
        shutil.rmtree(models)
    elif how == "incomplete":
        (models / "dynamics" / "config.json").unlink()
    elif how == "incompatible":  # a dynamics model from a run with 8 latent actions
        other = root / "other"
        save_tiny_models(other, num_actions=8)
        shutil.rmtree(models / "lam")
        shutil.copytree(other / "lam", models / "lam")


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing", "data/models: no such model directory"),
        ("incomplete", "dynamics: missing config.json"),
        ("incompatible", "dynamics model expects 4 actions, the latent action model has 8"),
    ],
)
def test_unusable_models(project, how, message):
    break_models(project, how)
    result = dream("--dataset", "pong", "--frames", "2", "--device", "cpu")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr


def test_bad_inputs_are_one_line(project):
    write_video(project / "short.mp4", solid_frames(4, 32, 32), fps=15)
    Image.new("RGB", (16, 16)).save(project / "still.png")
    (project / "not_an_image.png").write_text("hello")
    cases = [
        (["--dataset", "pong", "--actions", "0,5,1"], "action id 5 is out of range; this model has 4 latent actions, ids 0..3"),
        (["--dataset", "pong", "--index", "38"], "--index 38: out of range; data/frames/pong.zarr has 40 frames"),
        (["--dataset", "pong", "--index", "30", "--frames", "8", "--replay"], "index must be in 0..29"),
        (["--dataset", "atari"], "dataset 'atari': data/frames/atari.zarr does not exist (ingested: pong)"),
        (["--video", "short.mp4", "--replay", "--frames", "8"], "short.mp4: has 4 frames at 15 fps, too few for 3 context frames + 8"),
        (["--video", "missing.mp4"], "missing.mp4: no such file"),
        (["--video", "short.mp4", "--crop", "8,8,32,32"], "--crop (8, 8, 32, 32): the box (x, y, w, h) lies outside the 32x32 video"),
        (["--dataset", "pong", "--crop", "0,0,8,8"], "--crop and --fit: shape a video; a dataset clip is shaped already"),
        (["--image", "still.png", "--compare"], "still.png: a still image has no real continuation"),
        (["--image", "not_an_image.png"], "not_an_image.png: not an image Pillow can read"),
        (["--image", "still.png", "--dataset", "pong"], "--dataset and --image: give one start"),
        (["--dataset", "pong", "--replay", "--actions", "1"], "--actions and --replay: choose one"),
        (["--dataset", "pong", "--schedule", "square"], "--schedule 'square': must be one of"),
        (["--dataset", "pong", "--frames", "0"], "--frames 0: must be at least 1"),
        (["--dataset", "pong", "--keep-bias", "more"], "--keep-bias 'more': expected auto or a number"),
        (["--dataset", "pong", "--out", "still.png"], "--out still.png: exists and is not a directory"),
        (["--dataset", "pong", "--device", "gpu9"], "not a device name"),
        (["--dataset", "pong", "--threads", "0"], "threads='0': must be auto or a whole number >= 1"),
    ]
    for args, message in cases:
        result = dream(*args, "--seed", "0")
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
    assert not (project / "data" / "dreams").exists() or not any((project / "data" / "dreams").iterdir())
