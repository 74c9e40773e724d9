"""Run the benchmarks and summarise them: one JSON, and markdown tables for the README.

    python bench/run_all.py                                  # everything, on the best device
    python bench/run_all.py --threads 1 --only training generation
    python bench/run_all.py --device cuda --bf16 --compile   # MFU of dynamics on CUDA
    python bench/run_all.py --summarize                      # tables from the JSON already there
    TW_REF=/path/to/tinyworlds python bench/run_all.py       # and TinyWorlds side by side

Each bench runs in its own process and writes bench/results/NAME.json; this then writes
bench/results/summary.json (all of them) and summary.md (the tables it prints). --device and
--threads go to every bench that runs a model, --bf16 to training, loader and generation,
--compile to training and loader. Ingest is CPU work and takes none of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import harness

BENCH = Path(__file__).resolve().parent
# name -> (script, results file, the options it takes)
BENCHES = {
    "ingest": ("bench_ingest.py", "ingest.json", ()),
    "loader": ("bench_loader.py", "loader.json", ("device", "threads", "bf16", "compile")),
    "training": ("bench_training.py", "training.json", ("device", "threads", "bf16", "compile")),
    "generation": ("bench_models.py", "generation.json", ("device", "threads", "bf16")),
    "threads": ("bench_threads.py", "threads.json", ()),
    "tinyworlds": ("bench_tinyworlds.py", "tinyworlds.json", ("threads",)),
}
# TinyWorlds side by side runs by default only where TW_REF names its tree (minutes per
# thread count); otherwise ask for it with --only tinyworlds (our side alone, as it says).
DEFAULT = [name for name in BENCHES if name != "tinyworlds" or os.environ.get("TW_REF")]


def run(name: str, args: argparse.Namespace) -> None:
    script, out, takes = BENCHES[name]
    command = [sys.executable, str(BENCH / script), "--out", str(args.results / out)]
    for option in takes:
        value = getattr(args, option)
        if value is True:
            command.append(f"--{option}")
        elif value not in (None, False):
            command += [f"--{option}", str(value)]
    print(f"\n$ {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True)


def machine_line(results: dict) -> str:
    machines = {name: r["machine"] for name, r in results.items() if "machine" in r}
    if not machines:
        return ""
    first = next(iter(machines.values()))
    each = "; ".join(f"{name}: {m['cpu_threads']} thread(s), load {m['load_average_before'][0]:.1f}"
                     if m.get("load_average_before") else f"{name}: {m['cpu_threads']} thread(s)"
                     for name, m in machines.items())
    return (f"{first['device_name']} ({first['device']}, {first['cpu_count']} cores), torch {first['torch']}. "
            f"CPU threads and 1-minute load average at the start: {each}. Medians after warm-up.")


def generation_table(r: dict) -> list[str]:
    lines = [f"Generation ({r['steps']} MaskGIT steps a frame, temperature {r['temperature']:g}, window-full context, "
             f"median of {r['reps']} rollouts of {r['frames']} frames)", "",
             "| sizes | batch | ms/frame | frames/s | uncached ms/frame | cache speed-up | per sample vs batch 1 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, preset in r["presets"].items():
        for batch, row in preset["batches"].items():
            cached = row["cached"]
            uncached = row.get("uncached", {}).get("ms_per_frame")
            lines.append(f"| {name} | {batch.removeprefix('batch_')} | {cached['ms_per_frame']:.0f} | "
                         f"{cached['frames_per_s']:.1f} | {harness.number(uncached, '.0f')} | "
                         f"{harness.number(row.get('cache_speedup'), '.1f', 'x')} | "
                         f"{harness.number(row.get('per_sample_vs_batch_1'), '.2f')} |")
    return lines


def training_table(r: dict) -> list[str]:
    lines = [f"Training step (forward, backward, AdamW; median of {r['reps']})", "",
             "| sizes | model | batch x frames | ms/step | steps/s | tokens/s |", "|---|---|---:|---:|---:|---:|"]
    for name, preset in r["presets"].items():
        models = preset["models"]
        rows = [(stage, models[stage]) for stage in ("tokenizer", "lam")]
        rows += [("dynamics (token cache)", models["dynamics"]),
                 ("dynamics (tokenize in step)", models["dynamics"]["on_the_fly"])]
        for label, row in rows:
            lines.append(f"| {name} | {label} | {row['batch']} x {row['clip_len']} | {row['ms_per_step']:.0f} | "
                         f"{row['steps_per_s']:.2f} | {row['tokens_per_s']:,.0f} |")
    cache = ", ".join(f"{name} {p['models']['dynamics']['cache_speedup']:.2f}x (the encoder alone: "
                      f"{p['models']['dynamics']['tokenize_ms_per_batch']:.0f} ms a batch)"
                      for name, p in r["presets"].items())
    lines += ["", f"Token cache vs tokenizing in the step (dynamics steps/s): {cache}."]
    mfu = [f"{name} {p['models']['dynamics']['mfu']:.1%}" for name, p in r["presets"].items()
           if p["models"]["dynamics"]["mfu"]]
    if mfu:
        lines.append(f"Dynamics model FLOPs utilisation: {', '.join(mfu)}.")
    return lines


def loader_table(r: dict) -> list[str]:
    lines = ["Data loader vs training (default sizes, params.yaml workers and preload)", "",
             "| stage | loader clips/s | training clips/s | ratio | streaming (no preload) clips/s |",
             "|---|---:|---:|---:|---:|"]
    for stage, row in r["stages"].items():
        lines.append(f"| {stage} | {row['loader_clips_per_s']:,.0f} | {row['train_clips_per_s']:.1f} | "
                     f"{row['loader_over_training']:,.0f}x | {row['streaming_loader_clips_per_s']:,.0f} |")
    return lines


def ingest_table(r: dict) -> list[str]:
    rates, ratios = r["source_frames_per_s"], r["ratios"]
    return ["Ingest (source frames/s)", "",
            "| plain decode | ingest at 15 fps | ingest at source fps | plain / ingest |",
            "|---:|---:|---:|---:|",
            f"| {rates['plain_decode_1_thread']:,.0f} | {rates['ingest_15fps']:,.0f} | "
            f"{rates['ingest_source_fps']:,.0f} | "
            f"{ratios['plain_over_ingest_15fps']:.2f}x |"]


def threads_table(r: dict) -> list[str]:
    counts = list(next(iter(r["cases"].values()))["frames_per_s"])
    lines = [f"CPU threads: batch-1 generation frames/s beside other busy processes ({r['preset']['name']} sizes)", "",
             "| busy processes | " + " | ".join(f"{n} thread(s)" for n in counts) + " | `--threads auto` picks |",
             "|---:|" + "---:|" * (len(counts) + 1)]
    for case in r["cases"].values():
        rates = " | ".join(f"{rate:.1f}" for rate in case["frames_per_s"].values())
        lines.append(f"| {case['busy_processes']} | {rates} | {case['auto_threads']} |")
    return lines


def tinyworlds_table(r: dict) -> list[str]:
    sides = r["sides"][1:]
    lines = [f"Beside TinyWorlds (bench_tinyworlds.py; ms a training step or a generated frame, median of "
             f"{r['reps']} turns; ratios: the other side's time over ours; share: our model FLOP/s of this CPU's "
             f"fp32 GEMM peak)", "",
             "| threads | sizes | part | ours ms | " + " | ".join(f"{side} / ours" for side in sides)
             + " | share of peak |", "|---:|---|---|---:|" + "---:|" * (len(sides) + 1)]
    for run in r["runs"]:
        for preset, rows in run["presets"].items():
            for part, row in rows.items():
                ours = row["ours"]
                ratios = " | ".join(f"{row[f'{side}_over_ours']:.2f}x" for side in sides)
                share = harness.number(ours.get("share_of_gemm_peak"), ".1%")
                lines.append(f"| {run['threads']} | {preset} | {part} | {1000 * ours['seconds']:.1f} | "
                             + (f"{ratios} | " if sides else "") + f"{share} |")
    if not r.get("tw_ref"):
        lines += ["", "No TinyWorlds tree (TW_REF unset): our own sides alone."]
    return lines


TABLES = {"generation": generation_table, "training": training_table, "loader": loader_table, "ingest": ingest_table,
          "threads": threads_table, "tinyworlds": tinyworlds_table}


def summarize(results_dir: Path) -> str:
    """Tables from every bench's JSON in `results_dir` (each states the run it came from)."""
    results = {}
    for name in BENCHES:
        path = results_dir / BENCHES[name][1]
        if path.is_file():
            results[name] = json.loads(path.read_text())
    blocks = [machine_line(results)]
    for name in ("generation", "threads", "training", "tinyworlds", "loader", "ingest"):
        if name in results:
            blocks.append("\n".join(TABLES[name](results[name])))
    markdown = "\n\n".join(blocks) + "\n"
    (results_dir / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    (results_dir / "summary.md").write_text(markdown)
    return markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), default=DEFAULT,
                        help="run these (default: all, tinyworlds only with TW_REF set); the summary covers "
                             "every bench's latest JSON")
    parser.add_argument("--summarize", action="store_true", help="only rebuild the summary from existing JSON")
    parser.add_argument("--results", type=Path, default=harness.RESULTS)
    harness.add_machine_args(parser)
    args = parser.parse_args()
    if not args.summarize:
        for name in args.only:
            run(name, args)
    print("\n" + summarize(args.results))
    print(f"wrote {args.results / 'summary.json'} and {args.results / 'summary.md'}")


if __name__ == "__main__":
    main()
