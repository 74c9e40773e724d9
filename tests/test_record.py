import json

import av
import pytest
from typer.testing import CliRunner

from tinyworlds.apps.cli import app
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.data.record import record_gameplay, sidecar_path, sticky_random_actions

runner = CliRunner()


def test_same_seed_same_bytes_different_seed_different_play(tmp_path):
    a = record_gameplay("pong", tmp_path / "a" / "pong.mp4", frames=240, seed=3)
    b = record_gameplay("pong", tmp_path / "b" / "pong.mp4", frames=240, seed=3)
    c = record_gameplay("pong", tmp_path / "c" / "pong.mp4", frames=240, seed=4)
    assert a.video.read_bytes() == b.video.read_bytes()
    assert a.actions.read_bytes() == b.actions.read_bytes()
    assert json.loads(a.actions.read_text())["actions"] != json.loads(c.actions.read_text())["actions"]


def test_video_is_native_h264_with_one_action_per_frame(tmp_path):
    result = record_gameplay("breakout", tmp_path / "breakout.mp4", frames=120, seed=0, action_repeat=4)
    with av.open(str(result.video)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert (stream.width, stream.height) == (160, 210)
        assert sum(1 for _ in container.decode(stream)) == 120
    sidecar = json.loads(sidecar_path(result.video).read_text())
    assert sidecar["game"] == "breakout" and sidecar["fps"] == 60
    assert len(sidecar["actions"]) == 120
    assert "FIRE" in sidecar["action_meanings"]
    assert all(0 <= a < len(sidecar["action_meanings"]) for a in sidecar["actions"])


def test_policy_holds_each_action_for_action_repeat_frames():
    actions = sticky_random_actions(400, 6, seed=0, action_repeat=4, stickiness=0.5)
    blocks = actions.reshape(100, 4)
    assert (blocks == blocks[:, :1]).all()
    assert len(set(actions.tolist())) > 1


def test_unknown_game_lists_valid_ids(tmp_path):
    result = runner.invoke(app, ["record", "pongg", "--out", str(tmp_path / "x.mp4"), "--frames", "10"])
    assert result.exit_code == 1
    assert "unknown game 'pongg'" in result.output and "pong" in result.output
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize("kwargs", [{"frames": 0}, {"action_repeat": 0}, {"stickiness": 1.0}])
def test_bad_recording_settings(tmp_path, kwargs):
    with pytest.raises(TinyWorldsError):
        record_gameplay("pong", tmp_path / "x.mp4", **kwargs)
    assert list(tmp_path.iterdir()) == []
