"""`tinyworlds play`: the world model as a game in a local web page.

`session.py` keeps one player's game (the token window the dynamics model sees) and makes
the next frame for an action; `server.py` serves the page (`page.html`, self-contained: no
external assets, relative URLs only, so it works through `ssh -L`) and a small JSON API.
"""

from tinyworlds.apps.play.server import PlayApp, build_app, make_server, serve
from tinyworlds.apps.play.session import KeyMap, PlaySession

__all__ = ["KeyMap", "PlayApp", "PlaySession", "build_app", "make_server", "serve"]
