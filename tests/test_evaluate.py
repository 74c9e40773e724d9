"""The evaluate stage on a tiny project built directly: random-init models, synthetic stores."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from mlflow import MlflowClient

from tests.conftest import decode_mp4
from tinyworlds import metrics as M
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.core.params import Layout
from tinyworlds.data.clips import SplitConfig
from tinyworlds.evaluation.evaluate import (
    CONDITIONS,
    PSNR_CAP,
    EvaluateConfig,
    dynamics_metrics,
    evaluate,
    flatten,
    held_out_clips,
)
from tinyworlds.inference.world import GenerationSettings, WorldModel, carry_unchanged_patches
from tinyworlds.metrics import objects as O
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
                 "bootstrap_resamples": 200, "video_clips": 2, "video_frames": 3, "video_scale": 2, "video_fps": 5},
}


def square_video(actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A bright square on a dark field, moved up/down by the actions: frames [N, 16, 16, 3]
    uint8 and the square's row [N] (the player's position)."""
    frames = np.full((len(actions), 16, 16, 3), 20, dtype=np.uint8)
    rows = np.zeros(len(actions), dtype=np.float32)
    y = 6
    for t, action in enumerate(actions):
        frames[t, y : y + 4, 6:10] = 230
        rows[t] = y
        y = int(np.clip(y + {0: 0, 1: -1, 2: 1}[int(action)], 0, 12))
    return frames, rows


def write_store(root: Path, name: str, actions: np.ndarray | None) -> None:
    group = zarr.open_group(str(Layout(root).frames(name)), mode="w")
    frames, rows = square_video(actions if actions is not None else np.zeros(FRAMES, dtype=np.int64))
    group.create_array("frames", data=frames, chunks=(64, 16, 16, 3))
    if actions is not None:
        group.create_array("true_actions", data=actions.astype(np.int16))
        group.create_array("player_position", data=rows)
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


def test_the_floor_margins_carry_paired_intervals_around_the_scores(evaluated):
    dynamics, headline = evaluated["pong"]["dynamics"], evaluated["pong"]["headline"]
    margins = {h: dynamics["rollout"]["fg_psnr"][h] - dynamics["copy_last_frame"]["fg_psnr"][h]
               for h in dynamics["rollout"]["fg_psnr"]}
    assert set(dynamics["rollout_minus_copy_fg_psnr_ci"]) == set(margins)
    for h, (low, high) in dynamics["rollout_minus_copy_fg_psnr_ci"].items():
        assert low <= margins[h] + 1e-9 and margins[h] <= high + 1e-9, h
    worst = min(margins.values())
    assert headline["rollout_minus_copy_fg_psnr_min"] == pytest.approx(worst)
    low, high = headline["rollout_minus_copy_fg_psnr_min_low"], headline["rollout_minus_copy_fg_psnr_min_high"]
    assert low <= worst + 1e-9 and worst <= high + 1e-9


