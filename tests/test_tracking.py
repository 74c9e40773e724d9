"""MLflow tracking: stage runs, pipeline grouping, store resolution, fail-fast checks, `tinyworlds runs`.

Every test gets its own project directory (a `.dvc/` dir and a fresh SQLite store in it); the
store is copied from one made per session (conftest's `empty_store`), because MLflow's schema
migrations take seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from tests.conftest import WORLD_KINDS, log_pipeline, save_tiny_models
from tinyworlds.apps.cli import app
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.tracking.flatten import flatten_config
from tinyworlds.tracking.lineage import _is_dvc_pipeline, pipeline_run_id
from tinyworlds.tracking.models import fetch_run_models, weights_sha256
from tinyworlds.tracking.run import StageRun
from tinyworlds.tracking.store import check_tracking, project_root, resolve_tracking_uri

REPO = Path(__file__).resolve().parents[1]
ENV_VARS = (
    "MLFLOW_TRACKING_URI",
    "TINYWORLDS_PIPELINE_RUN",
    "DVC_ROOT",
    "DVC_EXP_NAME",
    "DVC_EXP_BASELINE_REV",
    "DVC_STAGE",
)
CONFIG = {"model": {"lr": 1e-3, "dims": [64, 128], "fsq": {"levels": [8, 8, 8]}}, "seed": 0}


@pytest.fixture
def project(tmp_path, monkeypatch, empty_store) -> Path:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".dvc").mkdir()
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def client_for(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def git_init(path: Path) -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init")
    return git("rev-parse", "HEAD").strip()


def run_stage(stage: str, lr: float, val_loss: float, datasets=("pong",)) -> str:
    config = {**CONFIG, "model": {**CONFIG["model"], "lr": lr}}
    with StageRun(stage, config, datasets=list(datasets)) as run:
        run.log_final({"val_loss": val_loss})
    return run.run_id


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- StageRun --------------------------------------------------------------------------------


def test_stage_run_logs_params_metrics_tags_and_artifacts(project, monkeypatch):
    commit = git_init(project)
    monkeypatch.setenv("TINYWORLDS_PIPELINE_RUN", "pipe-1")
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lamb")
    config = {**CONFIG, "notes": "x" * 2000}
    image_HWC = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)

    with StageRun("train_tokenizer", config, datasets=["pong", "breakout"]) as run:
        for step in range(0, 50, 10):
            run.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-3}, step=step)
        run.log_final({"val_loss": 0.2})
        run.log_image(image_HWC, "reconstructions/step_100.png")
        run.log_dict({"frames": 10}, "summary.json")
        run.set_tags({"note": "smoke"})

    client = client_for(project)
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED"
    assert client.get_experiment(logged.info.experiment_id).name == "tinyworlds"
    params = logged.data.params
    assert params["model.lr"] == "0.001"
    assert params["model.dims"] == "[64,128]"
    assert params["model.fsq.levels"] == "[8,8,8]"
    assert params["seed"] == "0"
    assert len(params["notes"]) <= 500 and params["notes"].endswith("...")

    history = client.get_metric_history(run.run_id, "loss")
    assert [m.step for m in history] == [0, 10, 20, 30, 40]
    assert history[-1].value == pytest.approx(1 / 41)
    final = client.get_metric_history(run.run_id, "val_loss")
    assert [(m.step, m.value) for m in final] == [(40, pytest.approx(0.2))]  # at the last step
    assert logged.data.metrics["val_loss"] == pytest.approx(0.2)

    tags = logged.data.tags
    assert tags["tinyworlds.stage"] == "train_tokenizer"
    assert tags["tinyworlds.datasets"] == "pong,breakout"
    assert tags["tinyworlds.git_commit"] == tags["mlflow.source.git.commit"] == commit
    assert tags["tinyworlds.pipeline_run"] == "pipe-1"
    assert tags["tinyworlds.dvc_experiment"] == "brisk-lamb"
    assert tags["tinyworlds.final_metrics"] == "val_loss"
    assert tags["mlflow.runName"] == "train_tokenizer · pong+breakout · brisk-lamb"
    assert tags["tinyworlds.pipeline"] == "brisk-lamb"  # what the UI's runs view groups by
    assert tags["note"] == "smoke"

    # Artifacts land in the project's mlartifacts/, not under whatever the cwd was.
    artifacts = project / "mlartifacts" / run.run_id / "artifacts"
    assert run.artifact_uri == artifacts.as_uri()
    png = artifacts / "reconstructions" / "step_100.png"
    assert png.stat().st_size > 0
    assert json.loads((artifacts / "resolved_config.json").read_text())["notes"] == "x" * 2000
    assert (artifacts / "summary.json").exists()


def test_stages_of_one_pipeline_run_share_one_parent(project, monkeypatch):
    monkeypatch.setenv("TINYWORLDS_PIPELINE_RUN", "pipe-A")
    first = run_stage("train_tokenizer", 1e-3, 0.5)
    second = run_stage("train_dynamics", 1e-3, 0.4)
    monkeypatch.setenv("TINYWORLDS_PIPELINE_RUN", "pipe-B")
    other = run_stage("train_tokenizer", 1e-3, 0.3)

    client = client_for(project)
    parent_of = {r: client.get_run(r).data.tags["mlflow.parentRunId"] for r in (first, second, other)}
    assert parent_of[first] == parent_of[second] != parent_of[other]
    parent = client.get_run(parent_of[first])
    assert parent.data.tags["tinyworlds.parent"] == "true"
    assert parent.data.tags["tinyworlds.pipeline_run"] == "pipe-A"
    assert parent.info.run_name == "pipeline pipe-A"
    assert parent.info.status == "FINISHED"
    experiment_id = parent.info.experiment_id
    parents = client.search_runs([experiment_id], "tags.`tinyworlds.parent` = 'true'")
    assert len(parents) == 2


def test_standalone_run_has_no_parent(project):
    run_id = run_stage("train_tokenizer", 1e-3, 0.5)
    tags = client_for(project).get_run(run_id).data.tags
    assert "mlflow.parentRunId" not in tags
    assert len(tags["tinyworlds.pipeline_run"]) == 32  # a fresh uuid


def test_failing_stage_is_marked_failed_and_the_error_propagates(project, monkeypatch):
    monkeypatch.setenv("TINYWORLDS_PIPELINE_RUN", "pipe-F")
    with pytest.raises(ValueError, match="diverged"):
        with StageRun("train_dynamics", CONFIG) as failed:
            failed.log_metrics({"loss": 1.0}, step=0)
            raise ValueError("loss diverged")
    later = run_stage("evaluate", 1e-3, 0.1)  # e.g. `dvc repro --keep-going`

    client = client_for(project)
    run = client.get_run(failed.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["tinyworlds.error"] == "ValueError: loss diverged"
    assert run.data.metrics["loss"] == 1.0  # what was logged before the failure is kept
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"  # a later success does not hide the failure
    assert client.get_run(later).info.status == "FINISHED"


def test_interrupted_stage_is_marked_killed(project):
    with pytest.raises(KeyboardInterrupt):
        with StageRun("train_tokenizer", CONFIG) as run:
            raise KeyboardInterrupt
    assert client_for(project).get_run(run.run_id).info.status == "KILLED"


def test_store_hiccup_while_training_warns_and_training_goes_on(project, caplog):
    with StageRun("train_tokenizer", CONFIG) as run:
        run.log_metrics({"loss": 1.0}, step=0)
        healthy = run._client.log_batch

        def broken(*args, **kwargs):
            raise ConnectionError("[Errno 111] Connection refused")

        run._client.log_batch = broken
        for step in range(1, 4):
            run.log_metrics({"loss": 0.5}, step=step)  # must not raise
        run._client.log_batch = healthy
        run.log_metrics({"loss": 0.25}, step=4)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2  # the first failure, then the count at the end
    assert "Connection refused" in warnings[0] and "training continues" in warnings[0]
    assert "3 metric batches could not be logged" in warnings[1]
    history = client_for(project).get_metric_history(run.run_id, "loss")
    assert [m.step for m in history] == [0, 4]
    assert client_for(project).get_run(run.run_id).info.status == "FINISHED"


def test_experiment_name_comes_from_params_yaml(project):
    (project / "params.yaml").write_text("tracking:\n  uri: null\n  experiment: genie-small\n")
    run_id = run_stage("train_tokenizer", 1e-3, 0.5)
    client = client_for(project)
    assert client.get_experiment(client.get_run(run_id).info.experiment_id).name == "genie-small"


def test_flatten_config_makes_dotted_string_params():
    @dataclasses.dataclass
    class Optim:
        lr: float = 3e-4
        betas: tuple = (0.9, 0.95)

    flat = flatten_config({"optim": Optim(), "data": {"games": ["pong"], "root": Path("data")}, "odd key!": 1})
    assert flat == {
        "optim.lr": "0.0003",
        "optim.betas": "[0.9,0.95]",
        "data.games": '["pong"]',
        "data.root": "data",
        "odd key_": "1",
    }


# -- where the store is ----------------------------------------------------------------------


def test_tracking_uri_default_setting_and_env(project, monkeypatch):
    assert resolve_tracking_uri() == f"sqlite:///{project}/mlflow.db"
    assert resolve_tracking_uri("http://mlflow.lab:5000") == "http://mlflow.lab:5000"
    # A relative SQLite path is relative to the project root, not to the cwd.
    (project / "pipeline").mkdir()
    monkeypatch.chdir(project / "pipeline")
    assert resolve_tracking_uri("sqlite:///runs/m.db") == f"sqlite:///{project}/runs/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env-wins:5000")
    assert resolve_tracking_uri("http://mlflow.lab:5000") == "http://env-wins:5000"


def test_dvc_experiment_copy_resolves_to_the_original_project(project, monkeypatch):
    copy = project / ".dvc" / "tmp" / "exps" / "tmpk2x9"
    (copy / ".dvc").mkdir(parents=True)
    (copy / "params.yaml").write_text("tracking:\n  experiment: from-the-copy\n")
    monkeypatch.chdir(copy)
    assert project_root() == project
    assert resolve_tracking_uri() == f"sqlite:///{project}/mlflow.db"

    with StageRun("train_tokenizer", CONFIG) as run:
        run.log_final({"val_loss": 0.1})
    logged = client_for(project).get_run(run.run_id)  # in the original project's store
    assert run.artifact_uri.startswith((project / "mlartifacts").as_uri())
    assert not (copy / "mlflow.db").exists() and not (copy / "mlartifacts").exists()
    # ...but with the experiment's own params (dvc exp run -S edits the copy's params.yaml).
    assert client_for(project).get_experiment(logged.info.experiment_id).name == "from-the-copy"


def test_dvc_root_env_names_the_project(project, monkeypatch, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("DVC_ROOT", str(project))
    assert project_root() == project


# -- pipeline run id -------------------------------------------------------------------------


def test_dvc_invocations_are_recognised():
    assert _is_dvc_pipeline(["/venv/bin/python", "/venv/bin/dvc", "repro"])
    assert _is_dvc_pipeline(["dvc", "exp", "run", "-S", "train.lr=0.1"])
    assert _is_dvc_pipeline(["python", "-m", "dvc", "exp", "exec-run", "--infofile", "x"])
    assert not _is_dvc_pipeline(["dvc", "status"])
    assert not _is_dvc_pipeline(["/bin/sh", "-c", "python pipeline/train.py"])
    assert not _is_dvc_pipeline(["python", "dvc_report.py", "repro"])


def test_stages_under_one_dvc_process_share_its_pipeline_run(tmp_path, monkeypatch):
    monkeypatch.delenv("TINYWORLDS_PIPELINE_RUN", raising=False)
    fake_dvc = tmp_path / "dvc"  # stands in for `dvc repro`, which runs each stage via a shell
    fake_dvc.write_text(
        "import os, subprocess, sys, psutil\n"
        "print(f'{os.getpid()}-{int(psutil.Process().create_time())}')\n"
        "stage = [sys.executable, '-c', 'from tinyworlds.tracking.lineage import pipeline_run_id; print(pipeline_run_id())']\n"
        "for _ in range(2):\n"
        "    subprocess.run(['/bin/sh', '-c', ' '.join(repr(a) for a in stage)], check=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, str(fake_dvc), "repro"], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[1] == out[2] == out[0]
    assert pipeline_run_id() != pipeline_run_id()  # standalone: a fresh id each time


def test_bad_pipeline_run_env_is_a_user_error(project, monkeypatch):
    monkeypatch.setenv("TINYWORLDS_PIPELINE_RUN", "it's")
    with pytest.raises(TinyWorldsError, match="TINYWORLDS_PIPELINE_RUN"):
        pipeline_run_id()


# -- fail fast -------------------------------------------------------------------------------


def test_unreachable_server_fails_before_the_stage_body(project):
    uri = f"http://127.0.0.1:{closed_port()}"
    body_ran = False
    start = time.monotonic()
    with pytest.raises(TinyWorldsError) as err:
        with StageRun("train_tokenizer", CONFIG, tracking_uri=uri):
            body_ran = True
    assert time.monotonic() - start < 5
    assert not body_ran
    message = str(err.value)
    assert uri in message and "unreachable" in message and "Connection refused" in message
    assert "\n" not in message
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the quick settings are undone


def test_hung_server_times_out(project):
    with socket.socket() as sock:  # accepts connections (the kernel does) but never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(TinyWorldsError, match="timed out"):
            check_tracking(uri, timeout_s=1)
        assert time.monotonic() - start < 4


def test_unwritable_sqlite_store_fails_fast(project):
    (project / "a_file").write_text("")
    uri = f"sqlite:///{project}/a_file/mlflow.db"
    with pytest.raises(TinyWorldsError) as err:
        with StageRun("train_tokenizer", CONFIG, tracking_uri=uri):
            pass
    assert uri in str(err.value) and "not writable" in str(err.value)


# -- tinyworlds runs -------------------------------------------------------------------------


def invoke(*args):
    return CliRunner().invoke(app, ["runs", *args])


def test_runs_lists_latest_runs_with_differing_params_and_final_metrics(project):
    tok = run_stage("train_tokenizer", 1e-3, 0.50, datasets=("pong", "breakout"))
    dyn = run_stage("train_dynamics", 2e-3, 0.25)
    dyn2 = run_stage("train_dynamics", 3e-3, 0.125)

    result = invoke()
    assert result.exit_code == 0, result.output
    for run_id in (tok, dyn, dyn2):
        assert run_id[:8] in result.output
    assert "model.lr" in result.output and "seed" not in result.output  # only params that differ
    for value in ("0.001", "0.002", "0.003", "0.5", "0.25", "0.125", "pong,breakout", "FINISHED"):
        assert value in result.output
    assert result.output.index(dyn2[:8]) < result.output.index(dyn[:8]) < result.output.index(tok[:8])

    result = invoke("--stage", "train_dynamics", "--limit", "1")
    assert result.exit_code == 0, result.output
    assert dyn2[:8] in result.output and dyn[:8] not in result.output and tok[:8] not in result.output


def test_runs_diff_shows_two_runs_side_by_side(project):
    a = run_stage("train_dynamics", 2e-3, 0.25)
    b = run_stage("train_dynamics", 3e-3, 0.25)

    result = invoke("--diff", a[:6], "--diff", b)
    assert result.exit_code == 0, result.output
    assert a in result.output and b in result.output
    lr_row = next(line for line in result.output.splitlines() if "model.lr" in line)
    assert "0.002" in lr_row and "0.003" in lr_row
    assert not any("val_loss" in line for line in result.output.splitlines()[:-1])  # equal: only counted
    n_params = len(flatten_config(CONFIG))
    assert f"{n_params - 1} params and 1 final metrics are the same" in result.output


def test_runs_unknown_run_id_is_a_one_line_error(project):
    a = run_stage("train_dynamics", 2e-3, 0.25)
    result = invoke("--diff", a, "--diff", "deadbeef")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: run 'deadbeef': no run with this id in experiment 'tinyworlds'"
    ]

    result = invoke("--diff", a)
    assert result.exit_code == 1 and "exactly two run ids" in result.stderr


def test_runs_on_an_empty_store_is_a_one_line_error(project):
    result = invoke()
    assert result.exit_code == 1
    assert result.stderr.startswith("error: no MLflow experiment 'tinyworlds'")

    (project / "mlflow.db").unlink()
    result = invoke()
    assert result.exit_code == 1
    assert result.stderr.startswith("error: no MLflow runs yet:")
    assert not (project / "mlflow.db").exists()  # looking does not create a store


# -- what the MLflow UI shows: names, headline metrics, views -------------------------------


def test_runs_are_named_by_stage_datasets_and_commit_under_dvc_repro(project, monkeypatch):
    commit = git_init(project)
    monkeypatch.setenv("TINYWORLDS_PIPELINE_RUN", "pipe-R")
    run_id = run_stage("train_dynamics", 1e-3, 0.5, datasets=("pong", "breakout"))
    client = client_for(project)
    run = client.get_run(run_id)
    assert run.info.run_name == f"train_dynamics · pong+breakout · {commit[:7]}"
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert re.fullmatch(rf"repro {commit[:7]} \d{{4}}-\d\d-\d\d \d\d:\d\d", parent.info.run_name)
    assert run.data.tags["tinyworlds.pipeline"] == parent.data.tags["tinyworlds.pipeline"] == parent.info.run_name


def test_headline_metrics_stay_at_the_top_level_and_detail_goes_under_sections(project):
    with StageRun("train_lam", CONFIG, datasets=["pong"]) as lam:
        lam.log_metrics({"loss": 1.0, "lr": 1e-3, "action_usage_0": 0.5}, step=2)
        lam.log_final({"loss": 0.5, "val_loss": 0.6, "actions_used": 2.0})
    with StageRun("evaluate", CONFIG, datasets=["pong"]) as evaluate:
        evaluate.log_metrics({"pong.rollout.fg_psnr_by_horizon": 20.0}, step=1)
        evaluate.log_final({"pong.headline.tokenizer_fg_psnr": 21.0, "pong.tokenizer.fg_psnr": 21.5,
                            "throughput.batch_1_frames_per_s": 30.0})

    client = client_for(project)
    assert set(client.get_run(lam.run_id).data.metrics) == {
        "loss", "val_loss", "train/lr", "train/action_usage_0", "train/actions_used"}
    logged = client.get_run(evaluate.run_id).data
    assert set(logged.metrics) == {"pong.headline.tokenizer_fg_psnr", "pong/tokenizer.fg_psnr",
                                   "pong/rollout.fg_psnr_by_horizon", "throughput/batch_1_frames_per_s"}
    assert logged.tags["tinyworlds.final_metrics"] == (
        "pong.headline.tokenizer_fg_psnr,pong/tokenizer.fg_psnr,throughput/batch_1_frames_per_s")

    result = invoke("--stage", "evaluate")  # the headline figure is the first metric column
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "pong.headline" in line)
    assert header.index("pong.headline.tokenizer_fg_psnr") < header.index("pong/tokenizer.fg_psnr")


def test_the_experiment_opens_on_the_runs_grouped_by_pipeline_with_headline_columns(project, monkeypatch):
    monkeypatch.setenv("TINYWORLDS_PIPELINE_RUN", "pipe-two")
    run_stage("train_tokenizer", 1e-3, 0.5, datasets=("pong", "breakout"))
    monkeypatch.delenv("TINYWORLDS_PIPELINE_RUN")
    client = client_for(project)
    experiment = client.get_experiment_by_name("tinyworlds")
    tags = experiment.tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"  # what MLflow 3.0-3.x UIs read
    view = json.loads(tags["mlflow.sharedViewState.tinyworlds"])
    assert view["selectedColumns"] == [
        "metrics.`loss`", "metrics.`val_loss`", "metrics.`mean.headline.tokenizer_fg_psnr`",
        "metrics.`mean.headline.rollout_minus_copy_fg_psnr_min`", "metrics.`mean.headline.delta_fg_psnr`"]
    assert view["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "tinyworlds.pipeline"}]
    compare = json.loads(tags["mlflow.sharedViewState.tinyworlds-compare"])
    assert compare["searchFilter"] == "tags.`tinyworlds.stage` = 'train_dynamics'"

    client.set_experiment_tag(experiment.experiment_id, "mlflow.experimentKind", "genai_development")
    run_stage("train_tokenizer", 1e-3, 0.5, datasets=("pong",))  # by hand: the view stays the pipeline's
    tags = client.get_experiment(experiment.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "genai_development"  # someone's own choice is kept
    assert json.loads(tags["mlflow.sharedViewState.tinyworlds"]) == view
    monkeypatch.setenv("TINYWORLDS_PIPELINE_RUN", "pipe-pong")  # a pipeline on one dataset
    run_stage("train_tokenizer", 1e-3, 0.5, datasets=("pong",))
    tags = client.get_experiment(experiment.experiment_id).tags
    assert "metrics.`pong.headline.tokenizer_fg_psnr`" in tags["mlflow.sharedViewState.tinyworlds"]

    result = invoke()
    assert result.exit_code == 0, result.output
    assert f"mlflow ui --backend-store-uri sqlite:///{project}/mlflow.db" in result.output
    link = (f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
            "?viewStateShareKey=tinyworlds&workflowType=machine_learning")
    assert link in result.output


# -- models attached to runs, and fetched back ------------------------------------------------


@pytest.fixture
def logged_pipeline(project, tmp_path_factory):
    """One pipeline run with models attached; (models dir, {stage: run id})."""
    models = tmp_path_factory.mktemp("trained") / "models"
    save_tiny_models(models)
    return models, log_pipeline(models, "brisk-lamb", 1e-3)


def test_training_runs_carry_their_models(project, logged_pipeline):
    models, ids = logged_pipeline
    client = client_for(project)
    run = client.get_run(ids["train_lam"])
    assert run.data.tags["tinyworlds.model.lam"] == weights_sha256(models / "lam")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "models/lam")} == {
        "models/lam/model.safetensors", "models/lam/config.json"}
    assert "tinyworlds.model.lam" not in client.get_run(ids["evaluate"]).data.tags  # it scored, not trained


def test_finish_training_attaches_the_trained_model_with_what_is_written_beside_it(project):
    from types import SimpleNamespace

    from tinyworlds.core.params import Layout
    from tinyworlds.models import TokenizerConfig, VideoTokenizer
    from tinyworlds.training.setup import finish_training

    layout = Layout(project)
    model = VideoTokenizer(TokenizerConfig(frame_size=16, channels=3, patch_size=4, embed_dim=32, num_heads=2,
                                           encoder_blocks=1, decoder_blocks=1, max_frames=2, levels=(4, 4)))
    result = SimpleNamespace(model=model, final={"loss": 0.5}, step=3, history=[{"step": 3, "loss": 0.5}],
                             resumed_from=0)
    with StageRun("train_tokenizer", CONFIG) as run:
        finish_training("train_tokenizer", result, layout, run, layout.model("tokenizer"), {"val_psnr": 20.0})
        (layout.model("tokenizer") / "notes.json").write_text("{}")  # as train_lam writes its action names
    artifacts = {a.path for a in client_for(project).list_artifacts(run.run_id, "models/tokenizer")}
    assert artifacts == {f"models/tokenizer/{name}" for name in ("model.safetensors", "config.json", "notes.json")}


def test_a_failed_stage_attaches_nothing(project, tmp_path):
    save_tiny_models(tmp_path / "models")
    with pytest.raises(ValueError), StageRun("train_lam", CONFIG) as run:
        run.attach_model(tmp_path / "models" / "lam")
        raise ValueError("diverged")
    logged = client_for(project).get_run(run.run_id)
    assert "tinyworlds.model.lam" not in logged.data.tags
    assert client_for(project).list_artifacts(run.run_id, "models") == []
    with pytest.raises(TinyWorldsError, match="no model.safetensors to attach"), StageRun("train_lam", CONFIG) as run:
        run.attach_model(tmp_path / "nowhere")
    with pytest.raises(TinyWorldsError, match="no model.safetensors to attach"), StageRun("train_lam", CONFIG) as run:
        run.attach_model(tmp_path / "models" / "lam")
        shutil.rmtree(tmp_path / "models" / "lam")  # gone before the run ends: the run fails, saying why
    logged = client_for(project).get_run(run.run_id)
    assert logged.info.status == "FAILED" and "no model.safetensors" in logged.data.tags["tinyworlds.error"]


def test_models_are_fetched_from_a_store_copied_from_another_clone(project, logged_pipeline, tmp_path_factory,
                                                                   monkeypatch):
    models, ids = logged_pipeline
    clone = tmp_path_factory.mktemp("other-clone")
    shutil.copy(project / "mlflow.db", clone / "mlflow.db")
    shutil.copytree(project / "mlartifacts", clone / "mlartifacts")
    shutil.rmtree(project / "mlartifacts")  # the paths the store remembers are gone
    monkeypatch.chdir(clone)
    monkeypatch.setenv("XDG_CACHE_HOME", str(clone / "cache"))

    # the pipeline's run, its evaluate run, a training run alone (by a prefix)
    for ref in (ids["parent"], ids["evaluate"], ids["train_dynamics"][:10]):
        fetched = fetch_run_models(ref, WORLD_KINDS)
        assert fetched.parent == clone / "cache" / "tinyworlds" / "mlflow-models"
        assert {kind: weights_sha256(fetched / kind) for kind in WORLD_KINDS} == {
            kind: weights_sha256(models / kind) for kind in WORLD_KINDS}


def test_bad_run_references_are_one_line_errors(project, logged_pipeline, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    lonely = run_stage("train_tokenizer", 1e-3, 0.5)  # logged without a model
    with StageRun("train_tokenizer", CONFIG) as alone:  # a model no evaluate run scored
        save_tiny_models(tmp_path / "models", seed=1)
        alone.attach_model(tmp_path / "models" / "tokenizer")

    for ref, message in [
        ("deadbeef", "run 'deadbeef': no run with this id in experiment 'tinyworlds'"),
        ("not-an-id", "run 'not-an-id': not an MLflow run id (hex digits)"),
        (lonely, f"run {lonely[:8]} (train_tokenizer · pong): has no models"),
        (alone.run_id, f"run {alone.run_id[:8]} (train_tokenizer): names no lam or dynamics model"),
    ]:
        result = CliRunner().invoke(app, ["play", "--run", ref, "--device", "cpu"])
        assert result.exit_code == 1
        assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1, result.stderr

    result = CliRunner().invoke(app, ["dream", "--run", lonely, "--models", "data/models"])
    assert result.exit_code == 1 and result.stderr == "error: --models and --run: give one of them: " \
        "a model directory or an MLflow run\n"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    result = CliRunner().invoke(app, ["play", "--run", lonely])
    assert result.exit_code == 1 and "unreachable" in result.stderr and result.stderr.count("\n") == 1


# -- end to end under DVC --------------------------------------------------------------------

STAGE_SCRIPT = """\
import sys, yaml
from tinyworlds.tracking.run import StageRun
params = yaml.safe_load(open("params.yaml"))
with StageRun(sys.argv[1], params, datasets=["pong"]) as run:
    run.log_metrics({"loss": 1.0}, step=0)
    run.log_final({"val_loss": params["train"]["lr"] * 100})
