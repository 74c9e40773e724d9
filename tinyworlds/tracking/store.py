"""Where runs go: the project root (never a `dvc exp` temporary copy), the tracking URI, and
MLflow access that fails within seconds, with one line, when the store is unusable."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from tinyworlds.core.errors import TinyWorldsError

DEFAULT_EXPERIMENT = "tinyworlds"
CHECK_TIMEOUT_S = 5


def _outside_exp_copy(path: Path) -> Path:
    """`<root>/.dvc/tmp/exps/tmpXYZ/...` -> `<root>`; any other path unchanged."""
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return path


def workspace_root() -> Path | None:
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
    workspace = workspace_root()
    if workspace is not None:
        return _outside_exp_copy(workspace)
    return Path.cwd().resolve()


def tracking_settings() -> tuple[str | None, str]:
    """(`tracking.uri`, `tracking.experiment`) from the workspace's params.yaml, with defaults.

    Read from the workspace actually running (an experiment copy has its own `-S` params).
    """
    import yaml

    path = (workspace_root() or Path.cwd()) / "params.yaml"
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


def sqlite_path(uri: str) -> Path | None:
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
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():
        _, question, query = uri.partition("?")
        return f"sqlite:///{(root / db).as_posix()}{question}{query}"
    return uri


# ---------------------------------------------------------------------------------------------
# MLflow access, quietly


def client_for(uri: str):
    """An MlflowClient for `uri`, with MLflow's INFO chatter (table creation, ...) muted."""
    import mlflow

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return mlflow.MlflowClient(tracking_uri=uri)


def short_reason(err: BaseException) -> str:
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
def store_errors(uri: str, doing: str) -> Iterator[None]:
    """Turn a store failure into a one-line TinyWorldsError naming the store."""
    try:
        yield
    except TinyWorldsError:
        raise
    except Exception as err:
        raise TinyWorldsError(f"MLflow store {uri}: {doing} failed ({short_reason(err)})") from err


@contextlib.contextmanager
def mlflow_settings(**settings: str) -> Iterator[None]:
    """MLflow settings (names from mlflow.environment_variables, which MLflow reads on every
    call) in force inside the block only."""
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _quick_http(timeout_s: int):
    """No retries and a short timeout for MLflow's HTTP requests while inside the block. The
    defaults (5 retries with backoff, 120 s timeout) stay in force for the training itself."""
    return mlflow_settings(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout_s))


def check_tracking(uri: str, timeout_s: int = CHECK_TIMEOUT_S, for_writing: bool = True) -> None:
    """Fail within seconds, with a one-line error, if the store cannot be reached or written.

    Called before any training so that a wrong URI or a stopped server costs seconds, not
    the hour of training whose results would have nowhere to go.
    """
    from tinyworlds.core.atomic import ensure_parent_writable

    db = sqlite_path(uri)
    if db is not None and for_writing:
        try:
            ensure_parent_writable(db)
        except TinyWorldsError as err:
            raise TinyWorldsError(f"MLflow store {uri}: not writable ({err})") from None
        if db.exists() and not (db.is_file() and os.access(db, os.R_OK | os.W_OK)):
            raise TinyWorldsError(f"MLflow store {uri}: {db} is not a writable file")
    try:
        with _quick_http(timeout_s):
            client_for(uri).search_experiments(max_results=1)
    except Exception as err:
        problem = "unreachable" if uri.startswith(("http://", "https://")) else "cannot be opened"
        raise TinyWorldsError(f"MLflow store {uri}: {problem} ({short_reason(err)})") from None


def experiment_id_for(client, name: str, uri: str) -> str:
    """The id of experiment `name`, created if missing (artifacts in the project for SQLite)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if sqlite_path(uri) is not None:
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
# reading: `tinyworlds runs`, `play --run`, `dream --run`


class ReadableStore(NamedTuple):
    client: Any  # MlflowClient
    experiment_id: str
    experiment: str
    uri: str


def open_for_reading(experiment: str | None = None) -> ReadableStore:
    """The store and experiment of params.yaml (or `MLFLOW_TRACKING_URI`), checked, for reading;
    a one-line error if there is none. Looking never creates a store."""
    uri_setting, default_experiment = tracking_settings()
    name = experiment or default_experiment
    uri = resolve_tracking_uri(uri_setting)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        raise TinyWorldsError(f"no MLflow runs yet: {db} does not exist (run a pipeline stage first)")
    check_tracking(uri, for_writing=False)
    client = client_for(uri)
    with store_errors(uri, "reading experiments"):
        found = client.get_experiment_by_name(name)
    if found is None:
        raise TinyWorldsError(f"no MLflow experiment {name!r} in {uri}")
    return ReadableStore(client, found.experiment_id, name, uri)


def find_run(store: ReadableStore, run_ref: str):
    """A run by full id (any experiment) or by a prefix unique in the store's experiment."""
    from mlflow.exceptions import MlflowException

    ref = run_ref.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{1,32}", ref):
        raise TinyWorldsError(f"run {run_ref!r}: not an MLflow run id (hex digits)")
    with store_errors(store.uri, f"reading run {run_ref}"):
        if len(ref) == 32:
            try:
                return store.client.get_run(ref)
            except MlflowException:
                raise TinyWorldsError(f"run {run_ref!r}: no such MLflow run in {store.uri}") from None
        found = store.client.search_runs([store.experiment_id], filter_string=f"attributes.run_id LIKE '{ref}%'",
                                         max_results=2)
    if not found:
        raise TinyWorldsError(f"run {run_ref!r}: no run with this id in experiment {store.experiment!r}")
    if len(found) > 1:
        raise TinyWorldsError(f"run {run_ref!r}: more than one run starts with this; give more of the id")
    return found[0]
