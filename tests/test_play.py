"""`tinyworlds play`: the JSON API over plain HTTP, the page in a real headless Chromium, the CLI.

The browser test needs Debian's `chromium` and `chromium-driver` (CI installs them) and is
skipped only when they are missing. Models are the tiny random-init ones of test_dream.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import (
    NUM_ACTIONS,
    SIZE,
    WORLD_KINDS,
    log_pipeline,
    make_project,
    save_tiny_models,
)
from tinyworlds.apps.cli import app as cli_app
from tinyworlds.apps.play import KeyMap, build_app, make_server
from tinyworlds.apps.play.server import start_message
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.inference.latent_actions import NAMES_FILE
from tinyworlds.inference.world import GenerationSettings
from tinyworlds.tracking.models import weights_sha256

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def server(tmp_path):
    """A play server on a free loopback port, serving the tiny models; yields its base URL."""
    root = make_project(tmp_path)
    # What train_lam writes beside the LAM: each id's most common true action, per dataset.
    names = {"names": ["NOOP", "UP", "DOWN", None], "share": [0.9, 0.8, 0.7, 0.0]}
    (root / "data" / "models" / "lam" / NAMES_FILE).write_text(
        json.dumps({"usage": [0.4, 0.3, 0.3, 0.0], "datasets": {"pong": names}}))
    play = build_app(models=root / "data" / "models", device="cpu", root=root, settings=GenerationSettings(seed=0),
                     say=lambda line: None)
    httpd = make_server(play, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def call(url: str, body: dict | bytes | None = None) -> tuple[int, dict | str]:
    """GET (body None) or POST JSON; returns (status, parsed JSON or text)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw, kind = response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as err:
        status, raw, kind = err.code, err.read(), err.headers["Content-Type"]
    return status, json.loads(raw) if kind == "application/json" else raw.decode()


def png_frame(data_url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix) :]))))


# ---------------------------------------------------------------------------------------------
# plain HTTP


def test_page_is_self_contained(server):
    status, page = call(server)
    assert status == 200
    assert "image-rendering: pixelated" in page
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", page)  # no external assets
    assert not re.search(r"""fetch\(\s*["'`]/""", page)  # relative URLs only: works behind ssh -L


def test_api_reset_step_and_errors(server):
    status, info = call(server + "api/info")
    assert status == 200 and info["num_actions"] == NUM_ACTIONS and info["frame_size"] == SIZE
    assert info["keys"]["1"] == 0 and info["keys"]["ArrowUp"] == info["keys"]["w"] == 1  # the ids' names say so
    assert info["keys"]["ArrowDown"] == 2 and "ArrowRight" not in info["keys"]
    assert info["action_labels"] == ["NOOP (pong)", "UP (pong)", "DOWN (pong)", "unused"]

    status, game = call(server + "api/reset", {})
    assert status == 200 and game["count"] == 0 and game["start"].startswith("pong@")
    assert png_frame(game["frame"]).shape == (SIZE, SIZE, 3)
    session = game["session"]
    for count, action in enumerate([2, 0, 3, 1, 1], start=1):  # past the 4-frame window
        status, step = call(server + "api/step", {"session": session, "action": action})
        assert status == 200, step
        assert step["count"] == count and step["action"] == action and step["generate_ms"] > 0
        assert png_frame(step["frame"]).shape == (SIZE, SIZE, 3)

    status, again = call(server + "api/reset", {"session": session})  # the same session starts over
    assert status == 200 and again["session"] == session and again["count"] == 0

    for body, expected_status, message in [
        ({"session": session, "action": 4}, 400, "action 4 is out of range: this model has 4 latent actions, ids 0..3"),
        ({"session": session, "action": "up"}, 400, "expected a whole number"),
        ({"session": "nope", "action": 1}, 404, "session 'nope' is not open"),
        (b"{not json", 400, "not JSON"),
    ]:
        status, error = call(server + "api/step", body)
        assert status == expected_status and message in error["error"]
    assert call(server + "api/nothing")[0] == 404


@pytest.mark.parametrize("carry", [True, False])
def test_session_steps_match_one_rollout(tmp_path, carry):
    """Frame-by-frame play keeps the tokens (and the pixels on screen), so it makes what one
    greedy rollout makes, past the window too, patches carried or redrawn."""
    from einops import rearrange

    from tinyworlds.apps.play import PlaySession
    from tinyworlds.apps.start import start_from_dataset
    from tinyworlds.inference.world import WorldModel

    root = make_project(tmp_path)
    world = WorldModel.load(root / "data" / "models", "cpu")
    start = start_from_dataset(root / "data" / "frames" / "pong.zarr", size=SIZE, channels=3, context=3, index=4)
    actions = [2, 0, 3, 3, 1, 2]
    greedy = GenerationSettings(temperature=0.0, carry_unchanged=carry)
    session = PlaySession(world, start, greedy)
    played = np.stack([session.step(a) for a in actions])  # [N, H, W, C]
    context = rearrange(torch.from_numpy(start.context), "t h w c -> 1 t c h w")
    rolled = world.rollout(context, torch.tensor([actions]), settings=greedy)[0]  # [N, C, H, W]
    assert np.array_equal(played, rearrange(rolled.numpy(), "n c h w -> n h w c"))


