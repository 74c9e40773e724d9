"""End to end: `dvc repro` of the whole pipeline in a shrunk copy of this project.

The copy has the real dvc.yaml, pipeline/ and tinyworlds/ (code deps are hashed by DVC),
with params shrunk to tiny frames and a few training steps. One repro runs once per test
session; the tests then check its outputs, MLflow runs, and DVC's rerun contract.
"""

from __future__ import annotations

import hashlib
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
import yaml
import zarr

from tinyworlds.core.params import Layout
from tinyworlds.models.checkpoint import load_model

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def shrink(params: dict) -> dict:
    for recording in params["recordings"].values():
        recording["frames"] = 720  # 12 s at 60 fps -> 180 frames at 15 fps
    params["data"].update(size=16, split={"val_fraction": 0.2, "block_frames": 40, "gap_frames": 4})
    tiny_model = {"patch_size": 4, "embed_dim": 32, "num_heads": 2}
    tiny_train = {"clip_len": 3, "steps": 12, "batch_size": 4, "lr": 0.003, "warmup_steps": 2,
                  "log_every": 2, "val_every": 6, "checkpoint_every": 6}
    for name in ("tokenizer", "lam"):
        params[name]["model"].update(tiny_model, encoder_blocks=1, decoder_blocks=1)
        params[name]["train"].update(tiny_train)
    params["tokenizer"]["model"]["levels"] = [4, 4]
    params["dynamics"]["model"].update(embed_dim=32, num_heads=2, num_blocks=1)
    # Clips one frame longer than the tokenizer's: its previews decode past the tokenizer's window.
    params["dynamics"]["train"].update(tiny_train, clip_len=4)
    params["tracking"]["uri"] = None
    return params


