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


def _minimal_action_names(game: str) -> list[str]:
    import ale_py
    from ale_py import roms

    ale = ale_py.ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.loadROM(roms.get_rom_path(game))
    return [a.name for a in ale.getMinimalActionSet()]


def test_default_sidecar_is_rebuilt_exactly_from_sticky_random_actions(tmp_path, monkeypatch):
    # The default policy's stream is `sticky_random_actions`, unchanged: the sidecar must be
    # exactly the JSON the recorder has always written from it, with no new keys.
    from tinyworlds.data import record

    calls = []
    original = record.sticky_random_actions

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(record, "sticky_random_actions", spy)
    result = record_gameplay("pong", tmp_path / "pong.mp4", frames=150, seed=5, action_repeat=3, stickiness=0.6)
    assert calls == [((150, 6), {"seed": 5, "action_repeat": 3, "stickiness": 0.6})]
    expected = {
        "game": "pong", "fps": 60.0, "frames": 150, "seed": 5, "action_repeat": 3, "stickiness": 0.6,
        "action_meanings": _minimal_action_names("pong"),
        "actions": [int(a) for a in original(150, 6, seed=5, action_repeat=3, stickiness=0.6)],
    }
    assert result.actions.read_text() == json.dumps(expected)


def test_explicit_sticky_random_and_record_state_leave_the_recording_unchanged(tmp_path):
    kwargs = {"frames": 160, "seed": 2}
    default = record_gameplay("breakout", tmp_path / "a" / "b.mp4", **kwargs)
    explicit = record_gameplay("breakout", tmp_path / "b" / "b.mp4", policy="sticky_random", **kwargs)
    state = record_gameplay("breakout", tmp_path / "c" / "b.mp4", record_state=True, **kwargs)
    balanced = record_gameplay("breakout", tmp_path / "d" / "b.mp4", policy="balanced", **kwargs)
    assert explicit.video.read_bytes() == default.video.read_bytes()
    assert explicit.actions.read_bytes() == default.actions.read_bytes()
    assert state.video.read_bytes() == default.video.read_bytes()  # reading RAM changes nothing
    with_state = json.loads(state.actions.read_text())
    plain = json.loads(default.actions.read_text())
    assert {k: v for k, v in with_state.items() if k in plain} == plain
    assert set(with_state) - set(plain) == {"lives", "player_axis", "player_range", "player_position"}
    assert len(with_state["lives"]) == len(with_state["player_position"]) == 160
    assert with_state["player_axis"] == "x" and with_state["lives"][0] == 5
    assert balanced.video.read_bytes() != default.video.read_bytes()
    assert json.loads(balanced.actions.read_text())["policy"] == "balanced"


def test_record_state_for_a_game_without_player_ram(tmp_path):
    result = record_gameplay("freeway", tmp_path / "f.mp4", frames=20, record_state=True)
    sidecar = json.loads(result.actions.read_text())
    assert sidecar["lives"] == [0] * 20 and "player_position" not in sidecar and "player_axis" not in sidecar


@pytest.mark.parametrize("kwargs, needle", [
    ({"policy": "x"}, "policy='x': must be sticky_random or balanced"),
    ({"policy": None}, "policy=None"),
    ({"record_state": "yes"}, "record_state='yes'"),
    ({"frames": 1.5}, "frames=1.5"),
    ({"frames": True}, "frames=True"),
    ({"seed": -1}, "seed=-1"),
    ({"action_repeat": 2.0}, "action_repeat=2.0"),
    ({"stickiness": "0.5"}, "stickiness='0.5'"),
    ({"stickiness": float("nan")}, "stickiness=nan"),
])
def test_bad_new_settings_are_one_line_errors(tmp_path, kwargs, needle):
    with pytest.raises(TinyWorldsError) as err:
        record_gameplay("pong", tmp_path / "x.mp4", **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []
