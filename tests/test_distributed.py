"""Multi-process training on the CPU (gloo, 2 processes): the same run as one process.

The Trainer tests spawn two ranks with torch.multiprocessing (a file rendezvous, no ports)
on a toy model with blocks in a ModuleList, so FSDP has units to shard; all their runs share
two spawns (module fixture `runs`), since starting ranks costs seconds. The slow tests run a
real pipeline script with train.nproc=2 through the torchrun launcher.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml
import zarr
from torch import nn

from tests.test_loop import Pairs
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.training import distributed
from tinyworlds.training.loop import StepBatchSampler, TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]


class Toy(nn.Module):
    """Input layer, two blocks in a ModuleList (FSDP units), output layer."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 1)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(2)])

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)

    def loss(self, batch):  # a method other than forward, as the tinyworlds models have
        error = self(batch["x"]) - batch["y"]
        return (error**2).mean(), {"abs_err": error.abs().mean()}


def toy_loss(model, batch):
    return model.loss(batch)


CONFIG = {"steps": 12, "batch_size": 8, "lr": 0.01, "warmup_steps": 2, "log_every": 2, "val_every": 4,
          "checkpoint_every": 4, "val_batches": 2}


def make_trainer(state_dir, loss_fn=toy_loss, log=None, on_validate=None, **overrides):
    torch.manual_seed(0)
    config = TrainConfig(**{**CONFIG, **overrides})
    return Trainer("toy", Toy(), loss_fn, Pairs(), Pairs(16), config, torch.device("cpu"), state_dir, "fp-1",
                   log=log, on_validate=on_validate)


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.state_dict().values()])


# -- what each rank runs ----------------------------------------------------------------------


def misbehaving(kind: str, at_step: int, on_rank: int):
    """The toy loss, with a NaN (from) or a SIGTERM (at) the `at_step`-th training step of rank `on_rank`."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += model.training  # validation batches are not steps
        loss, metrics = toy_loss(model, batch)
        if model.training and distributed.rank() == on_rank and calls["n"] >= at_step:
            if kind == "nan":
                loss = loss * float("nan")
            elif kind == "sigterm" and calls["n"] == at_step:
                os.kill(os.getpid(), signal.SIGTERM)
        return loss, metrics

    return loss_fn


def run_job(rank: int, job: dict) -> dict:
    """Train the toy model as `job` says; what happened on this rank."""
    import tinyworlds.training.loop as loop

    writes, logged, previews = [], [], []
    real_atomic_output = loop.atomic_output

    def counting_atomic_output(target):
        writes.append(str(target))
        return real_atomic_output(target)

    loop.atomic_output = counting_atomic_output
    outcome: dict = {"writes": writes, "logged": logged, "previews": previews}
    try:
        loss_fn = misbehaving(*job["misbehave"]) if job.get("misbehave") else toy_loss
        trainer = make_trainer(
            Path(job["state_dir"]), loss_fn=loss_fn, log=lambda metrics, step: logged.append(step),
            # A preview calls the model outside forward, as the stages' previews do.
            on_validate=lambda model, step: previews.append(model.out(model.blocks[0](model.inp(torch.ones(1, 8)))).item()),
            **job.get("config", {}),
        )
        result = trainer.fit()
        # Under FSDP only rank 0 gets the whole trained model back; the others keep their shards.
        whole = rank == 0 or not trainer.fsdp
        outcome.update(history=result.history, weights=weights(result.model) if whole else None,
                       resumed_from=result.resumed_from)
    except (Exception, KeyboardInterrupt) as err:
        outcome["error"] = f"{type(err).__name__}: {err}"
    finally:
        loop.atomic_output = real_atomic_output
    return outcome


def rank_main(rank: int, world: int, rendezvous: str, out: str, jobs: dict[str, dict]) -> None:
    """One rank of a gloo group: run `jobs` in turn, save their outcomes to out/rank{r}.pt."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        outcomes = {name: run_job(rank, job) for name, job in jobs.items()}
    finally:
        dist.destroy_process_group()
    torch.save(outcomes, Path(out) / f"rank{rank}.pt")


