"""The MLflow UI as a user meets it: an MLflow server on a throwaway store holding two small
pipeline runs (two `dvc exp run -S train.lr=...` experiments), opened in headless Chromium.

- The link `tinyworlds runs` prints (and the README gives) lands on the model-training view
  with every stage run and a headline figure showing, before any click.
- Ticking the two experiments' train_dynamics runs and pressing Compare shows them side by
  side; the compare view overlays their loss curves. Its screenshot is the README's
  (TINYWORLDS_UPDATE_SCREENSHOTS=1 writes it to docs/mlflow_compare.png).
- `dream --run ID` fetches the world model of a run from the server (artifacts proxied).

The browser tests need Debian's `chromium` and `chromium-driver` (CI installs them) and are
skipped only when they are missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import SIZE, WORLD_KINDS, log_pipeline, save_tiny_models
from tinyworlds.apps.cli import app
from tinyworlds.core.atomic import atomic_output
from tinyworlds.tracking.models import weights_sha256
from tinyworlds.tracking.ui import COMPARE_VIEW, view_link

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "mlflow_compare.png"
# DVC experiment name -> the lr it trained with
EXPERIMENTS = {"exp-lr1": 1e-3, "exp-lr3": 3e-3}
# For the server to answer and the pages to render on a busy 2-core machine.
PATIENCE_S = 90


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"mlflow server exited ({process.returncode}):\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    pytest.fail(
        f"mlflow server did not answer within {PATIENCE_S} s:\n{log.read_text()[-3000:]}"
    )


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a fresh SQLite store, artifacts proxied (as a team server runs); its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    log = root / "server.log"
    url = f"http://127.0.0.1:{free_port()}"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        url.rsplit(":", 1)[1],
        "--workers",
        "1",
    ]
    # No background job runner: nothing here needs it.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        # Its own process group: the server starts a uvicorn worker, which must stop with it.
        process = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_healthy(url, process, log)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def two_experiments(mlflow_server, tmp_path_factory):
    """Two pipeline runs logged to the server from a project; ({experiment: {stage: run id}},
    {experiment: models dir}, the MLflow experiment id)."""
    from mlflow import MlflowClient

    project = tmp_path_factory.mktemp("project")
    (project / ".dvc").mkdir()
    runs, models = {}, {}
    with pytest.MonkeyPatch.context() as patch:
        for name in (
            "MLFLOW_TRACKING_URI",
            "DVC_ROOT",
            "DVC_EXP_BASELINE_REV",
            "DVC_STAGE",
        ):
            patch.delenv(name, raising=False)
        patch.chdir(project)
        for seed, (experiment, lr) in enumerate(EXPERIMENTS.items()):
            models[experiment] = project / experiment
            # Each experiment its own world model.
            save_tiny_models(models[experiment], seed=seed)
            runs[experiment] = log_pipeline(
                models[experiment], experiment, lr, tracking_uri=mlflow_server
            )
    experiment_id = (
        MlflowClient(mlflow_server).get_experiment_by_name("tinyworlds").experiment_id
    )
    return runs, models, experiment_id


def stage_run_name(stage: str, experiment: str) -> str:
    return f"{stage} · pong · {experiment}"


def wait_for_text(browser, *texts: str) -> str:
    """The page's text once it shows every one of `texts`."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(driver):
        body = driver.find_element(By.TAG_NAME, "body").text
        return body if all(text in body for text in texts) else False

    return WebDriverWait(browser, PATIENCE_S).until(
        shown, f"the page never showed all of {texts}"
    )


def test_the_link_lands_on_the_stage_runs_and_their_headline_figures(
    mlflow_server, two_experiments, browser
):
    from selenium.webdriver.common.by import By

    runs, _, experiment_id = two_experiments
    browser.set_window_size(1400, 900)
    browser.get(view_link(mlflow_server, experiment_id))
    names = [
        stage_run_name(stage, experiment)
        for experiment in EXPERIMENTS
        for stage in ("train_tokenizer", "train_lam", "train_dynamics", "evaluate")
    ]
    page = wait_for_text(browser, *names, "pong.headline.tokenizer_fg_psnr", "val_loss")
    # Grouped by pipeline, the groups open; not the GenAI overview.
    assert "Group: exp-lr1" in page and "Group: exp-lr3" in page
    assert "No data available" not in page and "Model training" in page

    headline = browser.find_elements(
        By.CSS_SELECTOR,
        '[role="gridcell"][col-id="metrics.`pong.headline.tokenizer_fg_psnr`"]',
    )
    by_run = {
        cell.find_element(By.XPATH, "..")
        .get_attribute("row-id")
        .rsplit(".", 1)[-1]: cell.text
        for cell in headline
    }
    assert (
        by_run[runs["exp-lr1"]["evaluate"]] == "16"
        and by_run[runs["exp-lr3"]["evaluate"]] == "18"
    )


def test_two_experiments_compare_side_by_side_with_their_loss_curves_overlaid(
    mlflow_server, two_experiments, browser, tmp_path
):
    from selenium.webdriver.common.by import By

    runs, _, experiment_id = two_experiments
    dynamics = {
        experiment: runs[experiment]["train_dynamics"] for experiment in EXPERIMENTS
    }
    names = [stage_run_name("train_dynamics", experiment) for experiment in EXPERIMENTS]
    browser.set_window_size(1400, 900)

    # As a user does: tick the two runs in the runs view, press Compare.
    browser.get(view_link(mlflow_server, experiment_id))
    wait_for_text(browser, *names)
    for run_id in dynamics.values():
        browser.find_element(
            By.CSS_SELECTOR, f'[row-id$=".{run_id}"] input[type="checkbox"]'
        ).click()
    next(
        button
        for button in browser.find_elements(By.TAG_NAME, "button")
        if button.text == "Compare"
    ).click()
    page = wait_for_text(browser, "Comparing 2 Runs", *names, *dynamics.values())
    lr_row = next(line for line in page.splitlines() if line.startswith("train.lr "))
    assert lr_row.split()[1:] == ["0.001", "0.003"]

    # The compare view: every train_dynamics run, their loss curves in one chart.
    browser.get(view_link(mlflow_server, experiment_id, COMPARE_VIEW))
    legend = [f"{name} (loss)" for name in names]
    wait_for_text(browser, *legend)
    chart = browser.find_element(
        By.XPATH,
        "//*[normalize-space(text())='loss']/ancestor::*[.//*[contains(@class,'js-plotly-plot')]][1]",
    )
    assert all(entry in chart.text for entry in legend)
    assert len(chart.find_elements(By.CSS_SELECTOR, ".scatterlayer .trace")) >= 2

    for component in (
        "mlflow.assistant.chat_panel.close",
        "mlflow.experiment_page.shared_view.dismiss",
    ):
        for button in browser.find_elements(
            By.CSS_SELECTOR, f'[data-component-id="{component}"]'
        ):
            # The assistant's panel and the shared-view banner: room for the charts.
            button.click()
    wait_for_text(browser, *legend)
    shot = tmp_path / "mlflow_compare.png"
    browser.save_screenshot(str(shot))
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"))
        assert image.size[0] >= 1200 and pixels.std() > 10  # a page, not a blank
    if os.environ.get("TINYWORLDS_UPDATE_SCREENSHOTS"):
        with atomic_output(SCREENSHOT) as target:
            shutil.copy(shot, target)


def test_dream_run_fetches_the_world_model_from_the_server(
    mlflow_server, two_experiments, tmp_path, monkeypatch
):
    runs, models, _ = two_experiments
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    Image.fromarray(np.full((SIZE, SIZE, 3), 40, dtype=np.uint8)).save(
        tmp_path / "start.png"
    )

    # The pipeline's run: its models come from three stage runs.
    parent = runs["exp-lr3"]["parent"]
    result = CliRunner().invoke(
        app,
        [
            "dream",
            "--run",
            parent[:8],
            "--image",
            "start.png",
            "--frames",
            "2",
            "--seed",
            "0",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--out",
            "dream",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"models of run {parent[:8]} (exp-lr3)" in result.stderr
    assert (tmp_path / "dream" / "dream.mp4").stat().st_size > 0
    fetched = tmp_path / "cache" / "tinyworlds" / "mlflow-models" / parent
    for kind in WORLD_KINDS:
        assert (
            weights_sha256(fetched / kind)
            == weights_sha256(models["exp-lr3"] / kind)
            != weights_sha256(models["exp-lr1"] / kind)
        )
