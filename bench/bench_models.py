"""Speed of the three models: training step (forward + backward + AdamW) and generation.

    python bench/bench_models.py --preset reference   # TinyWorlds' reference sizes
    python bench/bench_models.py --preset default --bf16 --compile

Prints a table and writes bench/results/models.json. Runs on the best device present
(cuda > mps > cpu). Times are medians over --reps timed repetitions after --warmup untimed ones.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import tinyworlds
from tinyworlds.models import (
    DynamicsConfig,
    DynamicsModel,
    LatentActionConfig,
    LatentActionModel,
    TokenizerConfig,
    VideoTokenizer,
    count_parameters,
)
from tinyworlds.training.device import autocast, pick_device

RESULTS = Path(__file__).parent / "results" / "models.json"

# TinyWorlds' reference run: 64x64 frames, patch 4 (256 tokens a frame), 4-frame clips, embed 32
# with 8 heads, 4+4 tokenizer blocks, 2 LAM blocks, 8 dynamics blocks, batch 16. FSQ as there:
# 5 dims of 4 bins (vocab 1024) for video tokens, 4 latent actions.
PRESETS = {
    "reference": dict(
        frames=4,
        batch=16,
        tokenizer=TokenizerConfig(frame_size=64, patch_size=4, embed_dim=32, num_heads=8, encoder_blocks=4,
                                  decoder_blocks=4, levels=(4, 4, 4, 4, 4), max_frames=4),
        lam=LatentActionConfig(frame_size=64, patch_size=4, embed_dim=32, num_heads=8, encoder_blocks=2,
                               decoder_blocks=2, levels=(2, 2), max_frames=4),
        dynamics_blocks=8,
    ),
    "default": dict(frames=4, batch=16, tokenizer=TokenizerConfig(), lam=LatentActionConfig(), dynamics_blocks=None),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def median_ms(fn, device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def build_models(preset: dict) -> dict[str, torch.nn.Module]:
    tokenizer = VideoTokenizer(preset["tokenizer"])
    lam = LatentActionModel(preset["lam"])
    tc = preset["tokenizer"]
    extra = {} if preset["dynamics_blocks"] is None else dict(
        embed_dim=tc.embed_dim, num_heads=tc.num_heads, num_blocks=preset["dynamics_blocks"]
    )
    dynamics = DynamicsModel(DynamicsConfig(
        vocab_size=tokenizer.vocab_size, num_patches=tokenizer.num_patches, num_actions=lam.num_actions,
        max_frames=preset["frames"], **extra,
    ))
    return {"tokenizer": tokenizer, "latent_actions": lam, "dynamics": dynamics}


def training_inputs(name: str, model: torch.nn.Module, batch: int, frames: int, device: torch.device) -> tuple:
    if name == "dynamics":
        c = model.config
        return (torch.randint(0, c.vocab_size, (batch, frames, c.num_patches), device=device),
                torch.randint(0, c.num_actions, (batch, frames - 1), device=device))
    c = model.config
    return (torch.rand(batch, frames, c.channels, c.frame_size, c.frame_size, device=device) * 2 - 1,)


def bench_training(name, model, args, preset, device) -> float:
    model.train()
    loss_fn = torch.compile(model.loss) if args.compile else model.loss
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    inputs = training_inputs(name, model, preset["batch"], preset["frames"], device)
    precision = "bf16" if args.bf16 else "fp32"

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss, _ = loss_fn(*inputs)
        loss.backward()
        optimizer.step()

    return median_ms(step, device, args.warmup, args.reps)


def bench_generation(models, args, preset, device, batch: int) -> dict[str, float]:
    """Dynamics: ms per generated frame (1 context frame, window-filling rollout, --steps
    MaskGIT steps). Tokenizer: ms per decoded frame of the same rollout."""
    dynamics, tokenizer = models["dynamics"].eval(), models["tokenizer"].eval()
    new_frames = preset["frames"] - 1
    context = torch.randint(0, dynamics.config.vocab_size, (batch, 1, dynamics.config.num_patches), device=device)
    actions = torch.randint(0, dynamics.config.num_actions, (batch, new_frames), device=device)
    precision = "bf16" if args.bf16 else "fp32"

    def generate():
        with autocast(device, precision):
            return dynamics.generate(context, actions, steps=args.steps)

    tokens = torch.cat([context, generate()], dim=1)

    def decode():
        with autocast(device, precision):
            tokenizer.decode(tokens)

    reps, warmup = max(1, args.reps // 3), 1
    return {
        "dynamics_generate_ms_per_frame": median_ms(generate, device, warmup, reps) / new_frames,
        "tokenizer_decode_ms_per_frame": median_ms(decode, device, warmup, reps) / tokens.shape[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="reference")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model's loss")
    parser.add_argument("--reps", type=int, default=10, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="MaskGIT steps per generated frame")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    device = pick_device()
    preset = PRESETS[args.preset]
    torch.manual_seed(0)
    models = {name: model.to(device) for name, model in build_models(preset).items()}
    describe = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({describe}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"preset {args.preset}: batch {preset['batch']}, {preset['frames']} frames a clip, "
          f"bf16 {args.bf16}, compile {args.compile}, median of {args.reps} steps after {args.warmup} warmup")

    results = {
        "device": str(device), "device_name": describe, "torch": torch.__version__,
        "tinyworlds": tinyworlds.__version__, "threads": torch.get_num_threads(),
        "preset": args.preset, "bf16": args.bf16, "compile": args.compile,
        "batch": preset["batch"], "frames": preset["frames"], "reps": args.reps, "warmup": args.warmup,
        "models": {}, "generation": {},
    }
    for name, model in models.items():
        ms = bench_training(name, model, args, preset, device)
        results["models"][name] = {
            "parameters": count_parameters(model), "config": vars(model.config), "train_ms_per_step": ms,
        }
        print(f"  {name:15s} {count_parameters(model):>10,d} params  train {ms:9.1f} ms/step (fwd+bwd+AdamW)")
    for batch in (1, 8):
        gen = bench_generation(models, args, preset, device, batch)
        results["generation"][f"batch_{batch}"] = {**gen, "maskgit_steps": args.steps}
        print(f"  generation batch {batch}: dynamics {gen['dynamics_generate_ms_per_frame']:8.1f} ms/frame "
              f"({args.steps} MaskGIT steps), tokenizer decode {gen['tokenizer_decode_ms_per_frame']:6.1f} ms/frame")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
