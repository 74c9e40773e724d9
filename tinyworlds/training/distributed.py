"""Training on several processes: the torchrun launch, DDP or FSDP2, and what rank 0 alone does.

`train.nproc: 1` (the default) is a plain process: torch.distributed is never initialised and
the loop runs exactly as before. With `train.nproc: N > 1`, `python pipeline/train_X.py`
re-launches itself as `python -m torch.distributed.run --standalone --nproc_per_node N
pipeline/train_X.py` (see `run_training_stage`), one process per GPU (cuda:LOCAL_RANK, nccl)
or N processes on the CPU (gloo). Then, inside `Trainer`:

- Data: the global batch of step k is the single-process batch; rank r trains on its
  contiguous slice (`StepBatchSampler`), so `batch_size` is the global batch size.
- Gradients: DDP averages them over ranks, so an update equals the single-process update on
  the same global batch (up to floating-point order). `train.fsdp: true` uses FSDP2
  (`fully_shard` on every block of a ModuleList, then on the whole model) instead: parameters,
  gradients and optimizer state are sharded, for models that do not fit one GPU.
- Agreement: the non-finite-loss check and the logged metrics are all-reduced at each log
  boundary (the loop's one sync); a stop request (SIGTERM / Ctrl-C reaching any rank) is
  agreed every step on a CPU gloo group, so all ranks stop, save and exit at the same step.
- Writing: only rank 0 logs to MLflow, writes the training state, models, metrics and caches.
  On resume rank 0 reads state.json and broadcasts it; every rank loads the weights and
  optimizer state from `state_dir` (which must be on a filesystem every node sees).
- Validation runs on every rank over the same `val_batches` batches, so each rank computes the
  single-process value with no all-reduce (FSDP needs every rank in every forward anyway).

The training state on disk has one format whatever the number of processes or FSDP, so a
run can resume with another `train.nproc`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tinyworlds.core.device import rank_device
from tinyworlds.core.errors import TinyWorldsError

_stop_group: Any = None  # a gloo group for per-step stop agreement when the main backend is nccl


# ---------------------------------------------------------------------------------------------
# who am I


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True in a plain process and on rank 0: the one process that writes outputs."""
    return rank() == 0


def rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps the single-process seed; other ranks get their own random streams."""
    return seed + 7919 * rank


# ---------------------------------------------------------------------------------------------
# launch


def nproc_setting(params: dict[str, Any]) -> int:
    """`train.nproc` from params (default 1), checked."""
    nproc = (params.get("train") or {}).get("nproc", 1)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise TinyWorldsError(f"params.yaml: train.nproc={nproc!r}: must be a whole number >= 1")
    return nproc


def under_torchrun() -> bool:
    """True in a worker started by torch.distributed.run (which sets these for every worker)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextlib.contextmanager