def run(cmd, cwd, check=True, **kwargs):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def make_project(root: Path) -> Path:
    for item in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / item, root / item)
    for folder in ("pipeline", "tinyworlds", ".dvc"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    params = shrink(yaml.safe_load((root / "params.yaml").read_text()))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", "--allow-empty"], root)
    return root


def env_for(root: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(TINYWORLDS_PIPELINE_RUN="", PYTHONUNBUFFERED="1", **extra)
    env.pop("TINYWORLDS_PIPELINE_RUN")
    return env


def dvc(root: Path, *args, check=True, **kwargs):
    return run([sys.executable, "-m", "dvc", *args], root, check=check, env=env_for(root), **kwargs)


def stale_stages(root: Path) -> set[str]:
    out = dvc(root, "status", "--json").stdout
    return set(json.loads(out or "{}"))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("project"))
    dvc(root, "repro")
    return root


def test_every_stage_output_exists_and_loads(project):
    layout = Layout(project)
    for name in ("pong", "breakout"):
        assert zarr.open_group(str(layout.frames(name)), mode="r")["frames"].shape[1:] == (16, 16, 3)
        assert layout.tokens(name).exists() and layout.latent_actions(name).exists()
    for kind in ("tokenizer", "lam", "dynamics"):
        model = load_model(layout.model(kind))
        assert sum(p.numel() for p in model.parameters()) > 0
    for stage in ("train_tokenizer", "train_lam", "train_dynamics"):
        metrics = json.loads(layout.metrics(stage).read_text())
        assert metrics["steps"] == 12 and np.isfinite(metrics["loss"])
        assert layout.history(stage).read_text().startswith("step,")


def test_token_cache_matches_the_tokenizer_on_the_frames(project):
    layout = Layout(project)
    tokenizer = load_model(layout.model("tokenizer")).eval()
    frames = zarr.open_group(str(layout.frames("pong")), mode="r")["frames"]
    cached = zarr.open_group(str(layout.tokens("pong")), mode="r")["tokens"]
    assert cached.shape == (frames.shape[0], tokenizer.num_patches)
    picks = [0, 7, frames.shape[0] - 1]
    clip = torch.from_numpy(np.stack([frames[i] for i in picks])).permute(0, 3, 1, 2)[:, None]  # [N, 1, C, H, W]
    with torch.no_grad():
        expected = tokenizer.encode(clip.float() / 127.5 - 1)[:, 0]  # [N, P]
    assert np.array_equal(np.stack([cached[i] for i in picks]).astype(np.int64), expected.numpy())


def test_latent_action_cache_labels_every_transition(project):
    layout = Layout(project)
    actions = zarr.open_group(str(layout.latent_actions("pong")), mode="r")["latent_actions"][:]
    lam = load_model(layout.model("lam"))
    assert (actions[:-1] >= 0).all() and (actions[:-1] < lam.num_actions).all() and actions[-1] == -1
    # The default reads still / either sign along each video's slowest direction, fitted after training.
    assert lam.config.readout == "direction" and lam.num_actions == 3
    readout = json.loads((layout.model("lam") / "readout.json").read_text())
    assert set(readout["datasets"]) == set(yaml.safe_load((project / "params.yaml").read_text())["data"]["train_on"])
    assert all(0 <= entry["slowness"] and entry["pairs"] > 0 for entry in [*readout["datasets"].values(), readout["pooled"]])


def test_mlflow_has_one_run_per_stage_grouped_by_pipeline_run(project):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tinyworlds")
    runs = client.search_runs([experiment.experiment_id], "tags.`tinyworlds.stage` != ''")
    by_stage = {r.data.tags["tinyworlds.stage"]: r for r in runs}
    assert {"train_tokenizer", "train_lam", "train_dynamics"} <= set(by_stage)
    pipeline_ids = {by_stage[s].data.tags["tinyworlds.pipeline_run"] for s in ("train_tokenizer", "train_lam", "train_dynamics")}
    assert len(pipeline_ids) == 1
    tokenizer_run = by_stage["train_tokenizer"]
    assert tokenizer_run.data.params["model.patch_size"] == "4"
    logged_steps = {m.step for m in client.get_metric_history(tokenizer_run.info.run_id, "loss")}
    assert logged_steps == {2, 4, 6, 8, 10, 12}  # every log_every=2 of 12 steps
    assert "val_psnr" in tokenizer_run.data.metrics
    for stage, kind in (("train_tokenizer", "tokenizer"), ("train_lam", "lam"), ("train_dynamics", "dynamics")):
        weights = Layout(project).model(kind) / "model.safetensors"  # the run carries the model DVC cached
        assert by_stage[stage].data.tags[f"tinyworlds.model.{kind}"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert {a.path for a in client.list_artifacts(by_stage["train_lam"].info.run_id, "models/lam")} >= {
        "models/lam/model.safetensors", "models/lam/config.json", "models/lam/action_names.json",
        "models/lam/readout.json"}


def test_no_op_repro_reruns_nothing(project):
    assert stale_stages(project) == set()
    out = dvc(project, "repro").stdout
    assert "didn't change, skipping" in out and "Running stage" not in out


def test_param_edits_invalidate_exactly_the_affected_stages(project):
    params_path = project / "params.yaml"
    original = params_path.read_text()
    try:
        params = yaml.safe_load(original)
        params["dynamics"]["train"]["lr"] = 0.001
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        assert stale_stages(project) == {"train_dynamics"}

        params = yaml.safe_load(original)
        params["datasets"]["pong"]["fit"] = "pad"
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        stale = stale_stages(project)
        assert "ingest@pong" in stale and "ingest@breakout" not in stale and not any(s.startswith("record") for s in stale)
    finally:
        params_path.write_text(original)
    assert stale_stages(project) == set()


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def test_a_tokenizer_edit_reruns_tokenizer_cache_dynamics_and_evaluate_but_not_data_or_actions(project):
    params_path = project / "params.yaml"
    original = params_path.read_text()
    try:
        params = yaml.safe_load(original)
        params["tokenizer"]["model"]["embed_dim"] = 48
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        assert stale_stages(project) == {"train_tokenizer"}  # downstream goes stale once its inputs change
        assert ran_stages(dvc(project, "repro").stdout) == {"train_tokenizer", "tokenize", "train_dynamics", "evaluate"}
    finally:
        params_path.write_text(original)
        dvc(project, "repro")
    assert stale_stages(project) == set()


def test_a_dataset_nothing_trains_on_reruns_only_its_ingest(project):
    """Adding a video to `datasets` without naming it in `data.train_on`: its ingest runs, the
    cheap training_set stage rechecks the stores, and no model is retrained."""
    params_path = project / "params.yaml"
    original = params_path.read_text()
    extra_video = project / "data" / "raw" / "extra.mp4"
    shutil.copy(project / "data" / "raw" / "pong.mp4", extra_video)
    try:
        params = yaml.safe_load(original)
        params["datasets"]["extra"] = {"source": "data/raw/extra.mp4"}
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        assert ran_stages(dvc(project, "repro").stdout) == {"ingest@extra", "training_set"}
        trained_on = set(yaml.safe_load(original)["data"]["train_on"])
        assert json.loads(Layout(project).training_set().read_text())["datasets"].keys() == trained_on
    finally:
        params_path.write_text(original)
        extra_video.unlink()
        shutil.rmtree(Layout(project).frames("extra"), ignore_errors=True)
    assert ran_stages(dvc(project, "repro").stdout) <= {"training_set"}
    assert stale_stages(project) == set()


def test_a_killed_training_stage_resumes_from_its_checkpoint(project):
    params_path = project / "params.yaml"
    original = params_path.read_text()
    try:
        params = yaml.safe_load(original)
        params["dynamics"]["train"].update(steps=400, log_every=10, val_every=400, checkpoint_every=20)
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        state = Layout(project).train_state("train_dynamics") / "state.json"
        process = subprocess.Popen([sys.executable, "pipeline/train_dynamics.py"], cwd=project, env=env_for(project),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and not (state.exists() and json.loads(state.read_text())["step"] >= 40):
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait()
        saved = json.loads(state.read_text())["step"]
        assert 40 <= saved < 400

        result = dvc(project, "repro", "train_dynamics")
        assert f"resuming from step {saved}" in result.stdout + result.stderr
        final = json.loads(Layout(project).metrics("train_dynamics").read_text())
        assert final["steps"] == 400
    finally:
        params_path.write_text(original)


def test_a_diverging_run_stops_with_the_step_and_keeps_the_last_good_checkpoint(project):
    """Adam moves every weight by ~lr on step 1, so lr=1e30 makes step 2's loss non-finite.
    (The loop's own tests cover a divergence after checkpoints of the same run.)"""
    from safetensors.torch import load_file

    params_path = project / "params.yaml"
    original = params_path.read_text()
    state_dir = Layout(project).train_state("train_lam")
    before = (state_dir / "state.json").read_text()
    try:
        params = yaml.safe_load(original)
        params["lam"]["train"].update(lr=1e30, warmup_steps=0, steps=40, checkpoint_every=2)
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        result = run([sys.executable, "pipeline/train_lam.py"], project, check=False, env=env_for(project))
        assert result.returncode == 1
        message = result.stderr.strip().splitlines()[-1]
        assert message.startswith("error: train_lam: loss became non-finite at step 2 ")
        assert (state_dir / "state.json").read_text() == before
        assert all(torch.isfinite(w).all() for w in load_file(state_dir / "model.safetensors").values())
    finally:
        params_path.write_text(original)
