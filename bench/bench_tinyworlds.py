"""Training and generation speed beside TinyWorlds (AlmondGod/tinyworlds) in one run, and each
training step's share of this CPU's measured fp32 GEMM peak.

    TW_REF=/path/to/tinyworlds python bench/bench_tinyworlds.py    # reference + default sizes, 1 and 2 threads
    python bench/bench_tinyworlds.py --tw-ref PATH --preset reference --threads 1
    python bench/bench_tinyworlds.py --tw-ref PATH --parts lam     # one step only
    python bench/bench_tinyworlds.py --preset tiny                  # no TW_REF: our side only, as it says

TW_REF (or --tw-ref) is an exported tree of AlmondGod/tinyworlds (its latest commit; never
committed here). Its own model classes, optimizer and schedule are imported from there at run
time and driven as its training scripts drive them: `loss = model(...)`, backward, gradient
clipping at 1, fused AdamW, cosine schedule; generation is its `forward_inference` (one frame,
MaskGIT). Ours is `Trainer.train_step` as the stages run it, and `DynamicsModel.generate`.
Both sides run fp32 (TinyWorlds' `amp: true` is bf16 autocast; ours is fp32 on CPU) with
the same sizes (`harness.py` presets; TinyWorlds' MLP width 4 x embed, as its configs).

Sides, each its own process so that glibc's allocator is set per process:
- `ours`: as the stages run, freed memory kept (`keep_freed_memory()`, as `run_stage` does);
- `ours_glibc`: ours with glibc's default allocator (what the stages did before);
- `tw`: TinyWorlds as it ships (glibc's defaults);
- `tw_tuned`: TinyWorlds with GLIBC_TUNABLES set to keep freed memory (TUNED below).
The processes start once per thread count; for each part every side warms up, then they take
timed turns, one step (or one rollout) each, so load from other jobs falls on all alike.
Figures are medians; ratios are TinyWorlds' time over ours. Minor page faults per step come
from getrusage. Model FLOPs of a training step (forward and backward) are counted with
torch.utils.flop_counter.FlopCounterMode, once, untimed; achieved FLOP/s over the best of
--reps large fp32 matmuls at the same thread count is the share of this CPU's peak.
Writes bench/results/tinyworlds.json.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import harness
import torch

TUNED = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000:glibc.malloc.top_pad=1073741824"
SIDES = {  # side -> (whose code, GLIBC_TUNABLES, mallopt at start)
    "ours": ("ours", None, True),
    "ours_glibc": ("ours", None, False),
    "tw": ("tw", None, False),
    "tw_tuned": ("tw", TUNED, False),
}
PARTS = ("tokenizer", "lam", "dynamics", "generation")
TW_FILES = ("models/video_tokenizer.py", "models/latent_actions.py", "models/dynamics.py", "models/st_transformer.py",
            "utils/optimizer_utils.py", "utils/scheduler_utils.py")
REPLY = "@@bench "  # prefix of a worker's reply line


# ---------------------------------------------------------------------------------------------
# FLOPs: FlopCounterMode knows the CUDA attention kernels; teach it the CPU one


def count_cpu_attention() -> None:
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    forward, backward = (aten._scaled_dot_product_flash_attention_for_cpu,
                         aten._scaled_dot_product_flash_attention_for_cpu_backward)
    if forward not in fc.flop_registry:
        fc.register_flop_formula(forward)(
            lambda q, k, v, *args, out_shape=None, **kwargs: fc.sdpa_flop_count(q, k, v))
    if backward not in fc.flop_registry:
        fc.register_flop_formula(backward)(
            lambda g, q, k, v, *args, out_shape=None, **kwargs: fc.sdpa_backward_flop_count(g, q, k, v))


def step_flops(step) -> int:
    """Model FLOPs of one call of `step` (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    count_cpu_attention()
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------
# the two sides' steps: each part is (step function, model FLOPs or None, parameters)


def ours_part(preset: harness.Preset, part: str, args, state_dir: Path):
    import bench_models
    import bench_training

    from tinyworlds.models import count_parameters

    device = torch.device("cpu")
    if part == "generation":
        model = harness.build_model(preset, "dynamics").eval()
        context, context_actions, actions = bench_models.rollout_inputs(preset, 1, args.frames, device)

        def rollout() -> float:
            model.generate(context, actions, context_actions=context_actions, steps=args.steps,
                           temperature=1.0, use_cache=True)
            return args.frames

        return rollout, None, count_parameters(model)
    ns = argparse.Namespace(bf16=False, compile=args.compile)
    trainer = bench_training.make_trainer(part, harness.build_model(preset, part), preset, device, ns, state_dir)
    batches = itertools.repeat(bench_training.synthetic_batch(preset, part, frames=part != "dynamics"))

    def step() -> float:
        trainer.train_step(batches)
        return 1

    return step, step_flops(step), count_parameters(trainer.model)


def tw_part(preset: harness.Preset, part: str, args):
    """TinyWorlds' classes at the preset's sizes, stepped as its scripts/train_*.py step them."""
    from models.dynamics import DynamicsModel
    from models.latent_actions import LatentActionModel
    from models.video_tokenizer import VideoTokenizer
    from utils.optimizer_utils import create_optimizer
    from utils.scheduler_utils import create_cosine_scheduler

    tok, lam, dyn = preset.tokenizer, preset.lam, preset.dynamics
    g = torch.Generator().manual_seed(0)
    frames = (preset.clip_len.get(part, dyn.max_frames), 3, tok.frame_size, tok.frame_size)
    n_actions = math.prod(lam.levels)

    def tokenizer():
        return VideoTokenizer((tok.frame_size,) * 2, tok.patch_size, tok.embed_dim, tok.num_heads, 4 * tok.embed_dim,
                              tok.encoder_blocks, latent_dim=len(tok.levels), num_bins=tok.levels[0])

    if part == "tokenizer":
        model = tokenizer()
    elif part == "lam":
        model = LatentActionModel((lam.frame_size,) * 2, n_actions, lam.patch_size, lam.embed_dim, lam.num_heads,
                                  4 * lam.embed_dim, lam.encoder_blocks)
    else:
        model = DynamicsModel((tok.frame_size,) * 2, tok.patch_size, dyn.embed_dim, dyn.num_heads, 4 * dyn.embed_dim,
                              dyn.num_blocks, num_bins=tok.levels[0], n_actions=n_actions,
                              conditioning_dim=int(math.log2(n_actions)), latent_dim=len(tok.levels))
    parameters = sum(p.numel() for p in model.parameters())
    quantizer = tokenizer().quantizer
    action_dim = int(math.log2(n_actions))

    if part == "generation":
        model.eval()
        context = torch.randint(0, quantizer.codebook_size, (1, dyn.max_frames - 1, dyn.num_patches), generator=g)
        context = quantizer.get_latents_from_indices(context)  # [1, T, P, L]
        actions = torch.randint(0, 2, (1, dyn.max_frames - 1, action_dim), generator=g).float() * 2 - 1  # [1, T, A]

        def rollout() -> float:
            for _ in range(args.frames):  # one frame a call, as scripts/run_inference.py makes them
                model.forward_inference(context, 1, args.steps, quantizer.get_latents_from_indices,
                                        conditioning=actions, temperature=1.0)
            return args.frames

        return rollout, None, parameters

    batch, t = preset.batch[part], preset.clip_len[part]
    if part == "dynamics":  # tokens and actions given, as a cache would give them
        tokens = torch.randint(0, quantizer.codebook_size, (batch, t, dyn.num_patches), generator=g)  # [B, T, P]
        latents = quantizer.get_latents_from_indices(tokens)  # [B, T, P, L]
        actions = torch.randint(0, 2, (batch, t - 1, action_dim), generator=g).float() * 2 - 1  # [B, T-1, A]

        def loss():
            return model(latents, training=True, conditioning=actions, targets=tokens)[2]
    else:
        x = torch.rand((batch, *frames), generator=g) * 2 - 1  # [B, T, C, H, W] in [-1, 1]

        def loss():
            return model(x)[0]

    model.train()
    optimizers = create_optimizer(model, argparse.Namespace(optimizer="adamw", learning_rate=1e-3))
    schedulers = [create_cosine_scheduler(o, 10_000) for o in optimizers]

    def step() -> float:
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        for o in optimizers:
            o.step()
        for s in schedulers:
            s.step()
        value.cpu().detach()  # its loop keeps every loss on the host
        return 1

    return step, step_flops(step), parameters


def gemm(n: int):
    a, b = torch.randn(n, n), torch.randn(n, n)

    def matmul() -> float:
        torch.mm(a, b)
        return 1

    return matmul, 2 * n**3, 0


# ---------------------------------------------------------------------------------------------
# a worker: one side, one thread count; prepares a part, then times one call per request


def worker(args) -> None:
    code, _, mallopt = SIDES[args.worker]
    reply_to = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr, not into the replies
    kept = False
    if mallopt:
        from tinyworlds.core.stage import keep_freed_memory

        kept = keep_freed_memory()
    torch.set_num_threads(args.threads)
    if code == "tw":
        sys.path.insert(0, str(args.tw_ref))
    state_dir = Path(tempfile.mkdtemp(prefix="bench_tinyworlds_"))
    current = None
    reply_to.write(REPLY + json.dumps({"ready": True, "threads": torch.get_num_threads(), "mallopt": kept}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "prepare":
                current = None
                gc.collect()
                part = request["part"]
                if part == "gemm":
                    current = gemm(request["n"])
                else:
                    preset = harness.PRESETS[request["preset"]]()
                    current = ours_part(preset, part, args, state_dir) if code == "ours" else tw_part(preset, part, args)
                fn = current[0]
                for _ in range(request["warmup"]):
                    fn()
                answer = {"flops": current[1], "parameters": current[2]}
            elif request["op"] == "time":
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                units = current[0]()
                seconds = (time.perf_counter() - start) / units
                answer = {"seconds": seconds,
                          "page_faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / units}
            else:
                break
        except Exception:  # noqa: BLE001 - any failure goes back to the orchestrator, which stops
            answer = {"error": traceback.format_exc()}
        reply_to.write(REPLY + json.dumps(answer) + "\n")


class Worker:
    """The orchestrator's handle on a worker process."""

    def __init__(self, side: str, threads: int, args) -> None:
        self.side = side
        _, tunables, _ = SIDES[side]
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        if tunables:
            env["GLIBC_TUNABLES"] = tunables
        command = [sys.executable, __file__, "--worker", side, "--threads", str(threads), "--steps", str(args.steps),
                   "--frames", str(args.frames)] + (["--tw-ref", str(args.tw_ref)] if args.tw_ref else []) + (
                   ["--compile"] if args.compile else [])
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self.read()

    def read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(REPLY):
                answer = json.loads(line[len(REPLY):])
                if "error" in answer:
                    self.close()
                    sys.exit(f"error: worker {self.side} failed:\n{answer['error']}")
                return answer
        sys.exit(f"error: worker {self.side} exited with status {self.process.wait()}")

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait()


def in_turns(workers: list[Worker], request: dict, reps: int) -> dict[str, dict]:
    """Prepare the part on every worker, then `reps` rounds of one timed call each, in turns."""
    prepared = {w.side: w.ask(op="prepare", **request) for w in workers}
    times: dict[str, list[float]] = {w.side: [] for w in workers}
    faults: dict[str, list[float]] = {w.side: [] for w in workers}
    for _ in range(reps):
        for w in workers:
            answer = w.ask(op="time")
            times[w.side].append(answer["seconds"])
            faults[w.side].append(answer["page_faults"])
    return {side: {"seconds": statistics.median(times[side]), "best_seconds": min(times[side]), "all_seconds": times[side],
                   "page_faults": statistics.median(faults[side]), **prepared[side]} for side in times}


# ---------------------------------------------------------------------------------------------
# the run


def check_tw_ref(path: Path | None) -> Path | None:
    if path is None:
        return None
    missing = [f for f in TW_FILES if not (path / f).is_file()]
    if missing:
        sys.exit(f"error: TW_REF={path}: not a TinyWorlds tree (no {missing[0]}); export AlmondGod/tinyworlds there")
    return path.resolve()


def tree_digest(path: Path) -> str:
    """sha256 of TinyWorlds' model and optimizer files: which version was measured."""
    digest = hashlib.sha256()
    for f in TW_FILES:
        digest.update((path / f).read_bytes())
    return digest.hexdigest()[:16]


def run_threads(threads: int, sides: list[str], presets: list[str], args) -> dict:
    print(f"\n{threads} thread(s), sides {', '.join(sides)}; load average {harness.load_average()}", flush=True)
    workers = [Worker(side, threads, args) for side in sides]
    try:
        ours = workers[0]
        peak = in_turns([ours], {"part": "gemm", "n": args.gemm_size, "warmup": 2}, args.reps)["ours"]
        peak["gflops"] = peak["flops"] / peak["best_seconds"] / 1e9
        print(f"  fp32 GEMM {args.gemm_size}x{args.gemm_size}: {peak['gflops']:.1f} GFLOP/s (best of {args.reps}; "
              f"median {peak['flops'] / peak['seconds'] / 1e9:.1f})", flush=True)
        result = {"threads": threads, "gemm": peak, "load_average_before": harness.load_average(), "presets": {}}
        for preset in presets:
            rows = {}
            for part in args.parts:
                warmup = args.warmup + (2 if args.compile and part != "generation" else 0)
                row = in_turns(workers, {"preset": preset, "part": part, "warmup": warmup}, args.reps)
                for side in row.values():
                    if side["flops"]:
                        side["gflops_per_s"] = side["flops"] / side["seconds"] / 1e9
                        side["share_of_gemm_peak"] = side["gflops_per_s"] / peak["gflops"]
                for side in sides[1:]:
                    row[f"{side}_over_ours"] = row[side]["seconds"] / row["ours"]["seconds"]
                rows[part] = row
                print_row(preset, part, row, sides, flush=True)
            result["presets"][preset] = rows
        result["load_average_after"] = harness.load_average()
        return result
    finally:
        for w in workers:
            w.close()


def print_row(preset: str, part: str, row: dict, sides: list[str], flush: bool = False) -> None:
    unit = "ms/frame" if part == "generation" else "ms/step"
    times = "  ".join(f"{side} {1000 * row[side]['seconds']:8.1f}" for side in sides)
    ratios = "  ".join(f"{side}/ours {row[f'{side}_over_ours']:.2f}x" for side in sides[1:])
    ours = row["ours"]
    share = (f"  ours {ours['flops'] / 1e9:.2f} GFLOP, {ours['gflops_per_s']:.1f} GFLOP/s = "
             f"{ours['share_of_gemm_peak']:.1%} of peak") if ours["flops"] else ""
    print(f"  {preset:9s} {part:10s} {unit}: {times}  {ratios}{share}", flush=flush)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tw-ref", type=Path, default=os.environ.get("TW_REF") or None,
                        help="an exported AlmondGod/tinyworlds tree (default: $TW_REF; unset: our side only)")
    parser.add_argument("--preset", nargs="+", choices=list(harness.PRESETS), default=["reference", "default"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which steps to time")
    parser.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES),
                        help="which to run (ours always; TinyWorlds' only with a tree)")
    parser.add_argument("--reps", type=int, default=3, help="timed turns per side and part")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first, per side and part")
    parser.add_argument("--steps", type=int, default=10, help="MaskGIT steps per generated frame")
    parser.add_argument("--frames", type=int, default=2, help="frames per timed rollout (batch 1)")
    parser.add_argument("--gemm-size", type=int, default=2048, help="n of the n x n fp32 matmul that measures the peak")
    parser.add_argument("--compile", action="store_true", help="torch.compile our training step")
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "tinyworlds.json")
    parser.add_argument("--worker", choices=list(SIDES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        worker(args)
        return

    args.tw_ref = check_tw_ref(args.tw_ref)
    sides = ["ours"] + [s for s in args.sides if s != "ours" and (args.tw_ref or SIDES[s][0] == "ours")]
    if args.tw_ref is None:
        print("TW_REF is not set: timing our side only (set TW_REF or --tw-ref to an exported AlmondGod/tinyworlds "
              "tree for the comparison)")
    info = harness.machine(torch.device("cpu"))
    print(harness.describe(info))
    results = {"machine": info, "tw_ref": str(args.tw_ref) if args.tw_ref else None,
               "tw_digest": tree_digest(args.tw_ref) if args.tw_ref else None, "sides": sides,
               "tunables": TUNED, "reps": args.reps, "warmup": args.warmup, "steps": args.steps, "frames": args.frames,
               "compile": args.compile, "gemm_size": args.gemm_size, "presets": {p: harness.PRESETS[p]().summary()
                                                                                   for p in args.preset},
               "runs": [run_threads(threads, sides, args.preset, args) for threads in args.threads]}
    harness.write_results(args.out, results)


if __name__ == "__main__":
    main()
