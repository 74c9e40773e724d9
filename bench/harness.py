"""What the benchmarks share: command-line options, the machine they ran on, timing, the model
sizes they measure (presets) and where results go.

Every figure is a median over timed repetitions after untimed warm-up ones, and every results
JSON carries `machine`: the device (on CUDA its name), torch, CPU threads and the load average
before and after, since the machines these run on are often shared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import tinyworlds
from tinyworlds.core.config import build_model_config, clip_len
from tinyworlds.core.device import pick_device
from tinyworlds.core.params import load_params
from tinyworlds.core.profiles import apply_profile, available_profiles, load_profile
from tinyworlds.models import (
    DynamicsConfig,
    DynamicsModel,
    LatentActionConfig,
    LatentActionModel,
    TokenizerConfig,
    VideoTokenizer,
)
from tinyworlds.training.loop import TrainConfig
from tinyworlds.training.setup import build_train_config

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
STAGES = ("tokenizer", "lam", "dynamics")  # params.yaml sections of the three models


# ---------------------------------------------------------------------------------------------
# options and the machine


def add_machine_args(parser: argparse.ArgumentParser, *, precision: bool = True) -> None:
    """--device and --threads for every bench; --bf16 and --compile where a model is timed."""
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    if precision:
        parser.add_argument("--bf16", action="store_true", help="bf16 autocast (training already uses it on CUDA)")
        parser.add_argument("--compile", action="store_true", help="torch.compile what is timed")


def start(args: argparse.Namespace) -> tuple[torch.device, dict[str, Any]]:
    """Apply --threads, pick --device, print and return the machine description."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    info = machine(device)
    print(describe(info))
    return device, info


def machine(device: torch.device) -> dict[str, Any]:
    """The device and software a set of figures was measured on."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return {
        "device": str(device), "device_name": name, "torch": torch.__version__, "tinyworlds": tinyworlds.__version__,
        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_average_before": load_average(),
    }


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not on this platform
        return None


def describe(info: dict[str, Any]) -> str:
    return (f"device {info['device']} ({info['device_name']}), torch {info['torch']}, "
            f"{info['cpu_threads']} CPU threads of {info['cpu_count']} cores, "
            f"load average {info['load_average_before']}")


def number(value: float | None, spec: str, suffix: str = "") -> str:
    """A figure for a table, "-" where there is none."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


def write_results(path: Path, results: dict[str, Any]) -> None:
    results["machine"]["load_average_after"] = load_average()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def median_seconds(fn: Callable[[], object], device: torch.device, *, warmup: int, reps: int) -> float:
    """Median wall time of `fn()` over `reps` runs after `warmup` untimed ones (device synced)."""
    return compare_seconds({"fn": fn}, device, warmup=warmup, reps=reps)["fn"]


def compare_seconds(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int,
                    reps: int) -> dict[str, float]:
    """Median wall time of each function, timed in turns (a, b, a, b, ...) so that a change in
    the machine's load falls on all of them alike, which keeps their ratios meaningful."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------
# model sizes


@dataclass
class Preset:
    """The three models' sizes, and the clip length and batch each trains with."""

    name: str
    tokenizer: TokenizerConfig
    lam: LatentActionConfig
    dynamics: DynamicsConfig
    clip_len: dict[str, int]  # per stage section: tokenizer, lam, dynamics
    train: dict[str, TrainConfig]  # batch size, loader workers, precision, compile

    @property
    def batch(self) -> dict[str, int]:
        return {stage: config.batch_size for stage, config in self.train.items()}

    def config(self, stage: str):
        return getattr(self, stage)

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "clip_len": self.clip_len, "batch": self.batch,
                "num_workers": {stage: config.num_workers for stage, config in self.train.items()},
                **{stage: asdict(self.config(stage)) for stage in STAGES}}


