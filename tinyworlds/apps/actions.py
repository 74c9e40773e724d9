"""Which latent actions drive a dream (`plan_actions`, ids [B, F] for B rollouts of F frames).

  script   "0,0,2,1": the same for every rollout; a script shorter than F is repeated from
           its start (cycled), a longer one is cut to F
  random   uniform ids, different for each rollout, drawn from the seed
  replay   the LAM's ids for the real continuation, the same for every rollout
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange, repeat

from tinyworlds.apps.start import Start
from tinyworlds.core.errors import ParameterError
from tinyworlds.inference.world import WorldModel

Say = Callable[[str], None]


def quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class ActionRequest:
    """At most one way to pick actions: a script of ids (`actions`), `random_actions`, or
    `replay` of the real continuation; none of them means random."""

    actions: str | None = None  # a script of ids, "0,0,2,1"
    random_actions: bool = False
    replay: bool = False


def parse_action_script(text: str, num_actions: int) -> list[int]:
    """`"0,0,2,1"` -> [0, 0, 2, 1]; one-line errors for anything else or an id out of range."""
    parts = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
    if not parts or not all(re.fullmatch(r"-?\d+", p) for p in parts):
        raise ParameterError("actions", "expected action ids separated by commas, e.g. 0,0,2,1", text)
    ids = [int(p) for p in parts]
    bad = [a for a in ids if not 0 <= a < num_actions]
    if bad:
        raise ParameterError("actions", f"action id {bad[0]} is out of range; this model has {num_actions} latent "
                             f"actions, ids 0..{num_actions - 1}")
    return ids


def script_actions(script: list[int], frames: int) -> list[int]:
    """A script cycled (shorter) or cut (longer) to exactly `frames` ids."""
    return list(itertools.islice(itertools.cycle(script), frames))


def check_action_choice(request: ActionRequest) -> None:
    chosen = tuple(name for name in ("actions", "random_actions", "replay") if getattr(request, name) not in (None, False))
    if len(chosen) > 1:
        raise ParameterError(chosen, "choose one way to pick actions")


@dataclass
class ActionPlan:
    actions: torch.Tensor  # [B, F] ids into each new frame
    context_actions: torch.Tensor | None  # [B, T-1], or None: the LAM labels the context
    source: str  # "script", "random" or "replay"


def plan_actions(
    world: WorldModel,
    start: Start,
    request: ActionRequest = ActionRequest(),
    *,
    frames: int,
    batch: int,
    rng: np.random.Generator | None = None,
    say: Say = quiet,
) -> ActionPlan:
    """The actions of B rollouts of F frames (rules in the module docstring)."""
    check_action_choice(request)
    if request.replay:
        if start.truth is None or len(start.truth) < frames:
            raise ParameterError("replay", f"{start.name} has no real continuation of {frames} frames to replay")
        clip = np.concatenate([start.context, start.truth[:frames]])  # [T+F, H, W, C]
        clip = rearrange(torch.from_numpy(clip), "t h w c -> 1 t c h w")
        ids = world.infer_actions(clip, start.dataset).cpu()  # [1, T+F-1]
        t = len(start.context)
        return ActionPlan(repeat(ids[0, t - 1:], "f -> b f", b=batch),
                          repeat(ids[0, : t - 1], "f -> b f", b=batch) if t > 1 else None, "replay")
    if request.actions is not None:
        ids = parse_action_script(request.actions, world.num_actions)
        if len(ids) > frames:
            say(f"actions: {len(ids)} ids given for {frames} frames; using the first {frames}")
        full = torch.tensor(script_actions(ids, frames))  # [F]
        return ActionPlan(repeat(full, "f -> b f", b=batch), None, "script")
    rng = rng or np.random.default_rng()
    return ActionPlan(torch.from_numpy(rng.integers(0, world.num_actions, size=(batch, frames))), None, "random")