def run_ranks(out: Path, jobs: dict[str, dict], world: int = 2) -> dict[str, list[dict]]:
    """Run `jobs` on `world` spawned CPU ranks; job name -> the outcome of each rank, in rank order."""
    out.mkdir()
    torch.multiprocessing.spawn(rank_main, args=(world, str(out / "rendezvous"), str(out), jobs), nprocs=world, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return {name: [outcomes[name] for outcomes in ranks] for name in jobs}


SETUPS = {"ddp": {}, "ddp-grad-accum": {"grad_accum": 2}, "fsdp": {"fsdp": True}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every two-rank run of this module: the first batch, then resumes of its states."""
    root = tmp_path_factory.mktemp("ranks")
    jobs = {name: {"state_dir": str(root / name), "config": setup} for name, setup in SETUPS.items()}
    jobs["sigterm"] = {"state_dir": str(root / "sigterm"), "misbehave": ("sigterm", 7, 1)}
    jobs["fsdp-sigterm"] = {"state_dir": str(root / "fsdp-sigterm"), "misbehave": ("sigterm", 7, 1), "config": {"fsdp": True}}
    jobs["nan"] = {"state_dir": str(root / "nan"), "misbehave": ("nan", 5, 1)}
    first = run_ranks(root / "first", jobs)
    shutil.copytree(root / "sigterm", root / "sigterm-copy")
    states = {name: json.loads((root / name / "state.json").read_text()) for name in ("sigterm", "fsdp-sigterm", "nan")}
    then = run_ranks(root / "then", {"resume": {"state_dir": str(root / "sigterm")},
                                     "fsdp-resume": {"state_dir": str(root / "fsdp-sigterm"), "config": {"fsdp": True}}})
    return {"root": root, **first, **then, "states": states}


def losses(history):
    return [row["loss"] for row in history]


# -- the sampler ------------------------------------------------------------------------------


def test_ranks_split_the_global_batch_of_each_step():
    single = list(StepBatchSampler(100, 8, seed=3, start=5, stop=9))
    shards = [list(StepBatchSampler(100, 8, seed=3, start=5, stop=9, rank=r, world_size=4)) for r in range(4)]
    for step, batch in enumerate(single):
        assert sum((shard[step] for shard in shards), []) == batch  # rank r holds batch[2r : 2r + 2]


def test_a_batch_that_does_not_divide_by_the_processes_is_refused():
    with pytest.raises(TinyWorldsError, match=r"train.batch_size=10: must divide by the number of processes \(4\)"):
        StepBatchSampler(100, 10, seed=0, start=0, stop=1, rank=0, world_size=4)


def test_one_process_is_plain():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    assert distributed.nproc_setting({}) == 1 and distributed.nproc_setting({"train": {"nproc": 2}}) == 2
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(TinyWorldsError, match="train.nproc"):
            distributed.nproc_setting({"train": {"nproc": bad}})


# -- two ranks against one process -------------------------------------------------------------


@pytest.mark.parametrize("name", list(SETUPS))
def test_two_processes_train_as_one_on_the_same_global_batch(runs, tmp_path, name):
    reference = make_trainer(tmp_path / "single", **SETUPS[name]).fit()
    ranks = runs[name]
    assert not any("error" in r for r in ranks), [r.get("error") for r in ranks]
    for outcome in ranks:  # every rank ends with the single-process loss curve and weights
        assert [row["step"] for row in outcome["history"]] == [row["step"] for row in reference.history]
        np.testing.assert_allclose(losses(outcome["history"]), losses(reference.history), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose([r.get("val_loss", 0) for r in outcome["history"]],
                                   [r.get("val_loss", 0) for r in reference.history], rtol=1e-5, atol=1e-7)
        if outcome["weights"] is not None:
            assert (outcome["weights"] - weights(reference.model)).abs().max() < 1e-5
    # Rank 0 alone logs and writes the state (at 4, 8, 12); rank 1 writes nothing.
    state_dir = runs["root"] / name
    assert ranks[0]["logged"] == list(range(2, 13, 2)) and ranks[1]["logged"] == []
    assert ranks[0]["writes"] == [str(state_dir)] * 3 and ranks[1]["writes"] == []
    assert len(ranks[0]["previews"]) == len(ranks[1]["previews"]) == 3  # previews run on every rank
    assert json.loads((state_dir / "state.json").read_text())["step"] == 12


def test_sigterm_to_one_rank_stops_all_at_the_same_step_and_the_run_resumes(runs, tmp_path):
    assert [r.get("error") for r in runs["sigterm"]] == ["KeyboardInterrupt: "] * 2
    assert runs["states"]["sigterm"]["step"] == 7  # rank 1 got the signal in step 7; both saved there
    reference = make_trainer(tmp_path / "single").fit()
    for outcome in runs["resume"]:
        assert outcome["resumed_from"] == 7
        assert (outcome["weights"] - weights(reference.model)).abs().max() < 1e-5
    # The state has one format for any number of processes: one process resumes it too.
    single = make_trainer(runs["root"] / "sigterm-copy").fit()
    assert single.resumed_from == 7 and (weights(single.model) - weights(reference.model)).abs().max() < 1e-5


def test_an_fsdp_run_stops_and_resumes_too(runs, tmp_path):
    assert [r.get("error") for r in runs["fsdp-sigterm"]] == ["KeyboardInterrupt: "] * 2
    assert runs["states"]["fsdp-sigterm"]["step"] == 7
    reference = make_trainer(tmp_path / "single", fsdp=True).fit()
    assert [r["resumed_from"] for r in runs["fsdp-resume"]] == [7, 7]
    assert (runs["fsdp-resume"][0]["weights"] - weights(reference.model)).abs().max() < 1e-5  # rank 0: whole model


def test_a_non_finite_loss_on_one_rank_stops_every_rank(runs):
    for outcome in runs["nan"]:
        assert "loss became non-finite at step 5" in outcome["error"]
    assert runs["states"]["nan"]["step"] == 4  # the last good checkpoint


# -- a real stage through the torchrun launcher ------------------------------------------------


def tiny_project(root: Path, **train) -> Path:
    """A project with one 120-frame store (a square moving over noise) and a tokenizer of a few steps."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(size=16, train_on=["pong"], split={"val_fraction": 0.2, "block_frames": 40, "gap_frames": 4})
    params["train"].update(device="cpu", **train)
    params["tokenizer"]["model"].update(patch_size=4, embed_dim=32, num_heads=2, encoder_blocks=1, decoder_blocks=1,
                                        levels=[4, 4])
    params["tokenizer"]["train"].update(clip_len=3, steps=6, batch_size=4, lr=0.003, warmup_steps=2, log_every=2,
                                        val_every=6, checkpoint_every=2)
    params["tracking"]["uri"] = None
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 60, (120, 16, 16, 3), dtype=np.uint8)
    for t in range(120):
        frames[t, 4:8, t % 12 : t % 12 + 4] = 255
    zarr.open_group(str(root / "data" / "frames" / "pong.zarr"), mode="w").create_array("frames", data=frames, chunks=(32, 16, 16, 3))
    return root


def run_stage_script(root: Path, script: str = "train_tokenizer.py", **popen) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "TINYWORLDS_"))}
    return subprocess.Popen([sys.executable, str(REPO / "pipeline" / script)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.mark.slow
def test_a_stage_with_nproc_2_runs_under_torchrun_and_writes_once(tmp_path):
    import mlflow
    from safetensors.torch import load_file

    single = tiny_project(tmp_path / "single")
    double = tiny_project(tmp_path / "double", nproc=2)
    outputs = {}
    for name, root in (("single", single), ("double", double)):
        process = run_stage_script(root)
        outputs[name] = process.communicate(timeout=120)[0]
        assert process.returncode == 0, outputs[name][-3000:]
    assert "Setting OMP_NUM_THREADS" in outputs["double"]  # torchrun's own notice: it did launch

    one, two = (load_file(root / "data" / "models" / "tokenizer" / "model.safetensors") for root in (single, double))
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4
    history = [json.loads((root / "data" / "metrics" / "train_tokenizer.json").read_text()) for root in (single, double)]
    assert history[1]["steps"] == 6 and history[1]["loss"] == pytest.approx(history[0]["loss"], rel=1e-4)

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{double / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tinyworlds").experiment_id],
                              "tags.`tinyworlds.stage` = 'train_tokenizer'")
    assert len(runs) == 1 and runs[0].data.tags["tinyworlds.processes"] == "2"  # rank 0 alone logged
    assert {m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")} == {2, 4, 6}


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_rank_cleanly(tmp_path):
    import mlflow

    root = tiny_project(tmp_path / "project", nproc=2)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tokenizer"]["train"].update(steps=5000, val_every=5000)  # far more than it gets to run
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    state = root / "data" / "train_state" / "train_tokenizer" / "state.json"
    process = run_stage_script(root)
    deadline = time.time() + 90
    while time.time() < deadline and not state.exists():
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # as DVC, a scheduler or `kill` would
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 130, output[-3000:]
    assert output.rstrip().splitlines()[-1] == "error: interrupted"
    assert output.count("SIGTERM: stopping after this step") == 2  # torchrun passed it to both ranks
    saved = json.loads(state.read_text())
    assert 2 <= saved["step"] < 5000 and saved["history"][-1]["step"] == saved["step"]  # saved where they stopped

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tinyworlds").experiment_id],
                                "tags.`tinyworlds.stage` = 'train_tokenizer'")
    assert run.info.status == "KILLED"
