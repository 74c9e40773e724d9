"""Record real Atari gameplay with ale-py: the default data, made on the spot.

The ale-py wheel ships the ROMs, so nothing is downloaded. Frames are written at the native
resolution (210x160) and rate (60 fps) as H.264 with PyAV, and the action applied at every
frame goes to a JSON sidecar next to the video (`GAME.mp4` -> `GAME.true_actions.json`). The
sidecar is never trained on: it measures whether latent actions recover the real controls.

Policies (`policy`); both play the game's minimal action set and decide only every
`action_repeat` frames, so ingested at 60 / action_repeat fps (15 for 4) output frame i
shows the first frame of decision i and its label is the action held until the next one:
  sticky_random (default)  at each decision keep the previous action with probability
      `stickiness`, else draw one uniformly (`sticky_random_actions`; fixed before play).
  balanced  a random policy that keeps the controls visible (`BalancedPolicy`):
      - a newly chosen action (uniform over the allowed ones) is held for a random
        number of decisions, uniform in BALANCED_HOLD (2 to 6: 8 to 24 frames at
        action_repeat 4, two to six output frames at 15 fps); after that, each decision
        keeps it with probability `stickiness`, as sticky_random does;
      - walls: when the player's position (PLAYER_RAM) is within WALL_MARGIN (10%) of
        its range from a wall, every action is tried on a copy of the emulator state
        (cloneState, PROBE_FRAMES = 16 frames each, restoreState: the recording itself
        is unaffected, replaying the sidecar's actions gives the same play) and only
        those that move the player away from that wall (by more than AT_WALL = 2 RAM
        units) or leave it where it is (within AT_WALL) are allowed; at the wall itself
        (within AT_WALL of it), where pushing into the wall also leaves the player where
        it is, only those that move it away. A held action that is not allowed is
        replaced at once. When no action moves the player away (a death animation, say),
        every action is allowed. Pong's paddle keeps sliding after its button is
        released, so there NOOP counts as moving toward the wall it was heading to;
      - FIRE: when the minimal action set has FIRE, it is pressed (for one decision) at
        the first decision after the game starts or restarts and after ale.lives()
        drops: Breakout waits for it to launch the ball; elsewhere it is harmless;
      - seeded by `seed` alone, so the same seed gives the same bytes.
  Measured on 16,000 frames (params.yaml seeds: Pong 0, Breakout 1), action_repeat 4,
  stickiness 0.8, over the frames ingest keeps at 15 fps (`player_stats`): the paddle is at
  a wall in 57% of them in Pong and 65% in Breakout with sticky_random, 4% and 6% with
  balanced; it moves between consecutive ones in 41% and 20% of them with sticky_random,
  83% and 53% with balanced. Recording takes about 1.1x (Pong) and 1.6x (Breakout) as long.

State (`record_state=True`): the sidecar also gets, per source frame j (the state shown
in frame j, read before action j is applied), `lives` (ale.lives()) and, for the games in
PLAYER_RAM, `player_position` (the RAM byte, a float, null when outside the table's
[lo, hi]), `player_axis` ("x" or "y") and `player_range` ([lo, hi]).

The default (sticky_random, record_state False) writes exactly what earlier versions did,
byte for byte: the sidecar keys `policy` (absent means sticky_random) and the state keys
appear only when asked for.

Determinism: the emulator and the policy are seeded, and x264 runs single-threaded with no
wall-clock metadata, so the same seed gives the same play and the same frames, and almost
always the same bytes (a balanced recording's mp4 differed by two bytes in two full CI runs,
its decoded frames unchecked then; tests assert the pixels).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from tinyworlds.core.atomic import atomic_output
from tinyworlds.core.errors import ParameterError, TinyWorldsError

NATIVE_FPS = 60
POLICIES = ("sticky_random", "balanced")

# The only game-specific code: game -> (RAM index, axis, lo, hi). The RAM byte holds the
# coordinate of the player along the axis its controls move it; lo and hi are the extremes
# the game lets it reach (its walls), measured by pushing it against each wall (see
# tests/test_record_policy.py). Values outside [lo, hi] are recorded as unknown (null).
#   pong            the right (green) paddle's y: RIGHT moves it up (the value falls)
#   breakout        the paddle's x: RIGHT raises it
#   space_invaders  the cannon's x: RIGHT raises it
PLAYER_RAM: dict[str, tuple[int, str, int, int]] = {
    "pong": (51, "y", 38, 203),
    "breakout": (72, "x", 55, 191),
    "space_invaders": (28, "x", 35, 117),
}

BALANCED_HOLD = (2, 6)  # decisions a newly chosen action is held at least (uniform, inclusive)
WALL_MARGIN = 0.1  # fraction of the player's range, from each wall, where actions are probed
AT_WALL = 2  # RAM units from lo or hi that count as at the wall
PROBE_FRAMES = 16  # frames each action is tried for: Breakout's paddle takes 9 to turn at a wall


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


def player_position(ale, game: str) -> float | None:
    """The player's coordinate along its axis (PLAYER_RAM), or None if unknown."""
    if game not in PLAYER_RAM:
        return None
    index, _, lo, hi = PLAYER_RAM[game]
    value = int(ale.getRAM()[index])
    return float(value) if lo <= value <= hi else None


