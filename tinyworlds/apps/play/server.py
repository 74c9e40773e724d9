"""The play server: the page and a JSON API, on the standard library's ThreadingHTTPServer.

    GET  /            the page (page.html, everything inline)
    GET  api/info     {num_actions, frame_size, keys: {key: action}, action_labels, settings}
    POST api/reset    {session?}          -> {session, frame, count, start, notes}
    POST api/step     {session, action}   -> {session, frame, count, action, generate_ms}

`frame` is the frame on screen as a PNG data URL at the model's size; the page scales it up
pixel-crisp. Errors come back as {"error": "<one line>"} with status 400 (bad request) or
404 (unknown session: reset). Sessions live in the server; the few most recent are kept.
One model serves every session, one request at a time.
"""

from __future__ import annotations

import base64
import errno
import io
import ipaddress
import json
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path

import numpy as np

from tinyworlds.apps.play.session import KeyMap, PlaySession
from tinyworlds.apps.start import Start, StartRequest, check_settings, load_start
from tinyworlds.core.device import parse_threads, set_inference_threads
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.inference.latent_actions import named_directions
from tinyworlds.inference.world import GenerationSettings, WorldModel

MAX_SESSIONS = 8  # the oldest session is dropped beyond this
MAX_BODY_BYTES = 4096


def png_data_url(frame: np.ndarray) -> str:
    """uint8 [H, W, C] -> "data:image/png;base64,..."."""
    from PIL import Image

    image = Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class PlayApp:
    """The server's state: the world model, how a game starts, and the open sessions."""

    def __init__(self, world: WorldModel, new_start: Callable[[], Start], settings: GenerationSettings, keys: KeyMap):
        self.world, self.new_start, self.settings, self.keys = world, new_start, settings, keys
        self.sessions: OrderedDict[str, PlaySession] = OrderedDict()
        self.lock = threading.Lock()  # one generation at a time; also guards `sessions`

    def info(self) -> dict:
        world = self.world
        return {
            "num_actions": world.num_actions,
            "frame_size": world.frame_size,
            "keys": self.keys.keys,
            "keys_by_action": self.keys.by_action(world.num_actions),
            "action_labels": world.action_labels(),
            "settings": vars(self.settings),
        }

    def reset(self, session_id: str | None = None) -> dict:
        """A new game from a new start (a fresh session id unless one is given to replace)."""
        with self.lock:
            start = self.new_start()
            session = PlaySession(self.world, start, self.settings)
            session_id = session_id if session_id in self.sessions else secrets.token_hex(8)
            self.sessions[session_id] = session
            self.sessions.move_to_end(session_id)
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
            return {"session": session_id, "frame": png_data_url(session.frame), "count": 0,
                    "start": start.name, "notes": start.notes}

    def step(self, session_id: str, action: int) -> dict:
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None:
                raise LookupError(f"session {session_id!r} is not open (the server restarted?): press reset")
            began = time.perf_counter()
            frame = session.step(action)
            elapsed_ms = (time.perf_counter() - began) * 1000
            return {"session": session_id, "frame": png_data_url(frame), "count": session.count,
                    "action": action, "generate_ms": round(elapsed_ms, 2)}


def page() -> bytes:
    return files("tinyworlds.apps.play").joinpath("page.html").read_bytes()


class PlayHandler(BaseHTTPRequestHandler):
    app: PlayApp  # set on the subclass `make_server` builds
    server_version = "tinyworlds-play"

    def log_message(self, format: str, *args) -> None:  # quiet: the page is the interface
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, doc: dict) -> None:
        self._send(status, json.dumps(doc).encode(), "application/json")

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, page(), "text/html; charset=utf-8")
        elif path == "/api/info":
            self._json(HTTPStatus.OK, self.app.info())
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"{path}: not found"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            body = self._body()
            if path == "/api/reset":
                self._json(HTTPStatus.OK, self.app.reset(body.get("session")))
            elif path == "/api/step":
                action = body.get("action")
                if not isinstance(action, int) or isinstance(action, bool):
                    raise TinyWorldsError(f"action {action!r}: expected a whole number")
                self._json(HTTPStatus.OK, self.app.step(str(body.get("session")), action))
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"{path}: not found"})
        except TinyWorldsError as err:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
        except LookupError as err:
            self._json(HTTPStatus.NOT_FOUND, {"error": str(err.args[0])})

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise TinyWorldsError(f"request body of {length} bytes is too large")
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TinyWorldsError("request body is not JSON") from None
        if not isinstance(body, dict):
            raise TinyWorldsError("request body must be a JSON object")
        return body


def make_server(app: PlayApp, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """Bind (port 0 picks a free one); a one-line error if the address is taken."""
    handler = type("BoundPlayHandler", (PlayHandler,), {"app": app})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise TinyWorldsError(f"port {port} on {host} is already in use: pick another with --port") from None
        raise TinyWorldsError(f"cannot serve on {host}:{port} ({err.strerror or err})") from None
    server.daemon_threads = True
    return server


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start_message(host: str, port: int) -> list[str]:
    """What to print on start: the URL, the ssh -L hint, and a warning when not on loopback."""
    shown = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    lines = [f"tinyworlds play: open http://{shown}:{port}/  (Ctrl-C stops)"]
    if is_loopback(host):
        lines.append(f"from another machine: ssh -L {port}:127.0.0.1:{port} {socket.gethostname()}  "
                     f"then open http://127.0.0.1:{port}/")
    else:
        lines.append(f"warning: listening on {host}, not loopback: anyone who can reach this machine on port "
                     f"{port} can use it (no authentication)")
    return lines


def build_app(
    *,
    models: Path = Path("data/models"),
    device: str = "auto",
    start: StartRequest = StartRequest(),
    keys: str | None = None,
    settings: GenerationSettings = GenerationSettings(),
    root: Path = Path("."),
    say: Callable[[str], None] = print,
) -> PlayApp:
    """Load the model and check that a game can start (one-line errors now, not in the page)."""
    check_settings(settings)
    world = WorldModel.load(models, device)
    keymap = KeyMap.build(world.num_actions, keys, named_directions(world.action_names))
    rng = np.random.default_rng(settings.seed)

    def new_start() -> Start:
        return load_start(world, start, rng=rng, root=root)

    for note in new_start().notes:
        say(note)
    return PlayApp(world, new_start, settings, keymap)


def serve(*, host: str = "127.0.0.1", port: int = 8000, threads: str | int = "auto",
          say: Callable[[str], None] = print, **options) -> None:
    """Build the app (options as for `build_app`) and serve it until Ctrl-C. `threads`: torch's
    CPU threads for generation, auto or a number (`set_inference_threads`)."""
    parse_threads(threads)  # a bad --threads fails before the models load
    app = build_app(say=say, **options)
    server = make_server(app, host, port)
    if (note := set_inference_threads(threads, app.world.device)) is not None:  # every input checked
        say(note)
    for line in start_message(host, server.server_address[1]):
        say(line)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        say("stopped")
    finally:
        server.server_close()