def test_writes_every_metric_finite_to_the_json(project, evaluated):
    written = json.loads(Layout(project).metrics("evaluate").read_text())
    assert written == json.loads(json.dumps(evaluated))
    objects = ("tokenizer.fg_psnr", "tokenizer.fg_recall", "tokenizer.fg_recall_low", "tokenizer.fg_recall_high",
               "dynamics.next_frame.fg_psnr", "dynamics.delta_fg_psnr", "headline.tokenizer_fg_recall",
               "headline.rollout_minus_copy_fg_psnr_min", "headline.rollout_minus_copy_fg_psnr_min_low",
               "headline.rollout_minus_copy_fg_psnr_min_high")
    for name in ("pong", "plain", "mean"):
        flat = flatten(written[name])
        for key in ("tokenizer.psnr", "tokenizer.ssim", "tokenizer.codebook_used", "lam.entropy_nats",
                    "lam.perplexity", "lam.usage.0", "lam.usage.3", "dynamics.next_frame.psnr",
                    *(objects if name == "pong" else ())):
            assert math.isfinite(flat[key]), f"{name}.{key} = {flat[key]}"
        for condition in ("rollout", "random_ids", "copy_last_frame", "copy_tokens", "tokenizer_ceiling"):
            for horizon in ("h1", "h3"):
                assert math.isfinite(flat[f"dynamics.{condition}.psnr.{horizon}"]), (name, condition, horizon)
        assert 0 < flat["tokenizer.codebook_used"] <= 1 and -1 <= flat["tokenizer.ssim"] <= 1
        assert 0 <= flat["tokenizer.still_token_changes"] <= 1
    pong = written["pong"]["tokenizer"]
    assert pong["fg_recall_low"] <= pong["fg_recall"] <= pong["fg_recall_high"]
    # A square that never moves is background: nothing to recall, and whatever the untrained
    # tokenizer draws there is a ghost.
    plain = written["plain"]["tokenizer"]
    assert math.isnan(plain["fg_recall"]) and plain["fg_precision"] == 0.0
    assert written["pong"]["clips"] == 3
    throughput = written["throughput"]
    assert throughput["batch_1_frames_per_s"] > 0 and throughput["batch_8_frames_per_s"] > 0
    assert throughput["device"].startswith("cpu")


def test_every_held_out_clip_by_default(project):
    split = SplitConfig(**PARAMS["data"]["split"])
    every = held_out_clips(Layout(project).frames("pong"), split, clip_len=6, frame_skip=1, max_clips=None)
    assert every.frames.shape[0] == 40 // 6  # validation frames 160..199, non-overlapping clips of 6


