"""Generation speed: dynamics MaskGIT rollouts at batch 1 and 8, with the temporal K/V cache
and with the uncached reference path (`generate(use_cache=False)`), and tokenizer decoding.

    python bench/bench_models.py                          # default and reference sizes
    python bench/bench_models.py --preset reference --threads 1
    python bench/bench_models.py --preset reference --no-uncached --profile   # where the time goes

Every rollout starts from a full window of context (max_frames - 1 frames) and makes --frames
new ones, so each generated frame is made beside max_frames - 1 known frames: the steady state
of a long rollout (`tinyworlds dream`, the evaluate stage, play). Figures are medians over
--reps rollouts after one untimed one: ms per generated frame (wall time of a rollout / its
frames, a frame being one per sample), frames/s (all samples), the cache's speed-up, and at
batch 8 the time per sample relative to batch 1. Training speed is bench_training.py's.
Writes bench/results/generation.json.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import harness
import torch

from tinyworlds.core.device import autocast
from tinyworlds.models import count_parameters

BATCHES = (1, 8)


def rollout_inputs(preset: harness.Preset, batch: int, frames: int, device: torch.device, seed: int = 0):
    c = preset.dynamics
    g = torch.Generator().manual_seed(seed)
    context = torch.randint(0, c.vocab_size, (batch, c.max_frames - 1, c.num_patches), generator=g)  # [B, T, P]
    context_actions = torch.randint(0, c.num_actions, (batch, c.max_frames - 2), generator=g)  # [B, T-1]
    actions = torch.randint(0, c.num_actions, (batch, frames), generator=g)  # [B, N]
    return context.to(device), context_actions.to(device), actions.to(device)


def print_profile(fn, title: str, rows: int = 8) -> None:
    """The ops that take the time of one call of `fn`, by self time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(f"  profile of one rollout ({title}):")
    print(prof.key_averages().table(sort_by=sort, row_limit=rows))


def bench_preset(preset: harness.Preset, args, device: torch.device) -> dict:
    dynamics = harness.build_model(preset, "dynamics").to(device).eval()
    tokenizer = harness.build_model(preset, "tokenizer").to(device).eval()
    precision = "bf16" if args.bf16 else "fp32"
    c = preset.dynamics
    print(f"\n{preset.name}: dynamics {count_parameters(dynamics):,d} params (P={c.num_patches}, E={c.embed_dim}, "
          f"{c.num_heads} heads, {c.num_blocks} blocks, V={c.vocab_size}, window {c.max_frames}); "
          f"{args.steps} MaskGIT steps, temperature {args.temperature:g}, {args.frames} frames a rollout")
    print(f"  {'batch':>5s} {'ms/frame':>9s} {'frames/s':>9s} {'uncached ms/frame':>17s} {'speed-up':>8s} "
          f"{'per sample vs batch 1':>21s} {'decode ms/frame':>15s}")
    rows = {}
    for batch in BATCHES:
        context, context_actions, actions = rollout_inputs(preset, batch, args.frames, device)
        paths = {"cached": True} if args.no_uncached else {"cached": True, "uncached": False}

        def rollout(use_cache: bool) -> None:
            with autocast(device, precision):
                dynamics.generate(context, actions, context_actions=context_actions, steps=args.steps,
                                  temperature=args.temperature, use_cache=use_cache)

        seconds = harness.compare_seconds({path: partial(rollout, use_cache) for path, use_cache in paths.items()},
                                          device, warmup=1, reps=args.reps)
        if args.profile:
            print_profile(partial(rollout, True), f"{preset.name}, batch {batch}, cached")
        row = {path: {"ms_per_frame": 1000 * s / args.frames, "frames_per_s": batch * args.frames / s}
               for path, s in seconds.items()}
        if "uncached" in row:
            row["cache_speedup"] = seconds["uncached"] / seconds["cached"]
        if batch > 1:
            # a sample's share of a batch's time over the time of one sample alone (1 / batch: perfect scaling)
            row["per_sample_vs_batch_1"] = row["cached"]["ms_per_frame"] / batch / rows[1]["cached"]["ms_per_frame"]

        window = torch.randint(0, c.vocab_size, (batch, preset.tokenizer.max_frames, c.num_patches), device=device)

        def decode() -> None:
            with autocast(device, precision):
                tokenizer.decode(window)

        seconds = harness.median_seconds(decode, device, warmup=1, reps=args.reps)
        row["decode_ms_per_frame"] = 1000 * seconds / window.shape[1]
        rows[batch] = row
        uncached = row.get("uncached", {}).get("ms_per_frame")
        print(f"  {batch:5d} {row['cached']['ms_per_frame']:9.1f} {row['cached']['frames_per_s']:9.2f} "
              f"{harness.number(uncached, '.1f'):>17s} {harness.number(row.get('cache_speedup'), '.2f', 'x'):>8s} "
              f"{harness.number(row.get('per_sample_vs_batch_1'), '.2f'):>21s} {row['decode_ms_per_frame']:15.2f}")
    return {"preset": preset.summary(), "parameters": count_parameters(dynamics),
            "batches": {f"batch_{b}": r for b, r in rows.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=[*harness.preset_names(), "both"], default="both")
    parser.add_argument("--steps", type=int, default=10, help="MaskGIT steps per generated frame")
    parser.add_argument("--frames", type=int, default=4, help="frames generated per rollout")
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--reps", type=int, default=3, help="timed rollouts per figure")
    parser.add_argument("--no-uncached", action="store_true", help="skip the slow uncached reference path")
    parser.add_argument("--profile", action="store_true", help="also print the ops that take a cached rollout's time")
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "generation.json")
    harness.add_machine_args(parser)
    args = parser.parse_args()
    if args.compile:
        parser.error("--compile: generation is not compiled (its shapes change every MaskGIT step)")

    device, info = harness.start(args)
    results = {"machine": info, "bf16": args.bf16, "steps": args.steps, "frames": args.frames,
               "temperature": args.temperature, "reps": args.reps, "warmup": 1, "presets": {}}
    for preset in harness.presets(args.preset):
        results["presets"][preset.name] = bench_preset(preset, args, device)
    harness.write_results(args.out, results)


if __name__ == "__main__":
    main()
