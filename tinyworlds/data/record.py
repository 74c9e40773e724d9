"""Record real Atari gameplay with ale-py: the default data, made on the spot.

The ale-py wheel ships the ROMs, so nothing is downloaded. A sticky random policy plays the
game's minimal action set: every `action_repeat` frames it keeps its previous action with
probability `stickiness`, else draws a new one uniformly. Frames are written at the native
resolution (210x160) and rate (60 fps) as H.264 with PyAV, and the action applied at every
frame goes to a JSON sidecar next to the video (`GAME.mp4` -> `GAME.true_actions.json`). The
sidecar is never trained on: it measures whether latent actions recover the real controls.

Determinism: the emulator and the policy are seeded, and x264 runs single-threaded with no
wall-clock metadata, so the same seed gives the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from tinyworlds.core.atomic import atomic_output
from tinyworlds.core.errors import ParameterError, TinyWorldsError

NATIVE_FPS = 60


@dataclass(frozen=True)
class Recording:
    video: Path
    actions: Path
    frames: int


def sidecar_path(video: str | Path) -> Path:
    """Where the ground-truth actions of a video live: `x.mp4` -> `x.true_actions.json`."""
    video = Path(video)
    return video.with_name(video.stem + ".true_actions.json")


def available_games() -> list[str]:
    from ale_py import roms

    return sorted(roms.get_all_rom_ids())


def _load_game(game: str, seed: int):
    import ale_py
    from ale_py import roms

    games = available_games()
    if game not in games:
        close = [g for g in games if game.lower() in g or g in game.lower()][:5]
        suggestions = ", ".join(close or ["pong", "breakout", "freeway", "space_invaders", "ms_pacman"])
        raise TinyWorldsError(f"unknown game {game!r}: not an ALE ROM id (e.g. {suggestions}; {len(games)} in all)")
    ale = ale_py.ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.setInt("random_seed", seed)
    # The policy already provides stickiness; ALE's own sticky actions would hide which action
    # was really applied, and the sidecar must be the ground truth.
    ale.setFloat("repeat_action_probability", 0.0)
    ale.loadROM(roms.get_rom_path(game))
    return ale


def sticky_random_actions(num_frames: int, num_actions: int, *, seed: int, action_repeat: int, stickiness: float) -> np.ndarray:
    """Indices into the minimal action set, one per frame; [num_frames] int64."""
    rng = np.random.default_rng(seed)
    decisions = -(-num_frames // action_repeat)
    chosen = np.empty(decisions, dtype=np.int64)
    current = int(rng.integers(num_actions))
    for i in range(decisions):
        if rng.random() >= stickiness:
            current = int(rng.integers(num_actions))
        chosen[i] = current
    return np.repeat(chosen, action_repeat)[:num_frames]


def record_gameplay(
    game: str,
    out: str | Path,
    *,
    frames: int = 3000,
    seed: int = 0,
    action_repeat: int = 4,
    stickiness: float = 0.8,
) -> Recording:
    """Play `game` for `frames` frames and write `out` (mp4) plus its actions sidecar."""
    import av

    out = Path(out)
    if frames <= 0:
        raise ParameterError("frames", "must be a positive number of frames", frames)
    if action_repeat <= 0:
        raise ParameterError("action_repeat", "must be >= 1", action_repeat)
    if not 0.0 <= stickiness < 1.0:
        raise ParameterError("stickiness", "must be in [0, 1)", stickiness)
    if out.suffix.lower() != ".mp4":
        raise TinyWorldsError(f"{out}: record writes H.264 mp4, so the output must end in .mp4")

    ale = _load_game(game, seed)
    action_set = list(ale.getMinimalActionSet())
    policy = sticky_random_actions(frames, len(action_set), seed=seed, action_repeat=action_repeat, stickiness=stickiness)
    height, width, _ = ale.getScreenRGB().shape

    actions_path = sidecar_path(out)
    with atomic_output(out) as tmp_video, atomic_output(actions_path) as tmp_actions:
        with av.open(str(tmp_video), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=NATIVE_FPS)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.time_base = Fraction(1, NATIVE_FPS)
            # Single-threaded x264 and a fixed CRF: deterministic output, and near-lossless
            # on flat Atari colours, so ingest sees what the emulator drew.
            stream.codec_context.thread_count = 1
            stream.options = {"crf": "12", "preset": "medium", "threads": "1"}
            for index in range(frames):
                frame = av.VideoFrame.from_ndarray(ale.getScreenRGB(), format="rgb24")
                frame.pts = index
                container.mux(stream.encode(frame))
                ale.act(action_set[policy[index]])
                if ale.game_over():
                    ale.reset_game()
            container.mux(stream.encode(None))
        sidecar = {
            "game": game,
            "fps": float(NATIVE_FPS),
            "frames": frames,
            "seed": seed,
            "action_repeat": action_repeat,
            "stickiness": stickiness,
            "action_meanings": [a.name for a in action_set],
            # actions[j] is the action applied at frame j (it produces frame j + 1).
            "actions": [int(a) for a in policy],
        }
        tmp_actions.write_text(json.dumps(sidecar))
    return Recording(video=out, actions=actions_path, frames=frames)
