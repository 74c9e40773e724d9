"""CPU threads under contention: batch-1 generation (what `tinyworlds play` and `dream` do) at
each thread count, on an idle machine and beside other busy processes, and the count that
`--threads auto` picks in each case.

    python bench/bench_threads.py                      # default sizes, 1..all cores, 0 and 1 busy
    python bench/bench_threads.py --busy 0 1 2 --preset reference

A busy process here is a plain Python spin loop (one core's worth of load), started before the
timing and stopped after it. Figures are medians over --reps rollouts after one untimed one.
Writes bench/results/threads.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from pathlib import Path

import harness
import torch
from bench_models import rollout_inputs

from tinyworlds.core.device import cpu_cores, set_inference_threads


def spin(stop) -> None:
    while not stop.is_set():
        pass


class BusyProcesses:
    """`count` processes that each keep one core busy while the block runs."""

    def __init__(self, count: int):
        self.count = count

    def __enter__(self):
        context = multiprocessing.get_context("spawn")
        self.stop = context.Event()
        self.processes = [context.Process(target=spin, args=(self.stop,), daemon=True) for _ in range(self.count)]
        for process in self.processes:
            process.start()
        time.sleep(1.0)  # let them reach the spin loop
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for process in self.processes:
            process.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(harness.PRESETS), default="default")
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="other busy processes, per case")
    parser.add_argument("--steps", type=int, default=10, help="MaskGIT steps per generated frame")
    parser.add_argument("--frames", type=int, default=4, help="frames generated per rollout")
    parser.add_argument("--reps", type=int, default=3, help="timed rollouts per figure")
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "threads.json")
    args = parser.parse_args()

    device = torch.device("cpu")
    info = harness.machine(device)
    print(harness.describe(info))
    (preset,) = harness.presets(args.preset)
    dynamics = harness.build_model(preset, "dynamics").eval()
    context, context_actions, actions = rollout_inputs(preset, 1, args.frames, device)

    def rollout() -> None:
        dynamics.generate(context, actions, context_actions=context_actions, steps=args.steps)

    counts = list(range(1, cpu_cores() + 1))
    print(f"{preset.name} sizes, batch 1, {args.steps} MaskGIT steps; frames/s by torch threads")
    print(f"  {'busy':>4s} " + " ".join(f"{f'{n} thr':>7s}" for n in counts) + f"  {'auto picks':>10s}")
    cases = {}
    for busy in args.busy:
        with BusyProcesses(busy):
            note = set_inference_threads("auto", device)
            auto = torch.get_num_threads()
            rates = {}
            for threads in counts:
                torch.set_num_threads(threads)
                seconds = harness.median_seconds(rollout, device, warmup=1, reps=args.reps)
                rates[threads] = args.frames / seconds
        cases[f"busy_{busy}"] = {"busy_processes": busy, "frames_per_s": rates, "auto_threads": auto, "auto_note": note}
        print(f"  {busy:4d} " + " ".join(f"{rates[n]:7.1f}" for n in counts) + f"  {auto:10d}")
    harness.write_results(args.out, {"machine": info, "preset": preset.summary(), "steps": args.steps,
                                     "frames": args.frames, "reps": args.reps, "cases": cases})


if __name__ == "__main__":
    main()
