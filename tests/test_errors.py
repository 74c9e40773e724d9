"""Library errors name parameters; each front end spells them its users' way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tinyworlds.core.errors import ParameterError, TinyWorldsError
from tinyworlds.data.record import record_gameplay

REPO = Path(__file__).resolve().parents[1]


def test_a_parameter_error_names_the_parameter_in_each_spelling():
    err = ParameterError("action_repeat", "must be >= 1", 0)
    assert isinstance(err, TinyWorldsError)
    assert str(err) == "action_repeat=0: must be >= 1"
    assert err.as_flags() == "--action-repeat 0: must be >= 1"
    assert err.under("recordings.pong") == "params.yaml: recordings.pong.action_repeat=0: must be >= 1"


def test_several_parameters_and_paths_read_naturally():
    err = ParameterError(("dataset", "video"), "give one start, not several")
    assert err.as_flags() == "--dataset and --video: give one start, not several"
    assert ParameterError("out", "exists", Path("a/b.png")).as_flags() == "--out a/b.png: exists"


def test_the_library_raises_it_and_the_cli_shows_a_flag(tmp_path):
    with pytest.raises(ParameterError, match=r"^stickiness=1\.5: must be in \[0, 1\)$"):
        record_gameplay("pong", tmp_path / "x.mp4", frames=10, stickiness=1.5)
    from typer.testing import CliRunner

    from tinyworlds.apps.cli import app

    result = CliRunner().invoke(app, ["record", "pong", "--out", str(tmp_path / "x.mp4"), "--frames", "0"])
    assert result.exit_code == 1 and "error: --frames 0: must be a positive number of frames" in result.output


def test_a_stage_names_the_params_key(tmp_path):
    (tmp_path / "params.yaml").write_text("recordings:\n  pong: {game: pong, frames: 0}\n")
    result = subprocess.run([sys.executable, str(REPO / "pipeline" / "record.py"), "pong"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: params.yaml: recordings.pong.frames=0: must be a positive number of frames"
