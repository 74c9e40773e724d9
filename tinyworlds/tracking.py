"""MLflow tracking for pipeline stages: one MLflow run per DVC stage execution.

Where runs go: `MLFLOW_TRACKING_URI` if set, else `tracking.uri` from params.yaml, else an
embedded SQLite store `<project root>/mlflow.db` with artifacts in `<project root>/mlartifacts`.
The project root is the DVC repository root. `dvc exp run --temp` and queued experiments run
in throwaway copies under `<root>/.dvc/tmp/exps/`; a store there would be deleted with the copy,
so the root always resolves to the original project (DVC also exports it as `DVC_ROOT`).

What a stage run records (see `StageRun`): the flattened config as params (and in full as
the artifact resolved_config.json), step metrics, final (summary) metrics under their own
names, artifacts, and these tags:
    tinyworlds.stage           the stage name
    tinyworlds.datasets        comma-separated dataset names
    tinyworlds.git_commit      commit of the code (also mlflow.source.git.commit)
    tinyworlds.pipeline_run    one id per `dvc repro` / `dvc exp run` invocation
    tinyworlds.dvc_experiment  DVC experiment name, under `dvc exp run`
    tinyworlds.final_metrics   which metrics are the final ones (what `tinyworlds runs` shows)
The stages of one pipeline run are children of one parent run (tagged tinyworlds.parent),
so the MLflow UI shows them grouped.

mlflow is imported inside functions: importing it takes about a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tinyworlds.errors import TinyWorldsError

DEFAULT_EXPERIMENT = "tinyworlds"

STAGE_TAG = "tinyworlds.stage"
DATASETS_TAG = "tinyworlds.datasets"
COMMIT_TAG = "tinyworlds.git_commit"
PIPELINE_TAG = "tinyworlds.pipeline_run"
DVC_EXPERIMENT_TAG = "tinyworlds.dvc_experiment"
DVC_STAGE_TAG = "tinyworlds.dvc_stage"
PARENT_TAG = "tinyworlds.parent"
FINAL_METRICS_TAG = "tinyworlds.final_metrics"
ERROR_TAG = "tinyworlds.error"

# MLflow 3 accepts 6000-character param values, older servers 500. The full config is also
# logged as resolved_config.json, so a cut value loses nothing.
PARAM_VALUE_LIMIT = 500
KEY_LIMIT = 250
PARAMS_PER_BATCH = 100  # MLflow's per-request limits
METRICS_PER_BATCH = 1000
CHECK_TIMEOUT_S = 5

_log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Where: project root and tracking store


def _outside_exp_copy(path: Path) -> Path:
    """`<root>/.dvc/tmp/exps/tmpXYZ/...` -> `<root>`; any other path unchanged."""
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return path


def _workspace_root() -> Path | None:
    """The nearest directory at or above cwd holding `.dvc/` (an experiment copy counts)."""
    here = Path.cwd().resolve()
    for directory in (here, *here.parents):
        if (directory / ".dvc").is_dir():
            return directory
    return None


def project_root() -> Path:
    """The DVC repository root, never a `dvc exp` temporary copy of it; cwd outside a repo.

    DVC sets `DVC_ROOT` for every stage command; for `--temp` and queued experiments it
    points at the original repository, not the copy (dvc/repo/experiments/queue/base.py).
    """
    env_root = os.environ.get("DVC_ROOT")
    if env_root and (Path(env_root) / ".dvc").is_dir():
        return _outside_exp_copy(Path(env_root).resolve())
    workspace = _workspace_root()
    if workspace is not None:
        return _outside_exp_copy(workspace)
    return Path.cwd().resolve()


def tracking_settings() -> tuple[str | None, str]:
    """(`tracking.uri`, `tracking.experiment`) from the workspace's params.yaml, with defaults.

    Read from the workspace actually running (an experiment copy has its own `-S` params).
    """
    import yaml

    path = (_workspace_root() or Path.cwd()) / "params.yaml"
    if not path.is_file():
        return None, DEFAULT_EXPERIMENT
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TinyWorldsError(f"{path}: cannot read the tracking settings ({reason})") from None
    section = params.get("tracking") if isinstance(params, dict) else None
    if section is None:
        return None, DEFAULT_EXPERIMENT
    if not isinstance(section, dict):
        raise TinyWorldsError(f"{path}: `tracking` must be a mapping with `uri` and `experiment`")
    uri = section.get("uri")
    experiment = section.get("experiment") or DEFAULT_EXPERIMENT
    if uri is not None and not isinstance(uri, str):
        raise TinyWorldsError(f"{path}: tracking.uri must be a string or null, got {uri!r}")
    if not isinstance(experiment, str):
        raise TinyWorldsError(f"{path}: tracking.experiment must be a string, got {experiment!r}")
    return uri, experiment


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for other stores and in-memory ones)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return Path(path)


def resolve_tracking_uri(setting: str | None = None) -> str:
    """The tracking store: `MLFLOW_TRACKING_URI`, else `setting`, else `<root>/mlflow.db`.

    A relative SQLite path is taken relative to the project root rather than the cwd, which
    under `dvc exp run --temp` is a copy that is deleted afterwards.
    """
    uri = (os.environ.get("MLFLOW_TRACKING_URI") or setting or "").strip()
    root = project_root()
    if not uri:
        return f"sqlite:///{(root / 'mlflow.db').as_posix()}"
    db = _sqlite_path(uri)
    if db is not None and not db.is_absolute():
        _, question, query = uri.partition("?")
        return f"sqlite:///{(root / db).as_posix()}{question}{query}"
    return uri


# ---------------------------------------------------------------------------------------------
# MLflow access, quietly


def _client(uri: str):
    """An MlflowClient for `uri`, with MLflow's INFO chatter (table creation, ...) muted."""
    import mlflow

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return mlflow.MlflowClient(tracking_uri=uri)


