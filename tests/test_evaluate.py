"""The evaluate stage on a tiny project built directly: random-init models, synthetic stores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import zarr
from mlflow import MlflowClient

from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.core.params import Layout
from tinyworlds.data.clips import SplitConfig
from tinyworlds.evaluation.evaluate import (
    EvaluateConfig,
    dynamics_metrics,
    evaluate,
    flatten,
    held_out_clips,
)
from tinyworlds.inference.world import GenerationSettings, WorldModel
from tinyworlds.metrics import finite_mean, psnr
from tinyworlds.models import TokenizerConfig, VideoTokenizer
from tinyworlds.models.checkpoint import save_model
from tinyworlds.models.dynamics import DynamicsConfig, DynamicsModel
from tinyworlds.models.lam import LatentActionConfig, LatentActionModel

FRAMES = 200  # 5 blocks of 40: frames 160..199 are validation, 156..159 a gap
MEANINGS = ["NOOP", "UP", "DOWN"]
PERMUTATION = np.array([2, 0, 3])  # latent id of each true action: a perfect, relabelled LAM

PARAMS = {
    "datasets": {"pong": {"source": "x.mp4"}, "plain": {"source": "y.mp4"}},
    "data": {"size": 16, "fps": 15, "frame_skip": 1, "train_on": ["pong", "plain"],
             "split": {"val_fraction": 0.2, "block_frames": 40, "gap_frames": 4}},
    "train": {"device": "cpu"},
    "tracking": {"experiment": "tinyworlds", "uri": None},
    "evaluate": {"max_clips": 3, "horizon": 3, "delta_psnr_horizon": 2, "steps": 2, "throughput_reps": 1,
                 "video_clips": 2, "video_scale": 2, "video_fps": 5},
}


def square_video(actions: np.ndarray) -> np.ndarray:
    """A bright square on a dark field, moved up/down by the actions: [N, 16, 16, 3] uint8."""
    frames = np.full((len(actions), 16, 16, 3), 20, dtype=np.uint8)
    y = 6
    for t, action in enumerate(actions):
        frames[t, y : y + 4, 6:10] = 230
        y = int(np.clip(y + {0: 0, 1: -1, 2: 1}[int(action)], 0, 12))
    return frames


def write_store(root: Path, name: str, actions: np.ndarray | None) -> None:
    group = zarr.open_group(str(Layout(root).frames(name)), mode="w")
    frames = square_video(actions if actions is not None else np.zeros(FRAMES, dtype=np.int64))
    group.create_array("frames", data=frames, chunks=(64, 16, 16, 3))
    if actions is not None:
        group.create_array("true_actions", data=actions.astype(np.int16))
        group.attrs["action_meanings"] = MEANINGS
    latent = PERMUTATION[actions] if actions is not None else np.arange(FRAMES) % 4
    latent = np.append(latent[:-1], -1).astype(np.int16)  # the last frame has no transition
    zarr.open_group(str(Layout(root).latent_actions(name)), mode="w").create_array("latent_actions", data=latent)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    torch.manual_seed(0)
    tiny = dict(frame_size=16, patch_size=4, embed_dim=32, num_heads=2, encoder_blocks=1, decoder_blocks=1, max_frames=4)
    layout = Layout(root)
    save_model(VideoTokenizer(TokenizerConfig(**tiny, levels=(4, 4))), layout.model("tokenizer"))
    save_model(LatentActionModel(LatentActionConfig(**tiny, levels=(2, 2))), layout.model("lam"))
    save_model(DynamicsModel(DynamicsConfig(vocab_size=16, num_patches=16, num_actions=4, embed_dim=32, num_heads=2,
                                            num_blocks=1, max_frames=4)), layout.model("dynamics"))
    actions = np.random.default_rng(0).choice(3, size=FRAMES, p=[0.5, 0.3, 0.2])
    write_store(root, "pong", actions)
    write_store(root, "plain", None)
    return root


@pytest.fixture(scope="module")
def evaluated(project, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        for name in ("MLFLOW_TRACKING_URI", "TINYWORLDS_PIPELINE_RUN", "DVC_ROOT", "DVC_EXP_NAME", "DVC_STAGE"):
            patch.delenv(name, raising=False)
        patch.chdir(project)  # no .dvc/: the MLflow store is ./mlflow.db
        results = evaluate(PARAMS, root=project)
    return results


def test_writes_every_metric_finite_to_the_json(project, evaluated):
    written = json.loads(Layout(project).metrics("evaluate").read_text())
    assert written == json.loads(json.dumps(evaluated))
    for name in ("pong", "plain", "mean"):
        flat = flatten(written[name])
        for key in ("tokenizer.psnr", "tokenizer.ssim", "tokenizer.codebook_used", "tokenizer.codebook_perplexity",
                    "lam.entropy_nats", "lam.perplexity", "lam.usage.0", "lam.usage.3",
                    "dynamics.next_frame_psnr", "dynamics.next_frame_ssim", "dynamics.reconstruction_ceiling_psnr",
                    "dynamics.rollout_psnr.h1", "dynamics.rollout_psnr.h3", "dynamics.copy_last_psnr.h3",
                    "dynamics.random_actions_psnr.h3", "dynamics.copy_last_tokens_psnr.h3", "dynamics.delta_psnr",
                    "dynamics.delta_psnr_usage"):
            assert math.isfinite(flat[key]), f"{name}.{key} = {flat[key]}"
        assert 0 < flat["tokenizer.codebook_used"] <= 1 and -1 <= flat["tokenizer.ssim"] <= 1
    assert written["pong"]["clips"] == 3
    throughput = written["throughput"]
    assert throughput["batch_1_frames_per_s"] > 0 and throughput["batch_8_frames_per_s"] > 0
    assert throughput["device"].startswith("cpu")


def test_action_metrics_against_ground_truth(evaluated):
    pong = evaluated["pong"]["lam"]
    # The synthetic LAM is a relabelling of the true actions: perfect NMI and mapping.
    assert pong["nmi"] == pytest.approx(1.0) and pong["mapping_accuracy"] == 1.0
    assert pong["usage"]["1"] == 0.0 and sum(pong["usage"].values()) == pytest.approx(1.0)
    true_val = np.random.default_rng(0).choice(3, size=FRAMES, p=[0.5, 0.3, 0.2])[160:199]  # transitions 160..198
    assert pong["chance_accuracy"] == pytest.approx(np.bincount(true_val).max() / len(true_val))
    assert "nmi" not in evaluated["plain"]["lam"]  # no ground truth there
    assert "nmi" not in evaluated["mean"]["lam"]
    assert evaluated["plain"]["lam"]["entropy_nats"] == pytest.approx(math.log(4), abs=0.01)


def pong_clips(project: Path) -> torch.Tensor:
    split = SplitConfig(**PARAMS["data"]["split"])
    return held_out_clips(Layout(project).frames("pong"), split, clip_len=6, frame_skip=1, max_clips=3).frames


def test_copy_last_baseline_is_exact_on_the_clips(project, evaluated):
    clips = pong_clips(project)  # [3, 6, C, H, W]: context 0..2, future 3..5
    expected = finite_mean(psnr(clips[:, 2], clips[:, 5], dims=(1, 2, 3)))
    assert evaluated["pong"]["dynamics"]["copy_last_psnr"]["h3"] == pytest.approx(expected)


def test_teacher_forced_first_frame_is_the_rollouts_first_frame(project):
    world = WorldModel.load(Layout(project).model("tokenizer").parent, device="cpu")
    clips = pong_clips(project)
    tokens = world.encode(clips)
    recon = world.decode(tokens)
    config = EvaluateConfig(**{**PARAMS["evaluate"], "batch_size": 2})  # several batches
    only_action_1 = torch.tensor([0.0, 1.0, 0.0, 0.0])
    scores, out = dynamics_metrics(world, clips, tokens, recon, only_action_1, config, 3,
                                   GenerationSettings(steps=2, temperature=0.0))
    assert torch.equal(out["teacher_forced"][:, 0], out["predicted"][:, 0])
    assert (out["usage_actions"] == 1).all()  # drawn only from the actions the LAM uses
    copied = world.decode(torch.cat([tokens[:, :3], tokens[:, 2:3].expand(-1, 3, -1)], dim=1))[:, 3:]
    assert scores["copy_last_tokens_psnr"]["h2"] == pytest.approx(finite_mean(psnr(copied[:, 1], clips[:, 4], dims=(1, 2, 3))))
    assert scores["rollout_psnr"]["h1"] == pytest.approx(finite_mean(psnr(out["predicted"][:, 0], clips[:, 3], dims=(1, 2, 3))))
    assert scores["reconstruction_ceiling_psnr"] == pytest.approx(finite_mean(psnr(recon[:, 3:], clips[:, 3:], dims=(2, 3, 4))))


def test_mlflow_run_has_metrics_grid_and_videos_that_decode(project, evaluated):
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tinyworlds")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`tinyworlds.stage` = 'evaluate'")
    assert run.data.metrics["pong.dynamics.rollout_psnr.h1"] == pytest.approx(evaluated["pong"]["dynamics"]["rollout_psnr"]["h1"])
    assert run.data.tags["tinyworlds.device"].startswith("cpu")
    history = client.get_metric_history(run.info.run_id, "pong.rollout_psnr_by_horizon")
    assert [m.step for m in history] == [1, 2, 3]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"pong_real_reconstruction_prediction.png", "evaluate.json", "rollouts"} <= names
    videos = {a.path for a in client.list_artifacts(run.info.run_id, "rollouts")}
    assert videos == {f"rollouts/{n}_rollout.{ext}" for n in ("pong", "plain") for ext in ("mp4", "gif")}
    local = client.download_artifacts(run.info.run_id, "rollouts/pong_rollout.mp4", str(project))
    with av.open(local) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 6  # context 3 + horizon 3
    assert frames[0].shape[0] == 2 * (32 + 15) + 2  # two clips, each 2x upscaled over a label strip
    assert frames[0].shape[1] == 3 * 32 + 2 * 2  # real | LAM actions | random actions, 2x upscaled


def test_bad_settings_are_one_line_errors(project):
    with pytest.raises(TinyWorldsError, match="unknown evaluate setting"):
        EvaluateConfig.from_params({"evaluate": {"horizons": 4}})
    with pytest.raises(TinyWorldsError, match="past horizon"):
        EvaluateConfig(horizon=2, delta_psnr_horizon=4)
    with pytest.raises(TinyWorldsError, match="no validation clip of 60 frames"):
        held_out_clips(Layout(project).frames("pong"), SplitConfig(**PARAMS["data"]["split"]),
                       clip_len=60, frame_skip=1, max_clips=3)