def test_key_map():
    keys = KeyMap.build(8, "up=5,left=7").keys
    assert keys["ArrowUp"] == keys["w"] == 5 and keys["ArrowLeft"] == keys["a"] == 7
    assert keys["ArrowDown"] == 1 and keys["8"] == 7 and "9" not in keys
    with pytest.raises(TinyWorldsError, match="action id 9 for up is out of range.*ids 0..7"):
        KeyMap.build(8, "up=9")
    with pytest.raises(TinyWorldsError, match="expected up=ID"):
        KeyMap.build(8, "jump=1")


def test_arrow_keys_follow_the_true_actions_the_ids_are_named_after():
    from tinyworlds.inference.latent_actions import named_directions

    names = {"datasets": {
        "pong": {"names": ["LEFT", "NOOP", "RIGHT"], "share": [0.8, 0.9, 0.7]},
        "breakout": {"names": ["RIGHT", "NOOP", "LEFT"], "share": [0.6, 0.9, 0.9]},
        "space_invaders": {"names": ["LEFT", "NOOP", "RIGHT"], "share": [0.7, 0.8, 0.6]},
    }}
    # LEFT: id 0 (0.8 + 0.7) over id 2 (0.9); RIGHT: id 2 (0.7 + 0.6) over id 0 (0.6).
    assert named_directions(names) == {"left": 0, "right": 2}
    keys = KeyMap.build(3, None, named_directions(names)).keys
    assert keys["ArrowLeft"] == keys["a"] == 0 and keys["ArrowRight"] == 2
    assert "ArrowUp" not in keys and "ArrowDown" not in keys  # no id is named after them: no guess
    assert KeyMap.build(3, "up=1", named_directions(names)).keys["ArrowUp"] == 1
    assert named_directions(None) == {} and KeyMap.build(3).keys["ArrowDown"] == 1  # no names: the defaults


def test_start_message():
    local = "\n".join(start_message("127.0.0.1", 8123))
    assert "http://127.0.0.1:8123/" in local and "ssh -L 8123:127.0.0.1:8123" in local and "warning" not in local
    exposed = "\n".join(start_message("0.0.0.0", 8123))
    assert "warning: listening on 0.0.0.0, not loopback" in exposed


# ---------------------------------------------------------------------------------------------
# a real browser