def process_group(device_setting: str = "auto") -> Iterator[None]:
    """Join the torchrun job this process belongs to (nccl on CUDA, gloo on CPU); a no-op otherwise."""
    global _stop_group
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield
        return
    device = rank_device(device_setting)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        # Stop requests are agreed every step; on a CPU group that costs no GPU sync.
        _stop_group = dist.new_group(backend="gloo")
    else:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        _stop_group = None
        dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> int:
    """Run `argv` (a script and its arguments) as `nproc` processes on this machine under
    torch.distributed.run; returns the exit status (130 when stopped by a signal)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(["--standalone", f"--nproc_per_node={nproc}", *argv])
    try:
        run(args)
    except ChildFailedError as err:
        failed_rank, failure = err.get_first_failure()
        # A worker killed by a signal reports -signum; report it as a shell would (128 + signum).
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        if code != 130:
            print(f"error: {argv[0]}: rank {failed_rank} of {nproc} exited with status {code} (its error is above)",
                  file=sys.stderr)
        return code
    except SignalException:
        # torchrun passed the signal on and waited for the workers to save and stop.
        return 130
    return 0


def run_training_stage(train: Callable[[dict[str, Any]], object], argv: list[str] | None = None) -> None:
    """The entry point of `pipeline/train_*.py`: `train(params)` on `train.nproc` processes.

    With nproc > 1 and not yet under torchrun, the script re-launches itself under it and
    exits with its status; each worker then joins the process group and trains. Errors are
    one line as in `run_stage`; a worker other than rank 0 prefixes its rank.
    """
    from tinyworlds.core.params import load_params
    from tinyworlds.core.stage import run_stage

    argv = list(sys.argv if argv is None else argv)

    def body() -> None:
        params = load_params()
        nproc = nproc_setting(params)
        if nproc > 1 and not under_torchrun():
            sys.exit(launch(nproc, argv))
        with process_group(str((params.get("train") or {}).get("device", "auto"))):
            try:
                train(params)
            except TinyWorldsError as err:
                if rank() > 0:
                    raise TinyWorldsError(f"rank {rank()}: {err}") from None
                raise

    run_stage(body)


# ---------------------------------------------------------------------------------------------
# the model


class LossModule(nn.Module):
    """`loss_fn(model, batch)` as one forward pass: DDP syncs gradients and FSDP gathers
    parameters around `forward`, while the stages' loss functions call other methods
    (`model.loss(frames)`)."""

    def __init__(self, model: nn.Module, loss_fn: Callable) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.loss_fn(self.model, batch)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """What FSDP gathers one at a time: every module held in a ModuleList (the transformer blocks)."""
    return [child for module in model.modules() if isinstance(module, nn.ModuleList) for child in module]


def wrap(model: nn.Module, loss_fn: Callable, device: torch.device, fsdp: bool) -> nn.Module:
    """`LossModule(model, loss_fn)` under DDP, or sharded with FSDP2 (`model` is sharded in place)."""
    wrapped = LossModule(model, loss_fn)
    if not fsdp:
        ddp = nn.parallel.DistributedDataParallel
        # Buffers are constants here (positions, FSQ levels): no need to broadcast them each step.
        # (torch 2.13 renamed the switch; older releases only know broadcast_buffers.)
        no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
        return ddp(wrapped, device_ids=[device.index] if device.type == "cuda" else None, **{no_buffer_sync: False})
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise TinyWorldsError(f"train.fsdp: needs FSDP2 (torch >= 2.6), this is torch {torch.__version__}") from None

    # fully_shard takes each rank's tensors as they are: start every rank from rank 0's weights.
    with torch.no_grad():
        for tensor in model.parameters():
            dist.broadcast(tensor.data, src=0)
    for unit in shard_units(model):
        fully_shard(unit)
    fully_shard(wrapped)
    return wrapped


def is_fsdp(wrapped: nn.Module | None) -> bool:
    """True for what `wrap` returns with FSDP (everything else it returns is DDP)."""
    return wrapped is not None and not isinstance(wrapped, nn.parallel.DistributedDataParallel)


def plain_copy(model: nn.Module) -> nn.Module | None:
    """On rank 0, a copy of `model` taken before FSDP shards it, to return the trained weights in."""
    return copy.deepcopy(model) if is_main_process() else None


@contextlib.contextmanager
def gathered(wrapped: nn.Module | None) -> Iterator[None]:
    """Unshard the top-level parameters of an FSDP model for calls other than its forward
    (previews call `model.generate`, `model.decode`, ...); blocks gather themselves in their
    forward, so every rank must make the same calls. A no-op without FSDP."""
    if not is_fsdp(wrapped):
        yield
        return
    wrapped.unshard()
    try:
        yield
    finally:
        wrapped.reshard()


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module | None, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of a step (grad_accum)."""
    if wrapped is None or enabled:
        if is_fsdp(wrapped):
            wrapped.set_requires_gradient_sync(True)
        yield
    elif is_fsdp(wrapped):
        wrapped.set_requires_gradient_sync(False)
        yield
    else:
        with wrapped.no_sync():
            yield


# ---------------------------------------------------------------------------------------------
# state: one format for every mode (a plain `state_dict()` and `optimizer.state_dict()`)


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order `optimizer.state_dict()` numbers them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict]:
    """(model state, optimizer state) of an FSDP-sharded model, whole and on the CPU of rank 0
    (empty elsewhere); collective. The optimizer state is numbered as `optimizer.state_dict()`
    numbers it, so the state on disk is the same as without FSDP."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    model_state = get_model_state_dict(model, options=_options(cpu_offload=True))
    if optimizer is None:
        return model_state, {}
    by_name = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not by_name:
        return model_state, {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in by_name["param_groups"]]
    return model_state, {"state": {index[name]: v for name, v in by_name["state"].items()}, "param_groups": groups}


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Load whole states (as `full_state` returns them) into an FSDP-sharded model; collective."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    names = _param_names(model, optimizer)
    by_name = {
        "state": {names[i]: v for i, v in optimizer_state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in optimizer_state["param_groups"]],
    }
    set_model_state_dict(model, model_state, options=_options())
    set_optimizer_state_dict(model, optimizer, by_name, options=_options())


# ---------------------------------------------------------------------------------------------
# agreement between ranks


def agree_to_stop(requested: bool) -> bool:
    """True on every rank if any rank was asked to stop (a CPU all-reduce: no GPU sync)."""
    flag = torch.tensor([int(requested)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_stop_group)
    return bool(flag.item())


def first_bad_step(step_or_minus_one: torch.Tensor) -> torch.Tensor:
    """The earliest step at which any rank saw a non-finite loss, or -1."""
    never = torch.iinfo(torch.long).max
    earliest = torch.where(step_or_minus_one < 0, never, step_or_minus_one)
    dist.all_reduce(earliest, op=dist.ReduceOp.MIN)
    return torch.where(earliest == never, -1, earliest)


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each metric averaged over ranks, all in one all-reduce (gloo has no AVG: sum, then divide)."""
    keys = sorted(values)  # the same order on every rank
    flat = torch.cat([values[k].float().flatten() for k in keys])
    dist.all_reduce(flat)
    parts = torch.split(flat / world_size(), [values[k].numel() for k in keys])
    return {k: part.reshape(values[k].shape) for k, part in zip(keys, parts)}


def all_gather(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order, on every rank."""
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj`, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()
