"""One player's game, and which keys stand for which latent action.

A session keeps the tokens of the latest frames and the actions between them, as the
dynamics model sees them: each new frame is generated from that window and appended as
tokens (never decoded and re-encoded, so the tokenizer's error does not pile up), and
only the frame on screen is decoded; patches whose token is kept keep the pixels on screen
(`GenerationSettings.carry_unchanged`, see tinyworlds/inference/world.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange

from tinyworlds.apps.start import Start
from tinyworlds.core.errors import ParameterError, TinyWorldsError
from tinyworlds.inference.world import GenerationSettings, WorldModel, carry_unchanged_patches

# Arrow keys and WASD stand for one direction each; `--keys up=3,...` says which action that is.
DIRECTIONS = {"up": ("ArrowUp", "w"), "down": ("ArrowDown", "s"), "left": ("ArrowLeft", "a"), "right": ("ArrowRight", "d")}
DEFAULT_DIRECTIONS = {"up": 0, "down": 1, "left": 2, "right": 3}
DIGIT_KEYS = 9  # keys 1..9 are actions 0..8


@dataclass(frozen=True)
class KeyMap:
    """KeyboardEvent.key -> action id: digits 1..9 -> ids 0..8, arrows/WASD -> `directions`."""

    keys: dict[str, int]

    @classmethod
    def build(cls, num_actions: int, directions: str | None = None, named: dict[str, int] | None = None) -> KeyMap:
        """Arrows to the ids `named` after their direction (the true actions they most often
        match, `named_directions`; a direction none is named after gets no key), or, with no
        names, up/down/left/right = 0/1/2/3; `"up=3,down=5"` overrides some."""
        chosen = dict(named) if named else dict(DEFAULT_DIRECTIONS)
        for part in (directions or "").split(","):
            if not part.strip():
                continue
            name, _, value = part.partition("=")
            name = name.strip().lower()
            if name not in DIRECTIONS or not value.strip().isdigit():
                raise ParameterError("keys", "expected up=ID,down=ID,left=ID,right=ID", directions)
            chosen[name] = int(value)
            if chosen[name] >= num_actions:
                raise TinyWorldsError(
                    f"--keys: action id {chosen[name]} for {name} is out of range; this model has "
                    f"{num_actions} latent actions, ids 0..{num_actions - 1}"
                )
        keys = {str(d + 1): d for d in range(min(DIGIT_KEYS, num_actions))}
        for name, action in chosen.items():
            if action < num_actions:
                keys.update(dict.fromkeys(DIRECTIONS[name], action))
        return cls(keys)

    def by_action(self, num_actions: int) -> list[list[str]]:
        """The keys of each action id, for the buttons' captions."""
        names = [[] for _ in range(num_actions)]
        for key, action in self.keys.items():
            names[action].append(key)
        return names


class PlaySession:
    """One game: the latest frames as tokens [1, K, P], the actions between them [1, K-1]."""

    def __init__(self, world: WorldModel, start: Start, settings: GenerationSettings):
        self.world, self.start, self.settings = world, start, settings
        context = rearrange(torch.from_numpy(start.context), "t h w c -> 1 t c h w")  # [1, T, C, H, W]
        with torch.inference_mode():
            self.tokens = world.encode(context)  # [1, T, P]
            if context.shape[1] > 1:
                self.actions = world.infer_actions(context, start.dataset)  # [1, T-1]
            else:
                self.actions = torch.zeros(1, 0, dtype=torch.long, device=world.device)
        self.frame = start.context[-1]  # [H, W, C]: what is on screen
        self.count = 0  # frames generated so far
        # Enough frames for the dynamics window and for the decoder's temporal window.
        self.keep = max(world.context_frames, world.tokenizer.config.max_frames)

    @torch.inference_mode()
    def step(self, action: int) -> np.ndarray:
        """Generate the frame that `action` leads to; returns it as uint8 [H, W, C]."""
        world = self.world
        if not 0 <= action < world.num_actions:
            raise TinyWorldsError(f"action {action} is out of range: this model has {world.num_actions} latent "
                                  f"actions, ids 0..{world.num_actions - 1}")
        chosen = torch.tensor([[action]], dtype=torch.long, device=world.device)  # [1, 1]
        s = self.settings
        # A new seed for every frame: frame 0 of a one-frame generate always draws the same noise.
        new = world.dynamics.generate(
            self.tokens, chosen, context_actions=self.actions,
            steps=s.steps, schedule=s.schedule, temperature=s.temperature, seed=s.seed + self.count,
            keep_bias=world.keep_bias(s),
        )  # [1, 1, P]
        shown_tokens = self.tokens[:, -1]  # [1, P]: of the frame on screen
        self.tokens = torch.cat([self.tokens, new], dim=1)[:, -self.keep:]  # [1, K, P]
        self.actions = torch.cat([self.actions, chosen], dim=1)[:, -(self.keep - 1):]  # [1, K-1]
        window = world.tokenizer.config.max_frames
        frame = world.decode(self.tokens[:, -window:])[:, -1:]  # [1, 1, C, H, W]
        if s.carry_unchanged:
            shown = rearrange(torch.from_numpy(self.frame), "h w c -> 1 c h w").to(frame.device)  # [1, C, H, W]
            frame = carry_unchanged_patches(frame, new, shown, shown_tokens, world.tokenizer.config.patch_size)
        self.frame = rearrange(frame[0, 0].cpu().numpy(), "c h w -> h w c")
        self.count += 1
        return self.frame