open(sys.argv[1] + ".txt", "w").write(run.run_id)
"""


@pytest.mark.slow
def test_dvc_repro_and_temp_experiment_log_to_the_project_store(project):
    """Real DVC: the env vars and process tree relied on are what DVC 3 provides."""
    commit = git_init(project)
    shutil.rmtree(project / ".dvc")
    env = {**os.environ, "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1"}

    def sh(*args):
        done = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr

    dvc = (sys.executable, "-m", "dvc")
    sh(*dvc, "init", "-q")
    (project / "stage.py").write_text(STAGE_SCRIPT)
    (project / "params.yaml").write_text("train:\n  lr: 0.001\ntracking:\n  experiment: e2e\n")
    stage = f"{sys.executable} stage.py"
    (project / "dvc.yaml").write_text(
        "stages:\n"
        f"  first:\n    cmd: {stage} first\n    deps: [stage.py]\n    params: [train.lr]\n    outs: [first.txt]\n"
        f"  second:\n    cmd: {stage} second\n    deps: [first.txt]\n    outs: [second.txt]\n"
    )
    (project / ".gitignore").write_text("/mlflow.db\n/mlartifacts/\n")
    sh("git", "add", "-A")
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pipeline")
    baseline = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert baseline != commit
    sh(*dvc, "repro", "-q")
    sh(*dvc, "exp", "run", "--temp", "-q", "-n", "lr2", "-S", "train.lr=0.002")

    client = client_for(project)
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    runs = client.search_runs([experiment_id], "tags.`tinyworlds.stage` LIKE '%'")
    by_lr = {}
    for run in runs:
        by_lr.setdefault(run.data.params["train.lr"], []).append(run)
    repro, exp = by_lr["0.001"], by_lr["0.002"]
    assert len(repro) == len(exp) == 2
    for group in (repro, exp):
        assert len({r.data.tags["tinyworlds.pipeline_run"] for r in group}) == 1
        assert len({r.data.tags["mlflow.parentRunId"] for r in group}) == 1
        assert {r.data.tags["tinyworlds.dvc_stage"] for r in group} == {"first", "second"}
        assert all(r.info.status == "FINISHED" for r in group)
    assert repro[0].data.tags["tinyworlds.pipeline_run"] != exp[0].data.tags["tinyworlds.pipeline_run"]
    assert all(r.data.tags["tinyworlds.dvc_experiment"] == "lr2" for r in exp)
    assert all("tinyworlds.dvc_experiment" not in r.data.tags for r in repro)
    assert all(r.data.tags["tinyworlds.git_commit"] == baseline for r in repro + exp)
    for run in exp:  # the temp copy is gone, its artifacts are not
        assert (project / "mlartifacts" / run.info.run_id / "artifacts" / "resolved_config.json").exists()
