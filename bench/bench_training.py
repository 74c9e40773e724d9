"""Training speed of the three models as their stages train them, and what the token cache saves.

    python bench/bench_training.py                          # default and reference sizes
    python bench/bench_training.py --preset reference --bf16 --compile --device cuda
    python bench/bench_training.py --preset large           # a profile's sizes (profiles/large.yaml)

Times `Trainer.train_step`, the stages' own step (forward and loss, backward, gradient
clipping, AdamW, LR schedule, host-to-device copy of the batch, the stage's precision:
bf16 autocast on CUDA, fp32 elsewhere unless --bf16), with each stage's loss function, at the
params.yaml sizes (preset `default`) and TinyWorlds' reference sizes (`reference`). Prints
ms/step, steps/s, clips/s and tokens/s (tokens = batch x clip frames x patches per frame).

For dynamics it also times the same model on frame clips tokenized on the fly (the
tokenizer's encoder inside the step, under no_grad) against the cached tokens the stage reads,
and reports the ratio; and the model FLOPs of a step (estimated from the config), with the
model FLOPs utilisation on CUDA. Writes bench/results/training.json.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from dataclasses import replace
from pathlib import Path

import harness
import torch

from tinyworlds.core.device import autocast
from tinyworlds.models import DynamicsConfig, count_parameters, to_model
from tinyworlds.models.blocks import swiglu_hidden
from tinyworlds.training.loop import Trainer
from tinyworlds.training.train_dynamics import dynamics_loss
from tinyworlds.training.train_lam import lam_loss
from tinyworlds.training.train_tokenizer import tokenizer_loss

LOSSES = {"tokenizer": tokenizer_loss, "lam": lam_loss, "dynamics": dynamics_loss}

# Dense bf16 tensor-core peaks (vendor figures, TFLOP/s), matched against the CUDA device name
# in this order; --peak-tflops overrides.
BF16_PEAK_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("GH200", 989), ("A100", 312),
                    ("L40S", 362), ("L4", 121), ("A10", 125), ("RTX 4090", 165), ("RTX 3090", 71)]


def make_trainer(stage: str, model: torch.nn.Module, preset: harness.Preset, device: torch.device, args,
                 state_dir: Path, loss_fn=None, train_set=None) -> Trainer:
    """A `Trainer` as the stage builds it, for timing its step and its loader (nothing is saved)."""
    config = preset.train[stage]
    config = replace(config, precision="bf16" if args.bf16 else config.precision,
                     compile=args.compile or config.compile)
    return Trainer(f"bench_{stage}", model, loss_fn or LOSSES[stage], train_set or [None], None, config, device,
                   state_dir, "bench")


def time_train_steps(runs: dict[str, tuple[Trainer, dict[str, torch.Tensor]]], args) -> dict[str, float]:
    """Median seconds of one `train_step` of each trainer on its batch (kept on the host, as
    loader batches are), the trainers taking turns."""
    steps = {}
    for name, (trainer, batch) in runs.items():
        batches = itertools.repeat(batch)
        steps[name] = lambda trainer=trainer, batches=batches: trainer.train_step(batches)
    device = next(iter(runs.values()))[0].device
    warmup = args.warmup + (2 if args.compile else 0)  # compilation happens in the first steps
    return harness.compare_seconds(steps, device, warmup=warmup, reps=args.reps)


def replace_reps(args: argparse.Namespace, reps: int) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "reps": reps})


def synthetic_batch(preset: harness.Preset, stage: str, *, frames: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch as the loader gives it: uint8 frames [B, T, C, H, W] (and the LAM's video ids [B]), or
    tokens [B, T, P] and latent actions [B, T-1]."""
    g = torch.Generator().manual_seed(seed)
    b, t = preset.batch[stage], preset.clip_len[stage]
    batch = {}
    if frames:
        c = preset.tokenizer
        shape = (b, t, c.channels, c.frame_size, c.frame_size)
        batch["frames"] = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    else:
        batch["tokens"] = torch.randint(0, preset.dynamics.vocab_size, (b, t, preset.dynamics.num_patches), generator=g)
    if stage == "lam":  # which video each clip comes from: the LAM standardises latents per video
        batch["video"] = torch.arange(b) % 2
    if stage == "dynamics":
        batch["latent_actions"] = torch.randint(0, preset.dynamics.num_actions, (b, t - 1), generator=g)
    return batch


