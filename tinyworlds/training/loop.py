"""One training loop for the tokenizer, the latent action model and the dynamics model.

Assembled from named steps (`build_optimizer`, `build_loaders`, `restore_if_possible`,
`train_step`, `validate`, `save_state`) around a model-specific `loss_fn(model, batch) ->
(loss, metrics)`. What it guarantees:

- Reproducible: the batch of step k is drawn from a generator seeded by (seed, k), so a
  resumed run sees exactly the data the uninterrupted run would have.
- Resumable: every `checkpoint_every` steps the whole training state (weights, optimizer,
  scheduler, RNG, history) goes to `state_dir`, atomically. A later call with the same
  fingerprint (config + data) continues from there; a different fingerprint starts over.
  Ctrl-C / SIGTERM finish the current step, save, and stop with exit status 130.
- Sync-free hot path: losses are summed on the device and read once per `log_every` steps.
  A non-finite loss is noticed there and stops training with the first bad step named;
  since checkpoints are only written after that check, the last one on disk is good.
- Distributed: under torchrun (`train.nproc` > 1) the same loop runs on every rank with DDP
  or FSDP2, each rank on its slice of the global batch, rank 0 alone writing; see
  `tinyworlds.training.distributed`.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Sampler

from tinyworlds.core.atomic import atomic_output
from tinyworlds.core.device import autocast, configure_backends, resolve_precision
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.training import distributed

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1  # micro-batches of batch_size per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 25
    val_every: int = 250
    val_batches: int = 8
    checkpoint_every: int = 250
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 elsewhere
    compile: bool = False
    num_workers: int = 0
    seed: int = 0
    fsdp: bool = False  # with several processes: FSDP2 (sharded weights and optimizer) instead of DDP
    # How many videos one batch draws its clips from: null, any (every clip drawn alone); N,
    # N videos (drawn in proportion to their clips), the batch split evenly between them, for losses
    # that take statistics per video over the batch, which a few clips estimate badly.
    videos_per_batch: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "val_every", "val_batches", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise TinyWorldsError(f"train.{name}={getattr(self, name)}: must be a positive whole number")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise TinyWorldsError(f"train.lr={self.lr}: must be a positive number")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise TinyWorldsError(f"train.warmup_steps={self.warmup_steps}: must be in [0, steps={self.steps})")
        if self.num_workers < 0:
            raise TinyWorldsError(f"train.num_workers={self.num_workers}: must be >= 0")
        if self.videos_per_batch is not None and not (
                isinstance(self.videos_per_batch, int) and not isinstance(self.videos_per_batch, bool)
                and 1 <= self.videos_per_batch <= self.batch_size):
            raise TinyWorldsError(f"train.videos_per_batch={self.videos_per_batch!r}: must be null or a whole number "
                                  f"from 1 to batch_size={self.batch_size}")
        # Validation and checkpoints happen at log boundaries, where the loop syncs anyway.
        for name in ("val_every", "checkpoint_every"):
            if getattr(self, name) % self.log_every:
                raise TinyWorldsError(f"train.{name}={getattr(self, name)}: must be a multiple of log_every={self.log_every}")


class StepBatchSampler(Sampler[list[int]]):
    """Batches of indices for micro-steps [start, stop): batch k depends only on (seed, k).

    `batch_size` is the global batch: with `world_size` processes, batch k is the same as in
    one process and rank r takes its contiguous slice of batch_size / world_size indices.
    With `videos` (the video of each item, [num_items]) and `videos_per_batch` N, batch k holds
    the items of N distinct videos (all of them, if fewer), split as evenly as the batch
    allows; each video is drawn in proportion to its items among those not yet drawn, so the
    videos get batches about as often as mixed batches would show them.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int, stop: int,
                 rank: int = 0, world_size: int = 1, videos: Sequence[int] | None = None,
                 videos_per_batch: int | None = None) -> None:
        if batch_size % world_size:
            raise TinyWorldsError(f"train.batch_size={batch_size}: must divide by the number of processes ({world_size})")
        self.num_items, self.batch_size, self.seed, self.start, self.stop = num_items, batch_size, seed, start, stop
        self.rank, self.world_size, self.videos_per_batch = rank, world_size, videos_per_batch
        self.members: list[torch.Tensor] = []  # per video: its items' indices
        if videos_per_batch is not None:
            video_of = torch.as_tensor(videos if videos is not None else [], dtype=torch.long)
            if video_of.shape != (num_items,):
                raise TinyWorldsError(f"videos_per_batch: {video_of.numel()} video ids for {num_items} items")
            self.members = [torch.nonzero(video_of == v).flatten() for v in video_of.unique()]

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator()
        share = self.batch_size // self.world_size
        for micro_step in range(self.start, self.stop):
            generator.manual_seed(self.seed * 1_000_003 + micro_step)
            if self.videos_per_batch is None:
                batch = torch.randint(self.num_items, (self.batch_size,), generator=generator)  # [B], global
            else:
                batch = self.batch_of_videos(generator)  # [B], global
            yield batch[self.rank * share : (self.rank + 1) * share].tolist()

    def batch_of_videos(self, generator: torch.Generator) -> torch.Tensor:
        """One batch [B] of item indices from `videos_per_batch` videos drawn without replacement."""
        left = list(self.members)
        chosen = []
        for _ in range(min(self.videos_per_batch, len(left))):
            sizes = torch.tensor([len(members) for members in left], dtype=torch.float)
            chosen.append(left.pop(int(torch.multinomial(sizes, 1, generator=generator))))
        parts = []
        for i, members in enumerate(chosen):
            count = self.batch_size // len(chosen) + (i < self.batch_size % len(chosen))
            parts.append(members[torch.randint(len(members), (count,), generator=generator)])
        return torch.cat(parts)


