"""DVC stage `record@NAME`: play an Atari game (params `recordings.NAME`) into data/raw/NAME.mp4."""

import sys

from tinyworlds.core.params import Layout, load_params, section
from tinyworlds.core.stage import run_stage
from tinyworlds.data.record import record_gameplay


def main(name: str) -> None:
    spec = section(load_params(), "recordings", name)
    result = record_gameplay(
        spec["game"],
        Layout().raw_video(name),
        frames=spec["frames"],
        seed=spec.get("seed", 0),
        action_repeat=spec.get("action_repeat", 4),
        stickiness=spec.get("stickiness", 0.8),
        policy=spec.get("policy", "sticky_random"),
        # Lives and the player's position: evaluate scores the latent actions against the moves.
        record_state=True,
    )
    print(f"record@{name}: {result.frames} frames -> {result.video}")


if __name__ == "__main__":
    run_stage(lambda: main(sys.argv[1]), params_section=f"recordings.{sys.argv[1]}")