def player_stats(positions, lo: float, hi: float, *, stride: int = 4) -> dict[str, float]:
    """How visible the controls are in a recording, on the frames ingest keeps (every `stride`-th).

    at_wall: share of those frames (position known) within AT_WALL of lo or hi;
    moving: share of transitions between consecutive kept frames (both known) where the
    position changes. `positions` is a sidecar's player_position (None or NaN = unknown).
    """
    p = np.array([np.nan if v is None else v for v in positions], dtype=np.float64)[::stride]
    known = p[~np.isnan(p)]
    pairs = ~np.isnan(p[1:]) & ~np.isnan(p[:-1])
    at_wall = (known <= lo + AT_WALL) | (known >= hi - AT_WALL)
    return {
        "at_wall": float(at_wall.mean()) if len(known) else math.nan,
        "moving": float((p[1:] != p[:-1])[pairs].mean()) if pairs.any() else math.nan,
    }


class BalancedPolicy:
    """The `balanced` policy (module docstring): `decide()` at every decision, `observe()` after every frame."""

    def __init__(self, ale, game: str, action_set: list, *, seed: int, stickiness: float):
        self.ale, self.game, self.action_set, self.stickiness = ale, game, action_set, stickiness
        self.rng = np.random.default_rng(seed)
        names = [a.name for a in action_set]
        self.fire = names.index("FIRE") if "FIRE" in names else None
        self.current = int(self.rng.integers(len(action_set)))
        self.held = 0  # decisions still to hold `current` for, after this one
        self.lives = ale.lives()
        self.fire_pending = self.fire is not None  # a round starts

    def observe(self, restarted: bool) -> None:
        """After a frame: note a restarted game or a lost life (the next decision presses FIRE)."""
        lives = self.ale.lives()
        if self.fire is not None and (restarted or lives < self.lives):
            self.fire_pending = True
        self.lives = lives

    def decide(self) -> int:
        """The action (index into the minimal set) for the next action_repeat frames."""
        if self.fire_pending:
            self.fire_pending = False
            return self._start(self.fire, hold=1)
        allowed = self.allowed()
        if self.current not in allowed:
            return self._start(self._pick(allowed))
        if self.held > 0:
            self.held -= 1
            return self.current
        if self.rng.random() < self.stickiness:
            return self.current
        return self._start(self._pick(allowed))

    def allowed(self) -> list[int]:
        """Indices of the actions allowed now: all, except near a wall (module docstring)."""
        everything = list(range(len(self.action_set)))
        position = player_position(self.ale, self.game)
        if position is None:
            return everything
        _, _, lo, hi = PLAYER_RAM[self.game]
        margin = WALL_MARGIN * (hi - lo)
        if position - lo <= margin:
            away_sign, at_wall = 1.0, position - lo <= AT_WALL
        elif hi - position <= margin:
            away_sign, at_wall = -1.0, hi - position <= AT_WALL
        else:
            return everything
        moves = [away_sign * d for d in self._probe(position)]
        away = [a for a, m in enumerate(moves) if m > AT_WALL]
        if not away:
            return everything
        return away if at_wall else [a for a, m in enumerate(moves) if m >= -AT_WALL]

    def _probe(self, position: float) -> list[float]:
        """How far each action moves the player in PROBE_FRAMES frames, tried on a copy of the state."""
        index = PLAYER_RAM[self.game][0]
        state = self.ale.cloneState(include_rng=True)
        moves = []
        for action in self.action_set:
            self.ale.restoreState(state)
            for _ in range(PROBE_FRAMES):
                self.ale.act(action)
            moves.append(float(self.ale.getRAM()[index]) - position)
        self.ale.restoreState(state)
        return moves

    def _pick(self, allowed: list[int]) -> int:
        return allowed[int(self.rng.integers(len(allowed)))]

    def _start(self, action: int, hold: int | None = None) -> int:
        if hold is None:
            hold = int(self.rng.integers(BALANCED_HOLD[0], BALANCED_HOLD[1] + 1))
        self.current, self.held = action, hold - 1
        return action