def fingerprint(*parts: Any) -> str:
    """A stable hash of the config and data identity a training state belongs to."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device):
    """AdamW (no decay on norms, biases and embeddings' 1-D params) + linear warmup, cosine decay."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        fused=device.type == "cuda",
    )
    schedulers, milestones = [], []
    if config.warmup_steps:
        schedulers.append(torch.optim.lr_scheduler.LinearLR(optimizer, 1e-3, 1.0, total_iters=config.warmup_steps))
        milestones.append(config.warmup_steps)
    schedulers.append(
        torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=config.steps - config.warmup_steps, eta_min=config.lr * config.min_lr_ratio
        )
    )
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers, milestones) if milestones else schedulers[0]
    return optimizer, scheduler


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class StopRequested:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step; a second one kills.

    Under torchrun a rank gets a terminal's Ctrl-C and torchrun's forwarded copy of it, so
    there (`escalate=False`) repeats are ignored: torchrun's SIGKILL after its grace period
    is the hard stop.
    """

    def __init__(self, escalate: bool = True) -> None:
        self.requested = False
        self.escalate = escalate
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and self.escalate:
            raise KeyboardInterrupt
        if self.requested:
            return
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint", file=sys.stderr)

    def __enter__(self) -> StopRequested:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Progress:
    """A rich progress bar on a terminal; plain lines every log interval otherwise (DVC, CI logs)."""

    def __init__(self, name: str, total: int, start: int) -> None:
        self.name, self.total = name, total
        self.live = sys.stderr.isatty()
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), TimeRemainingColumn(), transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task(name, total=total, completed=start, status="")

    def update(self, step: int, status: str) -> None:
        if self.live:
            self.bar.update(self.task, completed=step, status=status)
        else:
            print(f"{self.name} step {step}/{self.total} {status}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.live:
            self.bar.stop()


@dataclass
class TrainResult:
    model: torch.nn.Module
    step: int
    history: list[dict[str, float]]
    final: dict[str, float]
    resumed_from: int


class Trainer:
    """Trains `model` with `loss_fn` on `train_set`, validating on `val_set`.

    In a process group (torchrun) it trains on this rank's slice of every global batch, with
    the model under DDP, or FSDP2 when `config.fsdp`; see `tinyworlds.training.distributed`.
    """

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        loss_fn: LossFn,
        train_set: Dataset,
        val_set: Dataset | None,
        config: TrainConfig,
        device: torch.device,
        state_dir: Path,
        state_fingerprint: str,
        log: Callable[[dict[str, float], int], None] | None = None,
        on_validate: Callable[[torch.nn.Module, int], None] | None = None,
        tokens_per_item: int = 0,
    ) -> None:
        if len(train_set) == 0:
            raise TinyWorldsError(f"{name}: the training split has no clips (videos too short for the clip length?)")
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        self.fsdp = config.fsdp and self.world_size > 1
        # FSDP shards `model` in place: rank 0 keeps an unsharded copy to hand the result back in.
        self.plain_model = distributed.plain_copy(model) if self.fsdp else None
        self.name, self.model, self.loss_fn, self.config, self.device = name, model.to(device), loss_fn, config, device
        self.train_set, self.val_set = train_set, val_set
        self.state_dir, self.state_fingerprint = Path(state_dir), state_fingerprint
        self.log = log or (lambda metrics, step: None)
        self.on_validate = on_validate
        self.tokens_per_item = tokens_per_item
        self.precision = resolve_precision(config.precision, device)
        configure_backends(device)
        # DDP / FSDP wrap `loss_fn(model, batch)` as one forward; the optimizer is built after
        # FSDP has swapped the parameters for their shards.
        self.wrapped = distributed.wrap(self.model, loss_fn, device, self.fsdp) if self.world_size > 1 else None
        self.optimizer, self.scheduler = build_optimizer(self.model, config, device)
        self.step = 0
        self.history: list[dict[str, float]] = []
        forward = self.wrapped if self.wrapped is not None else self.loss_fn
        self.step_fn = torch.compile(forward) if config.compile else forward

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of this rank's batch (through DDP / FSDP when distributed)."""
        return self.step_fn(batch) if self.wrapped is not None else self.step_fn(self.model, batch)

    # -- state -------------------------------------------------------------------------------
    def save_state(self) -> None:
        """Write the training state (rank 0; every rank takes part in gathering it)."""
        rank_rng = None
        if self.world_size > 1:
            cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
            rank_rng = distributed.all_gather({"torch": torch.get_rng_state(), "cuda": cuda})
        if self.fsdp:
            model_state, optimizer_state = distributed.full_state(self.model, self.optimizer)
        else:
            model_state, optimizer_state = self.model.state_dict(), self.optimizer.state_dict()
        if self.is_main:
            with atomic_output(self.state_dir) as tmp:
                tmp.mkdir()
                save_file({k: v.contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
                extra = {
                    "optimizer": optimizer_state,
                    "scheduler": self.scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" and not rank_rng else [],
                }
                if rank_rng:
                    extra["rank_rng"] = rank_rng  # every rank's random stream, in rank order
                torch.save(extra, tmp / "optimizer.pt")
                (tmp / "state.json").write_text(
                    json.dumps({"fingerprint": self.state_fingerprint, "step": self.step, "history": self.history})
                )
        distributed.barrier()

    def saved_meta(self) -> dict[str, Any] | None:
        """state.json of `state_dir` if it holds a state of this very run, else None."""
        meta_path = self.state_dir / "state.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            print(f"{self.name}: ignoring unreadable training state in {self.state_dir}", file=sys.stderr)
            return None
        if meta.get("fingerprint") != self.state_fingerprint:
            print(f"{self.name}: training state in {self.state_dir} is from another config; starting over", file=sys.stderr)
            return None
        return meta

    def restore_if_possible(self) -> int:
        """Continue from `state_dir` if it holds a state of this very run; returns the step.

        Rank 0 decides and tells the others; then every rank loads the weights and optimizer.
        """
        meta = self.saved_meta() if self.is_main else None
        if self.world_size > 1:
            meta = distributed.broadcast(meta)
        if meta is None:
            return 0
        # FSDP shards whole tensors from the CPU; otherwise load straight onto the device.
        where = "cpu" if self.fsdp else self.device
        model_state = load_file(self.state_dir / "model.safetensors", device=str(where))
        extra = torch.load(self.state_dir / "optimizer.pt", map_location=where, weights_only=True)
        if self.fsdp:
            distributed.load_full_state(self.model, self.optimizer, model_state, extra["optimizer"])
        else:
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        self.step, self.history = meta["step"], meta["history"]
        self.restore_rng(extra)
        if self.is_main:
            print(f"{self.name}: resuming from step {self.step} ({self.state_dir})", file=sys.stderr)
        return self.step

    def restore_rng(self, extra: dict[str, Any]) -> None:
        if self.world_size == 1:
            torch.set_rng_state(extra["torch_rng"].cpu())
            if extra["cuda_rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state_all([s.cpu() for s in extra["cuda_rng"]])
            return
        rank_rng = extra.get("rank_rng") or []
        if len(rank_rng) != self.world_size:
            # Written by another number of processes: the batches replay exactly, but the random
            # streams (masks, noise) of the ranks cannot, so they start afresh from the step.
            torch.manual_seed(distributed.rank_seed(self.config.seed + self.step, self.rank))
            return
        mine = rank_rng[self.rank]
        torch.set_rng_state(mine["torch"].cpu())
        if mine["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"].cpu(), self.device)

    # -- data --------------------------------------------------------------------------------
    def build_loader(self, start_step: int) -> DataLoader:
        accum = self.config.grad_accum
        videos = None
        if self.config.videos_per_batch is not None:
            videos = getattr(self.train_set, "item_videos", None)
            if videos is None:
                raise TinyWorldsError(f"{self.name}: train.videos_per_batch needs clips that know their video")
        sampler = StepBatchSampler(
            len(self.train_set), self.config.batch_size, self.config.seed, start_step * accum, self.config.steps * accum,
            rank=self.rank, world_size=self.world_size, videos=videos, videos_per_batch=self.config.videos_per_batch,
        )
        return DataLoader(
            self.train_set,
            batch_sampler=sampler,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            # Its own generator: a DataLoader otherwise draws worker seeds from the global RNG,
            # which would shift the model's random stream on resume.
            generator=torch.Generator().manual_seed(self.config.seed + start_step),
        )

    # -- steps -------------------------------------------------------------------------------
    def validate(self) -> float | None:
        """Mean loss over the first `val_batches` validation batches, with fixed randomness.

        Every rank computes it on the same batches (the single-process value): validation is a
        small fraction of the work, and FSDP needs every rank in every forward anyway.
        """
        if self.val_set is None or len(self.val_set) == 0:
            return None
        loader = DataLoader(self.val_set, batch_size=self.config.batch_size, shuffle=False)
        self.model.eval()
        total, count = torch.zeros((), device=self.device), 0
        # Masking in the losses is random: fix it so that val losses are comparable across steps,
        # without disturbing the training RNG stream (resume must replay it exactly).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(self.config.seed)
            for i, batch in enumerate(loader):
                if i >= self.config.val_batches:
                    break
                batch = to_device(batch, self.device)
                with autocast(self.device, self.precision):
                    loss, _ = self.wrapped(batch) if self.fsdp else self.loss_fn(self.model, batch)
                total += loss.float()
                count += 1
        self.model.train()
        return (total / max(count, 1)).item()

    def fit(self) -> TrainResult:
        config = self.config
        torch.manual_seed(distributed.rank_seed(config.seed, self.rank))
        resumed_from = self.restore_if_possible()
        self.model.train()
        progress = Progress(self.name, config.steps, self.step) if self.is_main else None
        sums: dict[str, torch.Tensor] = {}
        first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        interval_start, interval_steps = time.perf_counter(), 0
        batches = iter(self.build_loader(self.step))
        try:
            with StopRequested(escalate=self.world_size == 1) as stop:
                while self.step < config.steps:
                    metrics = self.train_step(batches)
                    self.step += 1
                    interval_steps += 1
                    finite = torch.isfinite(metrics["loss"])
                    first_bad_step = torch.where((first_bad_step < 0) & ~finite, self.step, first_bad_step)
                    for key, value in metrics.items():
                        sums[key] = sums.get(key, 0) + value.detach().float()
                    # A signal may reach the ranks at different steps: they stop at the same one.
                    stopping = distributed.agree_to_stop(stop.requested) if self.world_size > 1 else stop.requested

                    boundary = self.step % config.log_every == 0 or self.step == config.steps or stopping
                    if not boundary:
                        continue
                    if self.world_size > 1:
                        # Every rank stops on a bad step of any rank, and logs the global-batch means.
                        first_bad_step = distributed.first_bad_step(first_bad_step)
                        sums = distributed.mean_over_ranks(sums)
                    bad = int(first_bad_step)  # the one sync per log interval
                    if bad >= 0:
                        raise TinyWorldsError(
                            f"{self.name}: loss became non-finite at step {bad} (lr too high?); "
                            f"stopped, last good checkpoint kept in {self.state_dir}"
                        )
                    elapsed = time.perf_counter() - interval_start
                    row = {}
                    for key, total in sums.items():
                        mean = (total / interval_steps).flatten().tolist()
                        # Vector metrics (e.g. the usage of each latent action) become key_0, key_1, ...
                        row.update({key: mean[0]} if len(mean) == 1 else {f"{key}_{i}": v for i, v in enumerate(mean)})
                    row["lr"] = self.scheduler.get_last_lr()[0]
                    row["steps_per_s"] = interval_steps / elapsed
                    if self.tokens_per_item:
                        row["tokens_per_s"] = row["steps_per_s"] * config.batch_size * config.grad_accum * self.tokens_per_item
                    if self.step % config.val_every == 0 or self.step == config.steps:
                        val_loss = self.validate()
                        if val_loss is not None:
                            row["val_loss"] = val_loss
                        if self.on_validate is not None:
                            self.model.eval()
                            with torch.no_grad(), distributed.gathered(self.wrapped if self.fsdp else None):
                                self.on_validate(self.model, self.step)
                            self.model.train()
                    row["step"] = self.step
                    self.history.append(row)
                    if self.is_main:
                        self.log({k: v for k, v in row.items() if k != "step"}, self.step)
                        progress.update(self.step, f"loss {row['loss']:.4f}  {row['steps_per_s']:.2f} it/s")
                    sums, interval_start, interval_steps = {}, time.perf_counter(), 0

                    if self.step % config.checkpoint_every == 0 or self.step == config.steps or stopping:
                        self.save_state()
                    if stopping and self.step < config.steps:
                        raise KeyboardInterrupt
        finally:
            if progress is not None:
                progress.close()
        final = {k: v for k, v in self.history[-1].items() if k != "step"} if self.history else {}
        return TrainResult(self.trained_model(), self.step, self.history, final, resumed_from)

    def trained_model(self) -> torch.nn.Module:
        """The trained model as a plain module: under FSDP gathered into rank 0's copy (other
        ranks get their shards, which they do not use)."""
        if not self.fsdp:
            return self.model
        model_state, _ = distributed.full_state(self.model)
        if not self.is_main:
            return self.model
        self.plain_model.load_state_dict(model_state)
        return self.plain_model.to(self.device)

    def train_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One optimizer step over `grad_accum` micro-batches; returns detached metric tensors."""
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        accum = self.config.grad_accum
        for micro in range(accum):
            batch = to_device(next(batches), self.device)
            # Gradients are averaged over ranks once per step, after the last micro-batch.
            with distributed.gradient_sync(self.wrapped, enabled=micro == accum - 1):
                with autocast(self.device, self.precision):
                    loss, metrics = self.forward(batch)
                (loss / accum).backward()
            for key, value in {"loss": loss, **metrics}.items():
                totals[key] = totals.get(key, 0) + value.detach().float() / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor replicated on every rank
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        totals["grad_norm"] = grad_norm.detach()
        return totals


def config_dict(config: Any) -> dict[str, Any]:
    return asdict(config)
