"""The MLflow run of one stage execution (`StageRun`), grouped under its pipeline run's parent."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.tracking.flatten import (
    PARAM_VALUE_LIMIT,
    chunks,
    clean_key,
    flatten_config,
    plain,
)
from tinyworlds.tracking.lineage import git_commit, pipeline_run
from tinyworlds.tracking.models import check_model_dir, upload_model
from tinyworlds.tracking.naming import metric_name, pipeline_label, stage_run_name
from tinyworlds.tracking.store import (
    check_tracking,
    client_for,
    experiment_id_for,
    resolve_tracking_uri,
    short_reason,
    store_errors,
    tracking_settings,
)
from tinyworlds.tracking.tags import (
    COMMIT_TAG,
    DATASETS_TAG,
    DVC_EXPERIMENT_TAG,
    DVC_STAGE_TAG,
    ERROR_TAG,
    FINAL_METRICS_TAG,
    PARENT_TAG,
    PIPELINE_NAME_TAG,
    PIPELINE_TAG,
    STAGE_TAG,
)
from tinyworlds.tracking.ui import set_up_experiment

PARAMS_PER_BATCH = 100  # MLflow's per-request limits
METRICS_PER_BATCH = 1000

_log = logging.getLogger(__name__)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _end_status(exc_type: type[BaseException] | None, exc: BaseException | None) -> str:
    if exc_type is None:
        return "FINISHED"
    if issubclass(exc_type, KeyboardInterrupt):
        return "KILLED"
    if issubclass(exc_type, SystemExit) and exc is not None and exc.code in (None, 0):
        return "FINISHED"
    return "FAILED"


class StageRun:
    """One MLflow run for one execution of a pipeline stage; use as a context manager.

        with StageRun("train_tokenizer", config, datasets=["pong"]) as run:
            run.log_metrics({"loss": loss, "lr": lr}, step=step)  # every N steps
            run.log_final({"val_loss": val_loss})
            run.attach_model("data/models/tokenizer")  # uploaded when the run ends well

    On entry it checks the store (a one-line TinyWorldsError within seconds if unusable),
    creates the run under its pipeline's parent run, named `stage · datasets · experiment`
    (`naming`), sets up the experiment's UI views (`ui`), and logs the flattened config as
    params and in full as resolved_config.json. Metric names go through `naming.metric_name`:
    headline figures at the top level, detail under a section prefix. On exit the attached
    models are uploaded and the run ends FINISHED, FAILED (the exception still propagates) or
    KILLED (KeyboardInterrupt). `experiment` and `tracking_uri` default to
    params.yaml's `tracking` section; `MLFLOW_TRACKING_URI` overrides both.
    """

    def __init__(
        self,
        stage: str,
        config: Mapping[str, Any] | Any,
        datasets: Sequence[str] = (),
        experiment: str | None = None,
        tracking_uri: str | None = None,
    ) -> None:
        self.stage = stage
        self.config = plain(config)
        self.datasets = [datasets] if isinstance(datasets, str) else list(datasets)
        self._experiment = experiment
        self._uri_setting = tracking_uri
        self.tracking_uri: str | None = None
        self.pipeline_run: str | None = None
        self._client = None
        self._run = None
        self._parent_id: str | None = None
        self._failed_metric_batches = 0
        self._last_step = 0
        self._final_names: set[str] = set()
        self._models: list[Path] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> StageRun:
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import (
            MLFLOW_GIT_COMMIT,
            MLFLOW_PARENT_RUN_ID,
            MLFLOW_SOURCE_NAME,
        )

        params = [Param(k, v) for k, v in flatten_config(self.config).items()]
        config_json = json.loads(json.dumps(self.config, default=str))
        uri_setting, experiment = tracking_settings()
        experiment = self._experiment or experiment
        uri = self.tracking_uri = resolve_tracking_uri(self._uri_setting or uri_setting)
        check_tracking(uri)
        self.pipeline_run, in_pipeline = pipeline_run()
        client = self._client = client_for(uri)
        commit = git_commit()
        dvc_experiment = os.environ.get("DVC_EXP_NAME") or None
        tags = {
            STAGE_TAG: self.stage,
            DATASETS_TAG: ",".join(self.datasets),
            COMMIT_TAG: commit,
            MLFLOW_GIT_COMMIT: commit,
            PIPELINE_TAG: self.pipeline_run,
            MLFLOW_SOURCE_NAME: Path(sys.argv[0]).name if sys.argv and sys.argv[0] else self.stage,
        }
        for env_name, tag in (("DVC_EXP_NAME", DVC_EXPERIMENT_TAG), ("DVC_STAGE", DVC_STAGE_TAG)):
            if os.environ.get(env_name):
                tags[tag] = os.environ[env_name]
        with store_errors(uri, "starting the run"):
            experiment_id = experiment_id_for(client, experiment, uri)
            set_up_experiment(client, experiment_id, self.datasets, in_pipeline)
            label = pipeline_label(dvc_experiment, commit)
            if in_pipeline:
                self._parent_id, label = self._pipeline_parent(experiment_id, commit, label)
                tags[MLFLOW_PARENT_RUN_ID] = self._parent_id
            if label:
                tags[PIPELINE_NAME_TAG] = label
            name = stage_run_name(self.stage, self.datasets, dvc_experiment, commit)
            self._run = client.create_run(experiment_id, run_name=name, tags=tags)
        try:
            with store_errors(uri, "logging the config"):
                for chunk in chunks(params, PARAMS_PER_BATCH):
                    client.log_batch(self.run_id, params=chunk)
                client.log_dict(self.run_id, config_json, "resolved_config.json")
        except BaseException as err:
            self.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    def _pipeline_parent(self, experiment_id: str, commit: str, label: str | None) -> tuple[str, str]:
        """(id, name) of this pipeline run's parent run, created by its first stage and named
        `label` then; marked RUNNING."""
        client = self._client
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PIPELINE_TAG}` = '{self.pipeline_run}' AND tags.`{PARENT_TAG}` = 'true'",
            max_results=1,
        )
        if found:
            parent = found[0]
            if parent.info.status not in ("FAILED", "KILLED"):  # a failed pipeline stays failed
                client.update_run(parent.info.run_id, status="RUNNING")
            return parent.info.run_id, parent.info.run_name
        name = label or f"pipeline {self.pipeline_run}"
        tags = {PARENT_TAG: "true", PIPELINE_TAG: self.pipeline_run, PIPELINE_NAME_TAG: name, COMMIT_TAG: commit}
        if os.environ.get("DVC_EXP_NAME"):
            tags[DVC_EXPERIMENT_TAG] = os.environ["DVC_EXP_NAME"]
        return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id, name

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._run is None:
            return False
        status = _end_status(exc_type, exc)
        upload_error = None
        if status == "FINISHED" and self._models:
            try:
                with store_errors(self.tracking_uri, f"attaching the models to run {self.run_id}"):
                    for model_dir in self._models:
                        upload_model(self._client, self.run_id, model_dir)
            except TinyWorldsError as err:  # the run failed at its last step: it ends FAILED, saying why
                upload_error = exc = err
                exc_type, status = TinyWorldsError, "FAILED"
        try:
            if status != "FINISHED" and exc is not None:
                summary = (f"{exc_type.__name__}: {exc}" if str(exc) else exc_type.__name__).splitlines()[0]
                summary = summary[:PARAM_VALUE_LIMIT]
                self._client.set_tag(self.run_id, ERROR_TAG, summary)
            self._client.set_terminated(self.run_id, status)
            if self._parent_id is not None:
                parent_status = self._client.get_run(self._parent_id).info.status
                if status != "FINISHED" or parent_status not in ("FAILED", "KILLED"):
                    self._client.set_terminated(self._parent_id, status)
        except Exception as err:
            if exc_type is None:
                raise TinyWorldsError(
                    f"MLflow store {self.tracking_uri}: ending run {self.run_id} failed ({short_reason(err)})"
                ) from None
            # The stage's own exception is the one to see; this only comes with it.
            _log.warning(
                "MLflow store %s: could not mark run %s %s (%s)", self.tracking_uri, self.run_id, status, short_reason(err)
            )
        if self._failed_metric_batches:
            _log.warning(
                "MLflow run %s: %d metric batches could not be logged", self.run_id, self._failed_metric_batches
            )
        if upload_error is not None:
            raise upload_error
        return False

    # -- identity ----------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        if self._run is None:
            raise RuntimeError("StageRun is not started: use it in a `with` block")
        return self._run.info.run_id

    @property
    def parent_run_id(self) -> str | None:
        """The pipeline's parent run (None for a run outside a pipeline)."""
        return self._parent_id

    @property
    def artifact_uri(self) -> str:
        if self._run is None:
            raise RuntimeError("StageRun is not started: use it in a `with` block")
        return self._run.info.artifact_uri

    # -- logging -----------------------------------------------------------------------------

    def _metrics(self, metrics: Mapping[str, float], step: int) -> list:
        from mlflow.entities import Metric

        timestamp = _now_ms()
        return [Metric(metric_name(clean_key(k), self.stage), float(v), timestamp, int(step))
                for k, v in metrics.items()]

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log step metrics in one request (a few ms on SQLite); call it every N steps.

        A store hiccup mid-training is reported as a warning and training goes on: losing a
        few points of a loss curve is better than losing the run.
        """
        step = int(step or 0)
        self._last_step = max(self._last_step, step)
        batch = self._metrics(metrics, step)
        try:
            for chunk in chunks(batch, METRICS_PER_BATCH):
                self._client.log_batch(self.run_id, metrics=chunk)
        except Exception as err:
            self._failed_metric_batches += 1
            if self._failed_metric_batches == 1:
                _log.warning(
                    "MLflow store %s: could not log metrics at step %s (%s); training continues",
                    self.tracking_uri, step, short_reason(err),
                )

    def log_final(self, metrics: Mapping[str, float]) -> None:
        """Log summary metrics (what `tinyworlds runs` shows), named as in the metrics JSON
        (the detail under its section prefix: `pong.tokenizer.fg_psnr` -> `pong/tokenizer.fg_psnr`).

        They are logged at the last step seen, so where a step metric has the same name
        (val_loss) the final value is also the run's latest value of it in MLflow.
        """
        from mlflow.entities import RunTag

        batch = self._metrics(metrics, self._last_step)
        self._final_names.update(m.key for m in batch)
        with store_errors(self.tracking_uri, "logging final metrics"):
            for chunk in chunks(batch, METRICS_PER_BATCH):
                self._client.log_batch(self.run_id, metrics=chunk)
            names = RunTag(FINAL_METRICS_TAG, ",".join(sorted(self._final_names)))
            self._client.log_batch(self.run_id, tags=[names])

    def log_image(self, image, artifact_file: str) -> None:
        """Save an image (uint8 HWC or HW array, or PIL image) as an artifact, e.g. "recon/step_100.png"."""
        with store_errors(self.tracking_uri, f"logging image {artifact_file}"):
            self._client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a local file or directory into the run's artifacts (under `artifact_path`)."""
        path = Path(path)
        if not path.exists():
            raise TinyWorldsError(f"{path}: no such file to log as an MLflow artifact")
        with store_errors(self.tracking_uri, f"logging artifact {path}"):
            if path.is_dir():
                self._client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(self.run_id, str(path), artifact_path)

    def attach_model(self, model_dir: str | os.PathLike) -> None:
        """Attach a model directory (model.safetensors + config.json) as artifacts `models/<kind>/`,
        kind being the directory's name, tagged with its sha256 (`tracking.models`). It is
        uploaded when the run ends well, so files written beside the model later go with it."""
        self._models.append(check_model_dir(Path(model_dir)))

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        """Save a dict as a JSON (or YAML, by suffix) artifact."""
        with store_errors(self.tracking_uri, f"logging {artifact_file}"):
            self._client.log_dict(self.run_id, dict(dictionary), artifact_file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(clean_key(k), str(v)) for k, v in tags.items()]
        with store_errors(self.tracking_uri, "setting tags"):
            for chunk in chunks(batch, PARAMS_PER_BATCH):
                self._client.log_batch(self.run_id, tags=chunk)


def open_stage_run(stage: str, params: dict[str, Any], datasets: list[str], config: dict[str, Any],
                   replica: bool = False):
    """The `StageRun` of a stage, with params.yaml's `tracking` section, checked before any
    work starts; for a `replica` (a training process other than rank 0) a run that logs nothing."""
    if replica:
        return ReplicaRun()
    tracking = params.get("tracking", {}) or {}
    return StageRun(
        stage=stage,
        config=config,
        datasets=datasets,
        experiment=tracking.get("experiment") or "tinyworlds",
        tracking_uri=tracking.get("uri"),
    )


class ReplicaRun:
    """The tracking run of a rank other than 0: rank 0 logs for the whole process group."""

    def __enter__(self) -> ReplicaRun:
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_image(self, image, artifact_file: str) -> None:
        pass