def _whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_settings(game, frames, seed, action_repeat, stickiness, policy, record_state) -> None:
    if not isinstance(game, str):
        raise ParameterError("game", "must be an ALE ROM id such as 'pong'", game)
    if not _whole(frames) or frames <= 0:
        raise ParameterError("frames", "must be a positive number of frames", frames)
    if not _whole(seed) or seed < 0:
        raise ParameterError("seed", "must be a whole number >= 0", seed)
    if not _whole(action_repeat) or action_repeat <= 0:
        raise ParameterError("action_repeat", "must be >= 1", action_repeat)
    if isinstance(stickiness, bool) or not isinstance(stickiness, (int, float)) or not 0.0 <= stickiness < 1.0:
        raise ParameterError("stickiness", "must be in [0, 1)", stickiness)
    if policy not in POLICIES:
        raise ParameterError("policy", f"must be {' or '.join(POLICIES)}", policy)
    if not isinstance(record_state, bool):
        raise ParameterError("record_state", "must be true or false", record_state)


def record_gameplay(
    game: str,
    out: str | Path,
    *,
    frames: int = 3000,
    seed: int = 0,
    action_repeat: int = 4,
    stickiness: float = 0.8,
    policy: str = "sticky_random",
    record_state: bool = False,
) -> Recording:
    """Play `game` for `frames` frames and write `out` (mp4) plus its actions sidecar.

    `policy` is "sticky_random" (default) or "balanced"; `record_state` adds lives and the
    player's position to the sidecar (module docstring).
    """
    import av

    out = Path(out)
    _check_settings(game, frames, seed, action_repeat, stickiness, policy, record_state)
    if out.suffix.lower() != ".mp4":
        raise TinyWorldsError(f"{out}: record writes H.264 mp4, so the output must end in .mp4")

    ale = _load_game(game, seed)
    action_set = list(ale.getMinimalActionSet())
    if policy == "sticky_random":
        planned = sticky_random_actions(frames, len(action_set), seed=seed, action_repeat=action_repeat,
                                        stickiness=stickiness)
        balanced = None
    else:
        planned, balanced = None, BalancedPolicy(ale, game, action_set, seed=seed, stickiness=stickiness)
    height, width, _ = ale.getScreenRGB().shape

    played = np.empty(frames, dtype=np.int64)
    lives: list[int] = []
    positions: list[float | None] = []
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
                if record_state:
                    lives.append(int(ale.lives()))
                    positions.append(player_position(ale, game))
                frame = av.VideoFrame.from_ndarray(ale.getScreenRGB(), format="rgb24")
                frame.pts = index
                container.mux(stream.encode(frame))
                if balanced is None:
                    action = int(planned[index])
                elif index % action_repeat == 0:
                    action = balanced.decide()  # may probe the emulator, after the frame is encoded
                played[index] = action
                ale.act(action_set[action])
                restarted = ale.game_over()
                if restarted:
                    ale.reset_game()
                if balanced is not None:
                    balanced.observe(restarted)
            container.mux(stream.encode(None))
        sidecar = {
            "game": game,
            "fps": float(NATIVE_FPS),
            "frames": int(frames),
            "seed": int(seed),
            "action_repeat": int(action_repeat),
            "stickiness": stickiness,
            "action_meanings": [a.name for a in action_set],
            # actions[j] is the action applied at frame j (it produces frame j + 1).
            "actions": [int(a) for a in played],
        }
        if policy != "sticky_random":
            sidecar["policy"] = policy
        if record_state:
            sidecar["lives"] = lives
            if game in PLAYER_RAM:
                _, axis, lo, hi = PLAYER_RAM[game]
                sidecar |= {"player_axis": axis, "player_range": [lo, hi], "player_position": positions}
        tmp_actions.write_text(json.dumps(sidecar))
    return Recording(video=out, actions=actions_path, frames=frames)