def test_clips_with_a_cut_are_left_out_and_counted(project, tmp_path):
    split = SplitConfig(**PARAMS["data"]["split"])
    path = tmp_path / "pong.zarr"
    shutil.copytree(Layout(project).frames("pong"), path)
    every = held_out_clips(path, split, clip_len=6, frame_skip=1, max_clips=None, cut_fraction=0.5)
    assert every.frames.shape[0] == 40 // 6 and every.clips_with_cuts == 0  # a moving square is no cut
    zarr.open_group(str(path), mode="r+")["frames"][170] = 255  # a white flash in the second clip (166..171)
    held = held_out_clips(path, split, clip_len=6, frame_skip=1, max_clips=None, cut_fraction=0.5)
    assert held.clips_with_cuts == 1 and held.frames.shape[0] == 40 // 6 - 1
    assert torch.equal(held.frames, every.frames[[0, *range(2, 40 // 6)]])
    assert held.true_actions.shape[0] == held.frames.shape[0]
    kept = held_out_clips(path, split, clip_len=6, frame_skip=1, max_clips=None, cut_fraction=None)
    assert kept.frames.shape[0] == 40 // 6 and kept.clips_with_cuts == 0
    # A share so small that the moving square is a cut in every clip: nothing left to score.
    with pytest.raises(TinyWorldsError, match="every validation clip of 6 frames has a cut"):
        held_out_clips(path, split, clip_len=6, frame_skip=1, max_clips=None, cut_fraction=1e-6)
    with pytest.raises(TinyWorldsError, match="cut_fraction"):
        EvaluateConfig(cut_fraction=0)


def test_lam_metrics_against_true_actions_and_moves(evaluated):
    pong = evaluated["pong"]["lam"]
    # The synthetic LAM is a relabelling of the true actions: perfect NMI and mapping.
    assert pong["nmi"] == pytest.approx(1.0) and pong["mapping_accuracy"] == 1.0
    assert pong["usage"]["1"] == 0.0 and sum(pong["usage"].values()) == pytest.approx(1.0)
    assert pong["used_ids"] == 3
    true_val = np.random.default_rng(0).choice(3, size=FRAMES, p=[0.5, 0.3, 0.2])[160:199]  # transitions 160..198
    assert pong["chance_accuracy"] == pytest.approx(np.bincount(true_val).max() / len(true_val))
    # UP moves the square up, DOWN down: the LAM's ids for them are the two directions.
    assert pong["directions_separated"] == 1.0
    assert (pong["id_for_negative_move"], pong["id_for_positive_move"]) == (PERMUTATION[1], PERMUTATION[2])
    assert 0 < pong["nmi_ceiling"] <= 1 and pong["nmi_over_ceiling"] >= 1
    # Block-bootstrap intervals around both headline NMIs, which the headline carries too.
    for key in ("nmi_displacement", "nmi_over_ceiling"):
        assert pong[f"{key}_low"] <= pong[key] <= pong[f"{key}_high"]
        assert evaluated["pong"]["headline"][f"lam_{key}_low"] == pong[f"{key}_low"]
    assert pong["nmi_displacement_low"] < pong["nmi_displacement_high"]
    assert "nmi" not in evaluated["plain"]["lam"] and "nmi_displacement" not in evaluated["plain"]["lam"]
    assert "nmi" not in evaluated["mean"]["lam"]
    assert evaluated["plain"]["lam"]["entropy_nats"] == pytest.approx(math.log(4), abs=0.01)


def pong_clips(project: Path) -> torch.Tensor:
    split = SplitConfig(**PARAMS["data"]["split"])
    return held_out_clips(Layout(project).frames("pong"), split, clip_len=6, frame_skip=1, max_clips=3)


def capped_psnr(error: float) -> float:
    return min(10 * math.log10(255**2 / error), PSNR_CAP) if error > 0 else PSNR_CAP


def test_copy_last_frame_floor_is_scored_on_the_objects(project, evaluated):
    held = pong_clips(project)  # frames [3, 6, C, H, W]: context 0..2, future 3..5
    clips, copy = held.frames, evaluated["pong"]["dynamics"]["copy_last_frame"]
    moved = 0
    for h in (1, 2, 3):
        last, truth = clips[:, 2], clips[:, 2 + h]
        scores = O.foreground_scores(last.permute(0, 2, 3, 1).numpy(), truth.permute(0, 2, 3, 1).numpy(), held.background)
        fg_error = scores["fg_sq_error_sum"].sum() / max(scores["fg_count"].sum(), 1)
        error = float(((last.double() - truth.double()) ** 2).mean())
        assert copy["fg_psnr"][f"h{h}"] == pytest.approx(capped_psnr(fg_error))
        assert copy["psnr"][f"h{h}"] == pytest.approx(capped_psnr(error))
        if error > 0:  # the moving square costs more on the objects than over the static field
            moved += 1
            assert copy["fg_psnr"][f"h{h}"] < copy["psnr"][f"h{h}"]
    assert moved > 0


def test_rollout_and_baselines_line_up_with_the_truth(project):
    world = WorldModel.load(Layout(project).model("tokenizer").parent, device="cpu")
    held = pong_clips(project)
    tokens = world.encode(held.frames)
    recon = world.decode(tokens)
    config = EvaluateConfig(**{**PARAMS["evaluate"], "batch_size": 2})  # several batches
    only_action_1 = torch.tensor([0.0, 1.0, 0.0, 0.0])
    scores, rows, out = dynamics_metrics(world, "pong", held, tokens, recon, only_action_1, config, 3,
                                         GenerationSettings(steps=2, temperature=0.0))
    assert (out["random_ids"] == 1).all()  # drawn only from the ids the LAM uses
    assert {(r["condition"], r["horizon"]) for r in rows} == {(c, h) for c in CONDITIONS for h in (1, 2, 3)}

    def psnr_h2(frames):  # [B, 3, C, H, W] after the 3 context frames, against the real frame 4
        return 10 * math.log10(255**2 / float(((frames[:, 1].double() - held.frames[:, 4].double()) ** 2).mean()))

    # The ceiling is the true tokens drawn as the rollout is: carried from the last real frame.
    carried = carry_unchanged_patches(recon[:, 3:], tokens[:, 3:], held.frames[:, 2], tokens[:, 2],
                                      world.tokenizer.config.patch_size)
    assert not torch.equal(carried, recon[:, 3:])
    assert scores["tokenizer_ceiling"]["psnr"]["h2"] == pytest.approx(psnr_h2(carried))
    redrawn, _, _ = dynamics_metrics(world, "pong", held, tokens, recon, only_action_1, config, 3,
                                     GenerationSettings(steps=2, temperature=0.0, carry_unchanged=False))
    assert redrawn["tokenizer_ceiling"]["psnr"]["h2"] == pytest.approx(psnr_h2(recon[:, 3:]))
    copied = world.decode(torch.cat([tokens[:, :3], tokens[:, 2:3].expand(-1, 3, -1)], dim=1))[:, 3:]
    assert torch.equal(out["frames"]["copy_tokens"], copied)
    assert scores["delta_fg_psnr_low"] <= scores["delta_fg_psnr"] <= scores["delta_fg_psnr_high"]
    # Copying the last frame moves nothing: it finds none of the real moves, and makes no false one.
    real_moves = M.moved_patches(held.frames[:, 3:], held.frames[:, 2:-1], world.tokenizer.config.patch_size, 24)
    assert real_moves.any()
    for h in ("h1", "h2", "h3"):
        assert scores["copy_last_frame"]["change_recall"][h] == 0.0
        assert math.isnan(scores["copy_last_frame"]["change_precision"][h])
    rollout_moves = M.moved_patches(out["frames"]["rollout"], M.frame_steps(out["frames"]["rollout"], held.frames[:, 2]),
                                    world.tokenizer.config.patch_size, 24)
    assert scores["rollout_changes"] == M.change_agreement(rollout_moves, real_moves)


def test_horizon_curves_for_dvc_plots(project, evaluated):
    rows = list(csv.DictReader(Layout(project).metrics_table("evaluate", "horizons").open()))
    assert {(r["dataset"], r["condition"]) for r in rows} == {(d, c) for d in ("pong", "plain") for c in CONDITIONS}
    rollout_h2 = next(r for r in rows if (r["dataset"], r["condition"], r["horizon"]) == ("pong", "rollout", "2"))
    assert float(rollout_h2["fg_psnr"]) == pytest.approx(evaluated["pong"]["dynamics"]["rollout"]["fg_psnr"]["h2"])
    for column in ("change_precision", "change_recall"):
        assert float(rollout_h2[column]) == pytest.approx(evaluated["pong"]["dynamics"]["rollout"][column]["h2"],
                                                          nan_ok=True)


def test_mlflow_run_has_metrics_grid_and_videos_that_decode(project, evaluated):
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tinyworlds")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`tinyworlds.stage` = 'evaluate'")
    assert run.data.metrics["pong.headline.tokenizer_fg_recall"] == pytest.approx(
        evaluated["pong"]["headline"]["tokenizer_fg_recall"])
    assert run.data.tags["tinyworlds.device"].startswith("cpu")
    history = client.get_metric_history(run.info.run_id, "pong/rollout.fg_psnr_by_horizon")  # detail: a section
    assert [m.step for m in history] == [1, 2, 3]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"pong_real_reconstruction_prediction.png", "evaluate.json", "rollouts"} <= names
    videos = {a.path for a in client.list_artifacts(run.info.run_id, "rollouts")}
    assert videos == {f"rollouts/{n}_rollout.{ext}" for n in ("pong", "plain") for ext in ("mp4", "gif")}
    local = client.download_artifacts(run.info.run_id, "rollouts/pong_rollout.mp4", str(project))
    frames = decode_mp4(Path(local))
    assert len(frames) == 6  # context 3 + video_frames 3
    assert frames[0].shape[0] == 2 * (32 + 15) + 2  # two clips, each 2x upscaled over a label strip
    assert frames[0].shape[1] == 3 * 32 + 2 * 2  # real | LAM actions | random actions, 2x upscaled


def test_bad_settings_are_one_line_errors(project):
    with pytest.raises(TinyWorldsError, match="unknown evaluate setting"):
        EvaluateConfig.from_params({"evaluate": {"horizons": 4}})
    with pytest.raises(TinyWorldsError, match="past horizon"):
        EvaluateConfig(horizon=2, delta_psnr_horizon=4)
    with pytest.raises(TinyWorldsError, match=r"evaluate.carry_unchanged='yes' must be true or false"):
        EvaluateConfig(carry_unchanged="yes")
    with pytest.raises(TinyWorldsError, match=r"evaluate.keep_bias='high': must be auto or a number"):
        EvaluateConfig(keep_bias="high")
    with pytest.raises(TinyWorldsError, match="no validation clip of 60 frames"):
        held_out_clips(Layout(project).frames("pong"), SplitConfig(**PARAMS["data"]["split"]),
                       clip_len=60, frame_skip=1, max_clips=3)


def test_results_table_says_which_goals_each_dataset_meets(project, evaluated):
    from typer.testing import CliRunner

    from tinyworlds.apps.cli import app
    from tinyworlds.evaluation.goals import GOALS, goals_table

    table = goals_table(evaluated)
    assert table.splitlines()[0] == "| goal | plain | pong |" and len(table.splitlines()) == 2 + len(GOALS)
    assert "met: n/a" in table.splitlines()[3]  # plain has no recorded actions: its LAM goals cannot be judged
    pong = evaluated["pong"]["headline"]
    shown = f"{pong['lam_nmi_displacement']:.3f} [{pong['lam_nmi_displacement_low']:.3f}-{pong['lam_nmi_displacement_high']:.3f}]"
    assert shown in table.splitlines()[3]  # the LAM's NMI with its 95% interval
    good = {"pong": {"headline": {"tokenizer_fg_recall": 0.97, "tokenizer_fg_psnr": 26.0, "lam_nmi_displacement": 0.7,
                                  "lam_directions_separated": 1.0, "lam_nmi": 0.3, "lam_nmi_ceiling": 0.4,
                                  "lam_nmi_over_ceiling": 0.75, "rollout_minus_copy_fg_psnr_min": 0.5,
                                  "delta_fg_psnr": 1.5, "delta_fg_psnr_low": 0.4}}}
    assert all(line.endswith("; met: yes |") for line in goals_table(good).splitlines()[2:])
    assert "(moves:" not in goals_table(good)  # a headline from before 0.3.9 has no change scores
    assert "(precision" not in goals_table(good).splitlines()[2]  # nor, before 0.3.14, the tokenizer's precision
    invented = f"{pong['tokenizer_fg_recall']:.3f}, {pong['tokenizer_fg_psnr']:.1f} dB (precision {pong['tokenizer_fg_precision']:.2f})"
    assert invented in table.splitlines()[2]  # beside the goal: how much of what it draws the frame has
    assert pong["tokenizer_fg_precision"] == evaluated["pong"]["tokenizer"]["fg_precision"]
    moves = f"(moves: precision {pong['rollout_change_precision']:.2f}, recall {pong['rollout_change_recall']:.2f})"
    assert moves in table.splitlines()[5]
    worst = (f"{pong['rollout_minus_copy_fg_psnr_min']:+.2f} dB at worst [{pong['rollout_minus_copy_fg_psnr_min_low']:+.2f}"
             f" to {pong['rollout_minus_copy_fg_psnr_min_high']:+.2f}]")
    assert worst in table.splitlines()[5]  # the floor goal's worst margin with its 95% interval
    assert "at worst [" not in goals_table(good)  # nor an interval of it (0.3.10)
    result = CliRunner().invoke(app, ["results", "--metrics", str(Layout(project).metrics("evaluate"))])
    assert result.exit_code == 0 and result.output.strip() == table
    missing = CliRunner().invoke(app, ["results", "--metrics", str(project / "nope.json")])
    assert missing.exit_code == 1 and "no evaluation yet" in missing.output