def _reason(err: BaseException) -> str:
    """One short line saying why a store operation failed."""
    text = str(err).strip()
    if "timed out" in text.lower() or "timeout" in type(err).__name__.lower():
        return "timed out"
    errno = re.search(r"\[Errno -?\d+\] [^'\")\]\n]+", text)
    if errno:
        return errno.group(0).strip()
    if not text:
        return type(err).__name__
    first = text.splitlines()[0].split(". ")[0]
    return first if len(first) <= 200 else first[:197] + "..."


@contextlib.contextmanager
def _store_errors(uri: str, doing: str) -> Iterator[None]:
    """Turn a store failure into a one-line TinyWorldsError naming the store."""
    try:
        yield
    except TinyWorldsError:
        raise
    except Exception as err:
        raise TinyWorldsError(f"MLflow store {uri}: {doing} failed ({_reason(err)})") from err


@contextlib.contextmanager
def _quick_http(timeout_s: int) -> Iterator[None]:
    """No retries and a short timeout for MLflow's HTTP requests while inside the block.

    Names from mlflow.environment_variables; MLflow reads them on every request. The
    defaults (5 retries with backoff, 120 s timeout) stay in force for the training itself.
    """
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    saved = {name: os.environ.get(name) for name in quick}
    os.environ.update(quick)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check_tracking(uri: str, timeout_s: int = CHECK_TIMEOUT_S, for_writing: bool = True) -> None:
    """Fail within seconds, with a one-line error, if the store cannot be reached or written.

    Called before any training so that a wrong URI or a stopped server costs seconds, not
    the hour of training whose results would have nowhere to go.
    """
    from tinyworlds.atomic import ensure_parent_writable

    db = _sqlite_path(uri)
    if db is not None and for_writing:
        try:
            ensure_parent_writable(db)
        except TinyWorldsError as err:
            raise TinyWorldsError(f"MLflow store {uri}: not writable ({err})") from None
        if db.exists() and not (db.is_file() and os.access(db, os.R_OK | os.W_OK)):
            raise TinyWorldsError(f"MLflow store {uri}: {db} is not a writable file")
    try:
        with _quick_http(timeout_s):
            _client(uri).search_experiments(max_results=1)
    except Exception as err:
        problem = "unreachable" if uri.startswith(("http://", "https://")) else "cannot be opened"
        raise TinyWorldsError(f"MLflow store {uri}: {problem} ({_reason(err)})") from None