def reference_preset() -> Preset:
    """TinyWorlds' reference run: 64x64 frames, patch 4 (256 tokens a frame), 4-frame clips,
    embed 32 with 8 heads, 4+4 tokenizer blocks, 2+2 LAM blocks, 8 dynamics blocks, batch 16;
    FSQ as there: 5 dims of 4 bins (vocab 1024) for video tokens, 4 latent actions."""
    tokenizer = TokenizerConfig(frame_size=64, patch_size=4, embed_dim=32, num_heads=8, encoder_blocks=4,
                                decoder_blocks=4, levels=(4, 4, 4, 4, 4), max_frames=4)
    lam = LatentActionConfig(frame_size=64, patch_size=4, embed_dim=32, num_heads=8, encoder_blocks=2,
                                 decoder_blocks=2, levels=(2, 2), max_frames=4)
    dynamics = DynamicsConfig(vocab_size=1024, num_patches=256, num_actions=4, embed_dim=32, num_heads=8,
                              num_blocks=8, max_frames=4)
    train = {stage: TrainConfig(batch_size=16, steps=10_000, warmup_steps=0) for stage in STAGES}
    return Preset("reference", tokenizer, lam, dynamics, dict.fromkeys(STAGES, 4), train)


def default_preset(params_path: Path = ROOT / "params.yaml", profile: str | None = None) -> Preset:
    """The sizes `dvc repro` trains with: params.yaml's model sections, data.size, clip lengths
    and batch sizes, derived the way the training stages derive them (RGB frames). With
    `profile`, those of `tinyworlds repro --profile NAME` (profiles/NAME.yaml applied)."""
    params = load_params(params_path)
    if profile is not None:
        params = apply_profile(params, load_profile(profile, params, ROOT))
    size = int(params["data"]["size"])
    lengths = {stage: clip_len(params, stage) for stage in STAGES}
    tokenizer = build_model_config(TokenizerConfig, params, "tokenizer", frame_size=size, channels=3,
                                   max_frames=lengths["tokenizer"])
    lam = build_model_config(LatentActionConfig, params, "lam", frame_size=size, channels=3,
                                 max_frames=lengths["lam"])
    dynamics = build_model_config(  # vocabularies are the FSQ products, as the caches record them
        DynamicsConfig, params, "dynamics", max_frames=lengths["dynamics"], vocab_size=math.prod(tokenizer.levels),
        num_patches=(size // tokenizer.patch_size) ** 2, num_actions=math.prod(lam.levels),
    )
    train = {stage: build_train_config(params, stage) for stage in STAGES}
    return Preset(profile or "default", tokenizer, lam, dynamics, lengths, train)


def tiny_preset() -> Preset:
    """Sizes that run in a blink: for the test suite's smoke run of every benchmark, not for figures."""
    tokenizer = TokenizerConfig(frame_size=16, patch_size=4, embed_dim=16, num_heads=2, encoder_blocks=1,
                                decoder_blocks=1, levels=(4, 4), max_frames=3)
    lam = LatentActionConfig(frame_size=16, patch_size=4, embed_dim=16, num_heads=2, encoder_blocks=1,
                             decoder_blocks=1, levels=(2, 2), max_frames=3)
    dynamics = DynamicsConfig(vocab_size=16, num_patches=16, num_actions=4, embed_dim=16, num_heads=2,
                              num_blocks=1, max_frames=3)
    train = {stage: TrainConfig(batch_size=2, steps=100, warmup_steps=0) for stage in STAGES}
    return Preset("tiny", tokenizer, lam, dynamics, dict.fromkeys(STAGES, 3), train)


PRESETS = {"default": default_preset, "reference": reference_preset, "tiny": tiny_preset}


def preset_names() -> list[str]:
    """The presets above and every profile in profiles/ (the default sizes with its overrides)."""
    return [*PRESETS, *available_profiles(ROOT)]


def presets(choice: str) -> list[Preset]:
    """One preset or profile by name, or `both`: default and reference."""
    names = ("default", "reference") if choice == "both" else [choice]
    return [PRESETS[name]() if name in PRESETS else default_preset(profile=name) for name in names]


def build_model(preset: Preset, stage: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kind = {"tokenizer": VideoTokenizer, "lam": LatentActionModel, "dynamics": DynamicsModel}[stage]
    return kind(preset.config(stage))
