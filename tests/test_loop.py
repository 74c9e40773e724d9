"""The shared training loop, on a toy regression so each run takes well under a second."""

import json
import os
import signal

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.training.loop import StepBatchSampler, TrainConfig, Trainer


class Pairs(Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def mse(model, batch):
    noise = 0.01 * torch.randn_like(batch["y"])  # exercises the RNG state that resume restores
    loss = ((model(batch["x"]) - batch["y"] - noise) ** 2).mean()
    return loss, {"abs_err": (model(batch["x"]) - batch["y"]).abs().mean()}


def make_trainer(state_dir, loss_fn=mse, **overrides):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    config = TrainConfig(**{"steps": 40, "batch_size": 8, "lr": 0.01, "warmup_steps": 5, "log_every": 5,
                            "val_every": 10, "checkpoint_every": 10, "val_batches": 2, **overrides})
    return Trainer("toy", model, loss_fn, Pairs(), Pairs(16), config, torch.device("cpu"), state_dir, "fp-1")


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def failing_at(step, error):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += model.training  # validation batches are not steps
        if model.training and calls["n"] == step:
            error()
        return mse(model, batch)

    return loss_fn


def test_loss_falls_and_history_is_logged(tmp_path):
    logged = []
    trainer = make_trainer(tmp_path / "state", steps=200, checkpoint_every=50, val_every=50)
    trainer.log = lambda metrics, step: logged.append((step, metrics))
    result = trainer.fit()
    assert result.history[-1]["loss"] < 0.1 * result.history[0]["loss"]
    assert [s for s, _ in logged] == list(range(5, 201, 5))
    assert {"loss", "lr", "steps_per_s", "grad_norm", "abs_err"} <= set(logged[0][1])
    assert "val_loss" in logged[9][1] and "val_loss" not in logged[0][1]
    lrs = [m["lr"] for _, m in logged]
    assert max(lrs) == pytest.approx(0.01, rel=0.05) and lrs[-1] < 0.2 * max(lrs)  # warmup + cosine


def test_resume_after_a_hard_stop_matches_an_uninterrupted_run(tmp_path):
    reference = make_trainer(tmp_path / "ref").fit()

    def crash():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        make_trainer(tmp_path / "run", loss_fn=failing_at(27, crash)).fit()
    assert json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 20

    resumed = make_trainer(tmp_path / "run").fit()
    assert resumed.resumed_from == 20 and resumed.step == 40
    assert torch.equal(weights(resumed.model), weights(reference.model))
    assert [r["step"] for r in resumed.history] == [r["step"] for r in reference.history]


def test_sigterm_finishes_the_step_saves_and_stops(tmp_path):
    reference = make_trainer(tmp_path / "ref").fit()
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "run", loss_fn=failing_at(13, lambda: os.kill(os.getpid(), signal.SIGTERM))).fit()
    assert json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 13
    resumed = make_trainer(tmp_path / "run").fit()
    assert resumed.resumed_from == 13
    assert torch.allclose(weights(resumed.model), weights(reference.model), atol=1e-6)


def test_state_from_another_config_is_not_resumed(tmp_path):
    make_trainer(tmp_path / "state", steps=20).fit()
    trainer = make_trainer(tmp_path / "state", steps=20)
    trainer.state_fingerprint = "fp-2"
    assert trainer.fit().resumed_from == 0


def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    def nan_from_step_23(model, batch, calls={"n": 0}):
        calls["n"] += model.training
        loss, metrics = mse(model, batch)
        return (loss * float("nan") if calls["n"] >= 23 else loss), metrics

    with pytest.raises(TinyWorldsError, match="non-finite at step 23"):
        make_trainer(tmp_path / "state", loss_fn=nan_from_step_23).fit()
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["step"] == 20


def test_batches_depend_only_on_seed_and_step():
    full = list(StepBatchSampler(100, 4, seed=1, start=0, stop=10))
    tail = list(StepBatchSampler(100, 4, seed=1, start=6, stop=10))
    other = list(StepBatchSampler(100, 4, seed=2, start=0, stop=10))
    assert full[6:] == tail and full != other