def _experiment_id(client, name: str, uri: str) -> str:
    """The id of experiment `name`, created if missing (artifacts in the project for SQLite)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if _sqlite_path(uri) is not None:
            # MLflow's default is ./mlruns under the cwd, which may be a temporary copy.
            location = (project_root() / "mlartifacts").as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # created meanwhile by another run
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise TinyWorldsError(
            f"MLflow experiment {name!r} in {uri} is deleted: restore it with "
            f"`mlflow experiments restore --experiment-id {experiment.experiment_id}` "
            f"or set tracking.experiment to another name"
        )
    return experiment.experiment_id


# ---------------------------------------------------------------------------------------------
# Who: git commit and pipeline run


def git_commit(root: Path | None = None) -> str:
    """The commit the code came from: the DVC experiment's baseline, else HEAD, else "unknown".

    A queued experiment may run after HEAD has moved on, so DVC's `DVC_EXP_BASELINE_REV`
    (the commit the experiment derives from) is preferred when set.
    """
    baseline = os.environ.get("DVC_EXP_BASELINE_REV")
    if baseline:
        return baseline
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root or project_root(),
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else "unknown"


def _is_dvc_pipeline(cmdline: Sequence[str]) -> bool:
    """Whether a process command line is `dvc repro ...` or `dvc exp ...` (any launcher)."""
    for i, arg in enumerate(cmdline):
        is_dvc = Path(arg).name in ("dvc", "dvc.exe") or (arg == "dvc" and i > 0 and cmdline[i - 1] == "-m")
        if is_dvc:
            return any(sub in ("repro", "exp", "experiments") for sub in cmdline[i + 1 :])
    return False


def _dvc_ancestor_id() -> str | None:
    """`<pid>-<start time>` of the nearest `dvc repro`/`dvc exp` process above this one."""
    import psutil

    try:
        ancestors = psutil.Process().parents()
    except psutil.Error:
        return None
    for process in ancestors:
        try:
            if _is_dvc_pipeline(process.cmdline()):
                return f"{process.pid}-{int(process.create_time())}"
        except psutil.Error:  # gone, a zombie, or not ours to read
            continue
    return None


def _pipeline_run() -> tuple[str, bool]:
    """(pipeline run id, whether this stage is part of a pipeline rather than standalone).

    DVC gives its stages no shared invocation id, so one is derived: the
    TINYWORLDS_PIPELINE_RUN env var, else the `dvc` process running the stages (a pid is
    reused only after the process dies, and its start time tells the reuses apart).
    """
    given = os.environ.get("TINYWORLDS_PIPELINE_RUN", "").strip()
    if given:
        if not re.fullmatch(r"[\w.:-]+", given):
            raise TinyWorldsError(
                f"TINYWORLDS_PIPELINE_RUN={given!r}: use only letters, digits and . _ : -"
            )
        return given, True
    from_dvc = _dvc_ancestor_id()
    if from_dvc is not None:
        return from_dvc, True
    return uuid.uuid4().hex, False


def pipeline_run_id() -> str:
    """The id shared by every stage of one `dvc repro` / `dvc exp run`; a fresh one standalone."""
    return _pipeline_run()[0]


# ---------------------------------------------------------------------------------------------
# What: params from the config


def _clean_key(key: str) -> str:
    """A name MLflow accepts: letters, digits, `_ - . / : space`, at most 250 characters."""
    return re.sub(r"[^\w\-./: ]", "_", key)[:KEY_LIMIT]


def _plain(config: Any) -> Any:
    """A dataclass config as a dict; anything else unchanged."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return config


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"model.lr": "0.001", ...}; values as strings, cut to the param limit."""
    flat: dict[str, str] = {}
    for key, value in _plain(config).items():
        name = f"{prefix}{key}"
        value = _plain(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=f"{name}."))
            continue
        if isinstance(value, (list, tuple, dict)):
            text = json.dumps(value, default=str, separators=(",", ":"))
        else:
            text = str(value)
        if len(text) > PARAM_VALUE_LIMIT:
            text = text[: PARAM_VALUE_LIMIT - 3] + "..."
        flat[_clean_key(name)] = text
    return flat


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---------------------------------------------------------------------------------------------
# The stage run


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

    On entry it checks the store (a one-line TinyWorldsError within seconds if unusable),
    creates the run under its pipeline's parent run, and logs the flattened config as params
    and in full as resolved_config.json. On exit the run ends FINISHED, FAILED (the exception still
    propagates) or KILLED (KeyboardInterrupt). `experiment` and `tracking_uri` default to
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
        self.config = _plain(config)
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

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> StageRun:
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_SOURCE_NAME

        params = [Param(k, v) for k, v in flatten_config(self.config).items()]
        config_json = json.loads(json.dumps(self.config, default=str))
        uri_setting, experiment = tracking_settings()
        experiment = self._experiment or experiment
        uri = self.tracking_uri = resolve_tracking_uri(self._uri_setting or uri_setting)
        check_tracking(uri)
        self.pipeline_run, in_pipeline = _pipeline_run()
        client = self._client = _client(uri)
        commit = git_commit()
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
        with _store_errors(uri, "starting the run"):
            experiment_id = _experiment_id(client, experiment, uri)
            if in_pipeline:
                self._parent_id = self._pipeline_parent(experiment_id, commit)
                tags[MLFLOW_PARENT_RUN_ID] = self._parent_id
            self._run = client.create_run(experiment_id, run_name=self.stage, tags=tags)
        try:
            with _store_errors(uri, "logging the config"):
                for chunk in _chunks(params, PARAMS_PER_BATCH):
                    client.log_batch(self.run_id, params=chunk)
                client.log_dict(self.run_id, config_json, "resolved_config.json")
        except BaseException as err:
            self.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    def _pipeline_parent(self, experiment_id: str, commit: str) -> str:
        """The parent run of this pipeline run, created by its first stage; marked RUNNING."""
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
            return parent.info.run_id
        dvc_experiment = os.environ.get("DVC_EXP_NAME")
        tags = {PARENT_TAG: "true", PIPELINE_TAG: self.pipeline_run, COMMIT_TAG: commit}
        if dvc_experiment:
            tags[DVC_EXPERIMENT_TAG] = dvc_experiment
        name = dvc_experiment or f"pipeline {self.pipeline_run}"
        return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._run is None:
            return False
        status = _end_status(exc_type, exc)
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
                    f"MLflow store {self.tracking_uri}: ending run {self.run_id} failed ({_reason(err)})"
                ) from None
            # The stage's own exception is the one to see; this only comes with it.
            _log.warning(
                "MLflow store %s: could not mark run %s %s (%s)", self.tracking_uri, self.run_id, status, _reason(err)
            )
        if self._failed_metric_batches:
            _log.warning(
                "MLflow run %s: %d metric batches could not be logged", self.run_id, self._failed_metric_batches
            )
        return False

    # -- identity ----------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        if self._run is None:
            raise RuntimeError("StageRun is not started: use it in a `with` block")
        return self._run.info.run_id

    @property
    def artifact_uri(self) -> str:
        if self._run is None:
            raise RuntimeError("StageRun is not started: use it in a `with` block")
        return self._run.info.artifact_uri

    # -- logging -----------------------------------------------------------------------------

    def _metrics(self, metrics: Mapping[str, float], step: int) -> list:
        from mlflow.entities import Metric

        timestamp = _now_ms()
        return [Metric(_clean_key(k), float(v), timestamp, int(step)) for k, v in metrics.items()]

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log step metrics in one request (a few ms on SQLite); call it every N steps.

        A store hiccup mid-training is reported as a warning and training goes on: losing a
        few points of a loss curve is better than losing the run.
        """
        step = int(step or 0)
        self._last_step = max(self._last_step, step)
        batch = self._metrics(metrics, step)
        try:
            for chunk in _chunks(batch, METRICS_PER_BATCH):
                self._client.log_batch(self.run_id, metrics=chunk)
        except Exception as err:
            self._failed_metric_batches += 1
            if self._failed_metric_batches == 1:
                _log.warning(
                    "MLflow store %s: could not log metrics at step %s (%s); training continues",
                    self.tracking_uri, step, _reason(err),
                )

    def log_final(self, metrics: Mapping[str, float]) -> None:
        """Log summary metrics (what `tinyworlds runs` shows), named as in the metrics JSON.

        They are logged at the last step seen, so where a step metric has the same name
        (val_loss) the final value is also the run's latest value of it in MLflow.
        """
        from mlflow.entities import RunTag

        batch = self._metrics(metrics, self._last_step)
        self._final_names.update(m.key for m in batch)
        with _store_errors(self.tracking_uri, "logging final metrics"):
            for chunk in _chunks(batch, METRICS_PER_BATCH):
                self._client.log_batch(self.run_id, metrics=chunk)
            names = RunTag(FINAL_METRICS_TAG, ",".join(sorted(self._final_names)))
            self._client.log_batch(self.run_id, tags=[names])

    def log_image(self, image, artifact_file: str) -> None:
        """Save an image (uint8 HWC or HW array, or PIL image) as an artifact, e.g. "recon/step_100.png"."""
        with _store_errors(self.tracking_uri, f"logging image {artifact_file}"):
            self._client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a local file or directory into the run's artifacts (under `artifact_path`)."""
        path = Path(path)
        if not path.exists():
            raise TinyWorldsError(f"{path}: no such file to log as an MLflow artifact")
        with _store_errors(self.tracking_uri, f"logging artifact {path}"):
            if path.is_dir():
                self._client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        """Save a dict as a JSON (or YAML, by suffix) artifact."""
        with _store_errors(self.tracking_uri, f"logging {artifact_file}"):
            self._client.log_dict(self.run_id, dict(dictionary), artifact_file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(_clean_key(k), str(v)) for k, v in tags.items()]
        with _store_errors(self.tracking_uri, "setting tags"):
            for chunk in _chunks(batch, PARAMS_PER_BATCH):
                self._client.log_batch(self.run_id, tags=chunk)