def test_play_in_a_browser(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(server)
    frame = browser.find_element(By.ID, "frame")
    count = browser.find_element(By.ID, "count")
    wait.until(lambda _: frame.get_attribute("src").startswith("data:image/png"))
    assert count.text == "0" and browser.find_element(By.ID, "start").text.startswith("pong@")
    assert frame.value_of_css_property("image-rendering") == "pixelated"
    assert frame.size["width"] >= 8 * SIZE  # scaled up

    buttons = browser.find_elements(By.CSS_SELECTOR, "button[data-action]")
    assert [b.get_attribute("data-action") for b in buttons] == [str(a) for a in range(NUM_ACTIONS)]
    assert "↑" in buttons[1].text and "W" in buttons[1].text  # the mapping is shown (id 1 is named UP)
    assert "UP (pong)" in buttons[1].text and "unused" in buttons[3].get_attribute("class")  # and what ids mean

    def advanced_to(n: int, before: str):
        return lambda _: count.text == str(n) and frame.get_attribute("src") != before

    body = browser.find_element(By.TAG_NAME, "body")
    src = frame.get_attribute("src")
    body.send_keys("3")  # key 3 -> action 2
    wait.until(advanced_to(1, src))
    src = frame.get_attribute("src")
    body.send_keys(Keys.ARROW_DOWN)
    wait.until(advanced_to(2, src))
    src = frame.get_attribute("src")
    buttons[1].click()
    wait.until(advanced_to(3, src))
    assert re.fullmatch(r"\d+(\.\d)?", browser.find_element(By.ID, "fps").text)
    assert int(browser.find_element(By.ID, "server-ms").text) >= 0
    assert browser.find_element(By.ID, "status").text == ""

    browser.find_element(By.ID, "reset").click()
    wait.until(lambda _: count.text == "0")
    assert frame.get_attribute("src").startswith("data:image/png")


# ---------------------------------------------------------------------------------------------
# the command


def as_from_a_terminal() -> None:
    """In the child before exec: SIGINT handled and unblocked, as a shell starts a command. An
    ignored or blocked signal survives exec, so what earlier tests left in this process's
    signal state would otherwise keep Ctrl-C from the server."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def start_play(args: list[str], cwd: Path, env: dict) -> tuple[subprocess.Popen, str, list[str]]:
    """`tinyworlds play ARGS` started as from a terminal; (process, its URL, what it printed)."""
    process = subprocess.Popen([sys.executable, "-m", "tinyworlds.apps.cli", "play", *args], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=as_from_a_terminal)
    lines = []
    while not any("open http://" in line for line in lines):
        line = process.stderr.readline()
        if not line:
            process.kill()
            pytest.fail(f"play exited early: {''.join(lines)}{process.stderr.read()}")
        lines.append(line)
    return process, re.search(r"http://127\.0\.0\.1:\d+/", "".join(lines)).group(0), lines


def test_cli_serves_and_stops_on_ctrl_c(tmp_path):
    root = make_project(tmp_path)
    process, url, lines = start_play(["--port", "0", "--device", "cpu"], root, {**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert "ssh -L" in "".join(lines) or "ssh -L" in process.stderr.readline()
        assert call(url + "api/info")[1]["num_actions"] == NUM_ACTIONS
    finally:
        process.send_signal(signal.SIGINT)
        try:
            _, rest = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, rest = process.communicate()
            pytest.fail(f"play did not stop within 30 s of Ctrl-C; it printed: {''.join(lines)}{rest}")
    assert process.returncode == 0 and "stopped" in rest


def test_play_run_from_a_store_copied_from_another_clone(tmp_path, monkeypatch, empty_store):
    """`play --run ID` on the mlflow.db and mlartifacts/ of another clone, copied here: the
    models come from the store (the copy's artifacts), and the page plays them."""
    other = tmp_path / "other-clone"
    (other / ".dvc").mkdir(parents=True)
    shutil.copy(empty_store, other / "mlflow.db")
    save_tiny_models(other / "trained", seed=3)
    trained = {kind: weights_sha256(other / "trained" / kind) for kind in WORLD_KINDS}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "TINYWORLDS_"))}
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(other)  # its store is its project's mlflow.db
    ids = log_pipeline(other / "trained", "exp-far", 1e-3)
    here = make_project(tmp_path / "here")  # a dataset to start from, other models in data/models
    shutil.copy(other / "mlflow.db", here / "mlflow.db")
    shutil.copytree(other / "mlartifacts", here / "mlartifacts")
    monkeypatch.chdir(tmp_path)
    shutil.rmtree(other)
    env.update(OMP_NUM_THREADS="1", XDG_CACHE_HOME=str(tmp_path / "cache"))
    process, url, lines = start_play(["--run", ids["train_dynamics"][:12], "--port", "0", "--device", "cpu"], here, env)
    try:
        assert any(f"models of run {ids['train_dynamics'][:8]} (train_dynamics · pong · exp-far)" in line
                   for line in lines)
        status, page = call(url)
        assert status == 200 and 'id="frame"' in page
        status, game = call(url + "api/reset", {})
        assert status == 200 and game["start"].startswith("pong@")
        status, step = call(url + "api/step", {"session": game["session"], "action": 1})
        assert status == 200 and step["count"] == 1 and png_frame(step["frame"]).shape == (SIZE, SIZE, 3)
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)
    fetched = tmp_path / "cache" / "tinyworlds" / "mlflow-models" / ids["train_dynamics"]
    assert {kind: weights_sha256(fetched / kind) for kind in WORLD_KINDS} == trained  # the other clone's models


def test_cli_errors_are_one_line(tmp_path, monkeypatch):
    root = make_project(tmp_path)
    monkeypatch.chdir(root)
    runner = CliRunner()

    result = runner.invoke(cli_app, ["play", "--models", "nowhere"])
    assert result.exit_code == 1 and result.stderr == "error: nowhere: no such model directory (run `dvc repro` first)\n"

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(cli_app, ["play", "--port", str(port), "--device", "cpu"])
    assert result.exit_code == 1
    assert result.stderr == f"error: port {port} on 127.0.0.1 is already in use: pick another with --port\n"
    assert "Traceback" not in result.output

    result = runner.invoke(cli_app, ["play", "--threads", "many", "--device", "cpu"])
    assert result.exit_code == 1 and result.stderr == "error: threads='many': must be auto or a whole number >= 1\n"

    result = runner.invoke(cli_app, ["play", "--keys", "up=4", "--device", "cpu"])
    assert result.exit_code == 1 and "action id 4 for up is out of range" in result.stderr