def tokens_per_clip(preset: harness.Preset, stage: str) -> int:
    patches = preset.dynamics.num_patches if stage == "dynamics" else (
        (preset.config(stage).frame_size // preset.config(stage).patch_size) ** 2)
    return preset.clip_len[stage] * patches


def dynamics_train_flops(c: DynamicsConfig, batch: int, frames: int) -> float:
    """Model FLOPs of one dynamics training step: 3x the forward (backward is 2x), counting
    matmuls and attention, not norms or elementwise ops. Causal time attention counts half."""
    e, p, t = c.embed_dim, c.num_patches, frames
    per_token_block = (
        2 * (6 * e * e + 2 * e * e)  # qkv and output projections, space and time attention
        + 4 * p * e  # space attention: scores and weighted sum over P patches
        + 2 * (t + 1) * e  # causal time attention over T frames
        + 6 * e * swiglu_hidden(e)  # SwiGLU: in (2 halves) and out
        + 12 * e * e / p  # FiLM: one projection a frame, shared by its P tokens
    )
    forward = batch * (t * p * c.num_blocks * per_token_block + (t - 1) * p * 2 * e * c.vocab_size)  # + head on targets
    return 3 * forward


def peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def bench_preset(preset: harness.Preset, args, device: torch.device, state_dir: Path) -> dict:
    print(f"\n{preset.name}: batch {preset.batch}, clip frames {preset.clip_len}")
    print(f"  {'model':28s} {'params':>10s} {'ms/step':>9s} {'steps/s':>8s} {'clips/s':>8s} {'tokens/s':>10s}")
    rows = {}

    def report(label: str, stage: str, seconds: float, parameters: int, precision: str) -> dict:
        clips = preset.batch[stage] / seconds
        row = {"ms_per_step": 1000 * seconds, "steps_per_s": 1 / seconds, "clips_per_s": clips,
               "tokens_per_s": clips * tokens_per_clip(preset, stage), "batch": preset.batch[stage],
               "clip_len": preset.clip_len[stage], "tokens_per_clip": tokens_per_clip(preset, stage),
               "parameters": parameters, "precision": precision}
        print(f"  {label:28s} {parameters:>10,d} {row['ms_per_step']:9.1f} {row['steps_per_s']:8.2f} "
              f"{clips:8.1f} {row['tokens_per_s']:10,.0f}")
        return row

    for stage in ("tokenizer", "lam"):
        model = harness.build_model(preset, stage)
        trainer = make_trainer(stage, model, preset, device, args, state_dir)
        seconds = time_train_steps({stage: (trainer, synthetic_batch(preset, stage, frames=True))}, args)[stage]
        rows[stage] = report(stage, stage, seconds, count_parameters(model), trainer.precision)

    # Dynamics on the token cache, as the stage trains, and on frame clips that the tokenizer
    # encodes inside the step, as it would without the cache: same model init, timed in turns.
    tokenizer = harness.build_model(preset, "tokenizer").to(device).eval()

    def tokenize_then_loss(model, batch):
        tokens = tokenizer.encode(to_model(batch["frames"]))  # [B, T, P], no_grad inside
        return dynamics_loss(model, {"tokens": tokens, "latent_actions": batch["latent_actions"]})

    cached = make_trainer("dynamics", harness.build_model(preset, "dynamics"), preset, device, args, state_dir)
    tokenizing = make_trainer("dynamics", harness.build_model(preset, "dynamics"), preset, device, args, state_dir,
                              loss_fn=tokenize_then_loss)
    frames = synthetic_batch(preset, "dynamics", frames=True)
    # Twice the repetitions: the two differ by the encoder alone, which a busy machine can hide.
    seconds = time_train_steps({"cached": (cached, synthetic_batch(preset, "dynamics", frames=False)),
                                "on_the_fly": (tokenizing, frames)}, replace_reps(args, 2 * args.reps))
    parameters = count_parameters(cached.model)
    rows["dynamics"] = report("dynamics (token cache)", "dynamics", seconds["cached"], parameters, cached.precision)
    on_the_fly = report("dynamics (tokenize in step)", "dynamics", seconds["on_the_fly"], parameters, cached.precision)

    def encode() -> None:
        with autocast(device, cached.precision):
            tokenizer.encode(to_model(frames["frames"].to(device)))

    dynamics = rows["dynamics"]
    dynamics["on_the_fly"] = on_the_fly
    dynamics["cache_speedup"] = on_the_fly["ms_per_step"] / dynamics["ms_per_step"]
    seconds = harness.median_seconds(encode, device, warmup=args.warmup, reps=args.reps)
    dynamics["tokenize_ms_per_batch"] = 1000 * seconds
    flops = dynamics_train_flops(preset.dynamics, preset.batch["dynamics"], preset.clip_len["dynamics"])
    dynamics["model_flops_per_step"] = flops
    dynamics["achieved_tflops"] = flops / (dynamics["ms_per_step"] / 1000) / 1e12
    peak = peak_tflops(device, cached.precision, args.peak_tflops)
    dynamics["peak_tflops"] = peak
    dynamics["mfu"] = dynamics["achieved_tflops"] / peak if peak else None
    mfu = f", MFU {dynamics['mfu']:.1%} of {peak:g} TFLOP/s" if peak else ""
    print(f"  token cache: {dynamics['cache_speedup']:.2f}x the steps/s of tokenizing on the fly (the encoder "
          f"alone takes {dynamics['tokenize_ms_per_batch']:.0f} ms a batch)")
    print(f"  dynamics: {flops / 1e9:.1f} GFLOP a step, {dynamics['achieved_tflops'] * 1000:.1f} GFLOP/s achieved{mfu}")
    return {"preset": preset.summary(), "models": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=[*harness.preset_names(), "both"], default="both")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per figure")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (2 more with --compile)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "training.json")
    harness.add_machine_args(parser)
    args = parser.parse_args()

    device, info = harness.start(args)
    print(f"median of {args.reps} steps after {args.warmup} warm-up, compile {args.compile}, bf16 {args.bf16}")
    results = {"machine": info, "bf16": args.bf16, "compile": args.compile, "reps": args.reps, "warmup": args.warmup,
               "presets": {}}
    with tempfile.TemporaryDirectory(prefix="bench_training_") as state_dir:
        for preset in harness.presets(args.preset):
            results["presets"][preset.name] = bench_preset(preset, args, device, Path(state_dir))
    harness.write_results(args.out, results)


if __name__ == "__main__":
    main()