# ---------------------------------------------------------------------------------------------
# Reading runs back: `tinyworlds runs`

KEY_PARAMS_SHOWN = 6
FINAL_METRICS_SHOWN = 8


def _open_store(experiment: str | None):
    """(client, experiment id, experiment name, uri) for reading, or a one-line error."""
    uri_setting, default_experiment = tracking_settings()
    name = experiment or default_experiment
    uri = resolve_tracking_uri(uri_setting)
    db = _sqlite_path(uri)
    if db is not None and not db.exists():
        raise TinyWorldsError(f"no MLflow runs yet: {db} does not exist (run a pipeline stage first)")
    check_tracking(uri, for_writing=False)
    client = _client(uri)
    with _store_errors(uri, "reading experiments"):
        found = client.get_experiment_by_name(name)
    if found is None:
        raise TinyWorldsError(f"no MLflow experiment {name!r} in {uri}")
    return client, found.experiment_id, name, uri


def _short(run_id: str) -> str:
    return run_id[:8]


def _started(run) -> str:
    return datetime.datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _finals(run) -> dict[str, float]:
    names = [n for n in run.data.tags.get(FINAL_METRICS_TAG, "").split(",") if n]
    return {n: run.data.metrics[n] for n in names if n in run.data.metrics}


def _fmt(value: float | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _differing(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys whose value (missing counts as a value) is not the same in every row."""
    keys = sorted(set().union(*rows)) if rows else []
    return [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]


def _console():
    from rich.console import Console

    # Piped output is not cut to 80 columns: a truncated run id or value is useless.
    return Console(width=None if sys.stdout.isatty() else 1000, highlight=False)


def _resolve_run(client, experiment_id: str, experiment: str, run_ref: str):
    """A run by full id (any experiment) or by a prefix unique in `experiment`."""
    from mlflow.exceptions import MlflowException

    ref = run_ref.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{1,32}", ref):
        raise TinyWorldsError(f"run {run_ref!r}: not an MLflow run id (hex digits)")
    if len(ref) == 32:
        try:
            return client.get_run(ref)
        except MlflowException:
            raise TinyWorldsError(f"run {run_ref!r}: no such MLflow run") from None
    found = client.search_runs([experiment_id], filter_string=f"attributes.run_id LIKE '{ref}%'", max_results=2)
    if not found:
        raise TinyWorldsError(f"run {run_ref!r}: no run with this id in experiment {experiment!r}")
    if len(found) > 1:
        raise TinyWorldsError(f"run {run_ref!r}: more than one run starts with this; give more of the id")
    return found[0]


def print_runs(
    stage: str | None = None,
    limit: int = 10,
    diff: Sequence[str] | None = None,
    experiment: str | None = None,
) -> None:
    """Print the latest runs (newest first) as a table, or two runs side by side with `diff`."""
    if diff:
        _print_diff(list(diff), experiment)
        return
    if limit < 1:
        raise TinyWorldsError(f"--limit {limit}: must be at least 1")
    if stage and not re.fullmatch(r"[\w.:@/-]+", stage):
        raise TinyWorldsError(f"--stage {stage!r}: not a stage name")
    from rich.table import Table

    client, experiment_id, name, uri = _open_store(experiment)
    where = f"tags.`{STAGE_TAG}` = '{stage}'" if stage else f"tags.`{STAGE_TAG}` LIKE '%'"
    with _store_errors(uri, "searching runs"):
        runs = client.search_runs(
            [experiment_id], filter_string=where, max_results=limit, order_by=["attributes.start_time DESC"]
        )
    if not runs:
        of = f" of stage {stage!r}" if stage else ""
        raise TinyWorldsError(f"no runs{of} in MLflow experiment {name!r} ({uri})")

    params = [run.data.params for run in runs]
    finals = [_finals(run) for run in runs]
    key_params = _differing(params)
    metric_names = sorted(set().union(*finals))
    table = Table(title=f"{name}: {len(runs)} latest runs" + (f" of {stage}" if stage else ""))
    table.add_column("run", no_wrap=True)
    for column in ("stage", "started", "status", "datasets", "pipeline"):
        table.add_column(column, no_wrap=True)
    for key in key_params[:KEY_PARAMS_SHOWN]:
        table.add_column(key, style="cyan", max_width=30, overflow="ellipsis", no_wrap=True)
    for metric in metric_names[:FINAL_METRICS_SHOWN]:
        table.add_column(metric, style="green", justify="right")
    for run, run_params, run_finals in zip(runs, params, finals):
        tags = run.data.tags
        table.add_row(
            _short(run.info.run_id),
            tags.get(STAGE_TAG, "-"),
            _started(run),
            run.info.status,
            tags.get(DATASETS_TAG) or "-",
            tags.get(PIPELINE_TAG, "-")[:16],
            *(_fmt(run_params.get(k)) for k in key_params[:KEY_PARAMS_SHOWN]),
            *(_fmt(run_finals.get(m)) for m in metric_names[:FINAL_METRICS_SHOWN]),
        )
    console = _console()
    console.print(table)
    hidden = len(key_params) - KEY_PARAMS_SHOWN
    if hidden > 0:
        console.print(f"{hidden} more params differ between these runs; compare two with --diff RUN --diff RUN")


def _print_diff(refs: list[str], experiment: str | None) -> None:
    from rich.table import Table

    if len(refs) != 2:
        raise TinyWorldsError(f"--diff takes exactly two run ids (--diff A --diff B), got {len(refs)}")
    client, experiment_id, name, uri = _open_store(experiment)
    with _store_errors(uri, "reading runs"):
        a, b = (_resolve_run(client, experiment_id, name, ref) for ref in refs)

    table = Table(title=f"{_short(a.info.run_id)} vs {_short(b.info.run_id)}")
    table.add_column("", no_wrap=True)
    table.add_column(a.info.run_id, max_width=60, overflow="fold")
    table.add_column(b.info.run_id, max_width=60, overflow="fold")
    for label, get in (
        ("stage", lambda r: r.data.tags.get(STAGE_TAG, "-")),
        ("started", _started),
        ("status", lambda r: r.info.status),
        ("datasets", lambda r: r.data.tags.get(DATASETS_TAG) or "-"),
        ("pipeline", lambda r: r.data.tags.get(PIPELINE_TAG, "-")),
        ("commit", lambda r: r.data.tags.get(COMMIT_TAG, "-")[:12]),
    ):
        table.add_row(label, get(a), get(b), style="dim")

    params = [a.data.params, b.data.params]
    finals = [_finals(a), _finals(b)]
    changed_params = _differing(params)
    changed_metrics = _differing(finals)
    if changed_params or changed_metrics:
        table.add_section()
    for key in changed_params:
        table.add_row(key, _fmt(params[0].get(key)), _fmt(params[1].get(key)), style="cyan")
    for metric in changed_metrics:
        table.add_row(
            metric, _fmt(finals[0].get(metric)), _fmt(finals[1].get(metric)), style="green"
        )
    same_params = len(set(params[0]) | set(params[1])) - len(changed_params)
    same_metrics = len(set(finals[0]) | set(finals[1])) - len(changed_metrics)
    console = _console()
    console.print(table)
    console.print(f"{same_params} params and {same_metrics} final metrics are the same")
