"""Data loading against training: does the loader keep each stage's model fed?

    python bench/bench_loader.py [--frames 16000] [--batches 100]

Builds a small project in a temp dir the way the pipeline does: records the Atari games of
params.yaml's `recordings` (ale-py, their frame counts or --frames), ingests them with the
datasets' crop and fit into zarr frame stores, writes the token cache (stage tokenize's
writer) and the latent-action cache (train_lam' writer) with untrained models of the
default sizes. Then, for each training stage, the `Trainer` the stage builds gives the loader
(`train.num_workers` from params, the stage's clip length and batch, preload as the stage
decides from the store sizes) and the training step of the default-size model.

Prints, per stage: the loader's clips/s (median of 5 timed runs of --batches batches each,
after the first batch, whose preload / worker start-up is reported apart), the clips/s
training consumes (steps/s x batch), and their ratio; and the loader's clips/s streaming
from zarr chunks (preload off, as for stores over the preload limit). Writes
bench/results/loader.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import harness
import torch
from bench_training import make_trainer, time_train_steps

from tinyworlds.core.params import Layout, dataset_names, load_params, section
from tinyworlds.data.clips import ClipDataset
from tinyworlds.data.ingest import ingest
from tinyworlds.data.record import record_gameplay
from tinyworlds.data.roots import clip_datasets, data_root, frame_videos, split_config
from tinyworlds.inference.latent_actions import cache_latent_actions
from tinyworlds.inference.tokens import tokenize_store
from tinyworlds.training.train_dynamics import token_videos


def build_project(root: Path, params: dict, preset: harness.Preset, frames: int | None,
                  device: torch.device) -> list[str]:
    """Recordings -> frame stores -> token and latent-action caches under `root`, as `dvc repro`
    lays them out; returns the dataset names."""
    layout = Layout(root)
    names = dataset_names(params)
    tokenizer = harness.build_model(preset, "tokenizer").to(device).eval()
    lam = harness.build_model(preset, "lam").to(device).eval()
    for name in names:
        recording = (params.get("recordings") or {}).get(name)
        if recording is None:
            raise SystemExit(f"bench_loader records Atari games: params.yaml has no recordings.{name}")
        start = time.perf_counter()
        layout.raw_video(name).parent.mkdir(parents=True, exist_ok=True)
        record_gameplay(recording["game"], layout.raw_video(name), frames=frames or recording.get("frames", 3000),
                        seed=recording.get("seed", 0),
                        action_repeat=recording.get("action_repeat", 4), stickiness=recording.get("stickiness", 0.8))
        dataset = section(params, "datasets", name)
        crop = tuple(dataset["crop"]) if dataset.get("crop") else None
        report = ingest(layout.raw_video(name), layout.frames(name), size=int(params["data"]["size"]),
                        fps=float(params["data"]["fps"]), crop=crop, fit=dataset.get("fit", "crop"), progress=False)
        tokenize_store(tokenizer, layout.frames(name), layout.tokens(name), device=device, attrs={}, progress=False,
                       batch_size=int(section(params, "tokenize", "batch_size")))
        cache_latent_actions(lam, {name: (layout.frames(name), layout.latent_actions(name))}, split=split_config(params),
                             clip_len=preset.clip_len["lam"], frame_skip=int(params["data"]["frame_skip"]), device=device)
        print(f"  {name}: {report.frames} frames of {recording['game']} recorded, ingested, tokenized "
              f"({time.perf_counter() - start:.0f} s)")
    return names


def loader_clips_per_s(loader, batches: int, runs: int = 5) -> tuple[float, float]:
    """(seconds to the first batch, median clips/s over `runs` runs of `batches` batches after it)."""
    iterator = iter(loader)
    start = time.perf_counter()
    next(iterator)
    first = time.perf_counter() - start
    rates = []
    for _ in range(runs):
        start, clips = time.perf_counter(), 0
        for _ in range(batches):
            batch = next(iterator)
            clips += len(next(iter(batch.values())))
        rates.append(clips / (time.perf_counter() - start))
    return first, statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=None,
                        help="source frames recorded per game (60 fps); default: params.yaml's recordings")
    parser.add_argument("--batches", type=int, default=100, help="batches per timed loader run")
    parser.add_argument("--reps", type=int, default=5, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--preset", choices=list(harness.PRESETS), default="default",
                        help="model sizes; frames are ingested at the preset's frame size")
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "loader.json")
    harness.add_machine_args(parser)
    args = parser.parse_args()

    device, info = harness.start(args)
    params = load_params(harness.ROOT / "params.yaml")
    preset = harness.PRESETS[args.preset]()
    params["data"]["size"] = preset.tokenizer.frame_size  # frames the preset's models take
    results = {"machine": info, "frames_recorded": args.frames, "batches": args.batches, "reps": args.reps,
               "preset": preset.summary(), "stages": {}}
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        root = Path(tmp)
        print(f"building a project in {root} ...")
        names = build_project(root, params, preset, args.frames, device)
        data = data_root(params, Layout(root))
        videos = {"tokenizer": frame_videos(data, names), "lam": frame_videos(data, names),
                  "dynamics": token_videos(data, names)}
        print(f"\n  {'stage':10s} {'workers':>7s} {'preload':>7s} {'first batch':>11s} {'loader clips/s':>14s} "
              f"{'training clips/s':>16s} {'ratio':>7s} {'streaming clips/s':>17s}")
        for stage in harness.STAGES:
            train_set, _ = clip_datasets(params, videos[stage], preset.clip_len[stage])
            model = harness.build_model(preset, stage)
            trainer = make_trainer(stage, model, preset, device, args, root / "state", train_set=train_set)
            first, loaded = loader_clips_per_s(trainer.build_loader(0), args.batches)
            batch = next(iter(trainer.build_loader(0)))
            step = time_train_steps({stage: (trainer, batch)}, args)[stage]
            consumed = preset.batch[stage] / step
            streaming = ClipDataset(videos[stage], clip_len=preset.clip_len[stage], split="train",
                                    split_config=split_config(params), preload=False)
            _, streamed = loader_clips_per_s(make_trainer(stage, model, preset, device, args, root / "state",
                                                          train_set=streaming).build_loader(0), args.batches)
            row = {"num_workers": trainer.config.num_workers, "preload": train_set.preload, "clips": len(train_set),
                   "batch": preset.batch[stage], "clip_len": preset.clip_len[stage],
                   "first_batch_s": first, "loader_clips_per_s": loaded, "train_ms_per_step": 1000 * step,
                   "train_clips_per_s": consumed, "loader_over_training": loaded / consumed,
                   "streaming_loader_clips_per_s": streamed}
            results["stages"][stage] = row
            print(f"  {stage:10s} {row['num_workers']:7d} {str(row['preload']):>7s} {first:10.2f}s {loaded:14,.0f} "
                  f"{consumed:16,.1f} {row['loader_over_training']:6.0f}x {streamed:17,.0f}")
    harness.write_results(args.out, results)


if __name__ == "__main__":
    main()