def test_batches_of_one_video_draw_each_video_by_its_share_of_clips():
    videos = [0] * 60 + [1] * 30 + [2] * 10  # items of three videos, 6 : 3 : 1
    batches = list(StepBatchSampler(100, 8, seed=1, start=0, stop=3000, videos=videos, videos_per_batch=1))
    per_batch = [{videos[i] for i in batch} for batch in batches]
    assert all(len(batch) == 8 for batch in batches) and all(len(one) == 1 for one in per_batch)
    shares = np.bincount([next(iter(one)) for one in per_batch], minlength=3) / len(batches)
    np.testing.assert_allclose(shares, [0.6, 0.3, 0.1], atol=0.03)
    # within a video every item is drawn, and the batches still depend only on (seed, step)
    assert set(i for batch in batches for i in batch) == set(range(100))
    tail = list(StepBatchSampler(100, 8, seed=1, start=2990, stop=3000, videos=videos, videos_per_batch=1))
    assert batches[2990:] == tail


def test_batches_of_two_videos_split_the_batch_between_two_distinct_videos():
    videos = [0] * 40 + [1] * 40 + [2] * 20
    batches = list(StepBatchSampler(100, 9, seed=2, start=0, stop=500, videos=videos, videos_per_batch=2))
    for batch in batches:
        counts = sorted(np.bincount([videos[i] for i in batch], minlength=3))
        assert counts == [0, 4, 5]
    # asked for more videos than there are: every batch holds all of them
    three = list(StepBatchSampler(100, 9, seed=2, start=0, stop=20, videos=videos, videos_per_batch=5))
    assert all(sorted(np.bincount([videos[i] for i in batch], minlength=3)) == [3, 3, 3] for batch in three)


def test_batches_of_videos_split_over_processes_as_one_batch():
    videos = [0] * 50 + [1] * 50
    single = list(StepBatchSampler(100, 8, seed=3, start=0, stop=6, videos=videos, videos_per_batch=1))
    shards = [list(StepBatchSampler(100, 8, seed=3, start=0, stop=6, rank=r, world_size=2, videos=videos,
                                    videos_per_batch=1)) for r in range(2)]
    assert [a + b for a, b in zip(*shards)] == single


class TwoVideoPairs(Pairs):
    """Pairs whose first half comes from video 0 and second half from video 1."""

    item_videos = np.repeat([0, 1], 32)

    def __getitem__(self, i):
        return {**super().__getitem__(i), "video": torch.tensor(self.item_videos[i])}


def test_trainer_feeds_one_video_a_batch_when_asked(tmp_path):
    seen = []

    def recording(model, batch):
        if model.training:
            seen.append(set(batch["video"].tolist()))
        return mse(model, batch)

    trainer = make_trainer(tmp_path / "state", loss_fn=recording, videos_per_batch=1)
    trainer.train_set = TwoVideoPairs()
    trainer.fit()
    assert len(seen) == 40 and all(len(videos) == 1 for videos in seen)
    assert {v for videos in seen for v in videos} == {0, 1}


def test_batches_of_videos_need_clips_that_know_their_video(tmp_path):
    with pytest.raises(TinyWorldsError, match="toy: train.videos_per_batch needs clips that know their video"):
        make_trainer(tmp_path / "state", videos_per_batch=2).fit()
    with pytest.raises(TinyWorldsError, match="3 video ids for 100 items"):
        StepBatchSampler(100, 8, seed=0, start=0, stop=1, videos=[0, 1, 2], videos_per_batch=1)


@pytest.mark.parametrize("bad", [{"steps": 0}, {"lr": -1.0}, {"warmup_steps": 40}, {"val_every": 7}, {"checkpoint_every": 12},
                                 {"videos_per_batch": 0}, {"videos_per_batch": 17},
                                 {"videos_per_batch": True}])
def test_bad_train_config_names_the_field(bad):
    with pytest.raises(TinyWorldsError, match=f"train.{next(iter(bad))}"):
        TrainConfig(**{"steps": 40, "warmup_steps": 0, "log_every": 5, **bad})
