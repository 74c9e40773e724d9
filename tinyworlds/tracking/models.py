"""The models a run trained, attached to it, and fetched back for `play --run` / `dream --run`.

A training stage attaches its model directory (model.safetensors + config.json, and what lies
beside them, e.g. the LAM's action names) as the artifacts `models/<kind>/`, copied as they
are (no pickle), and tags the run `tinyworlds.model.<kind>` with the weights' sha256: the same
digest tells which DVC-cached model is the run's (`sha256sum data/models/*/model.safetensors`).

A world model needs models of several kinds (tokenizer, lam, dynamics) that different stage
runs trained, often in different pipeline runs, since DVC reruns only what changed. So a run
names the models of its world by sha256: those it attached, evaluate's `models.<kind>` params
(the models it scored), its children's if it is a pipeline's parent run, and for a training run
alone those of the latest evaluate run that scored its model. Each is fetched from the run
that attached it, into a cache directory per run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

from tinyworlds.core.atomic import atomic_output
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.tracking.store import (
    ReadableStore,
    find_run,
    mlflow_settings,
    open_for_reading,
    sqlite_path,
    store_errors,
)
from tinyworlds.tracking.tags import MODEL_TAG_PREFIX, PARENT_TAG

WEIGHTS_FILE = "model.safetensors"
ARTIFACT_DIR = "models"
# + kind: evaluate's params name the models it scored by their sha256
SCORED_PARAM = "models."
LOCAL_ARTIFACTS = "mlartifacts"  # the project's artifact folder, beside mlflow.db


def weights_sha256(model_dir: Path) -> str:
    return hashlib.sha256((Path(model_dir) / WEIGHTS_FILE).read_bytes()).hexdigest()


def check_model_dir(model_dir: Path) -> Path:
    model_dir = Path(model_dir)
    if not (model_dir / WEIGHTS_FILE).is_file():
        raise TinyWorldsError(
            f"{model_dir}: no {WEIGHTS_FILE} to attach to the MLflow run"
        )
    return model_dir


def upload_model(client, run_id: str, model_dir: Path) -> None:
    """Copy a model directory into the run's artifacts `models/<kind>/` and tag its sha256."""
    model_dir = check_model_dir(model_dir)
    client.log_artifacts(run_id, str(model_dir), f"{ARTIFACT_DIR}/{model_dir.name}")
    client.set_tag(run_id, MODEL_TAG_PREFIX + model_dir.name, weights_sha256(model_dir))


# ---------------------------------------------------------------------------------------------
# which models a run's world is made of, and where they are


def _describe(run) -> str:
    return f"run {run.info.run_id[:8]} ({run.info.run_name})"


def _named(run, kinds: Sequence[str]) -> dict[str, str]:
    """The models a run attached or scored, by kind."""
    named = {}
    for kind in kinds:
        sha = run.data.tags.get(MODEL_TAG_PREFIX + kind) or run.data.params.get(
            SCORED_PARAM + kind
        )
        if sha:
            named[kind] = sha
    return named


def _search(
    store: ReadableStore, experiment_id: str, where: str, limit: int = 1
) -> list:
    with store_errors(store.uri, "searching runs"):
        return store.client.search_runs(
            [experiment_id],
            filter_string=where,
            max_results=limit,
            order_by=["attributes.start_time DESC"],
        )


def world_of(store: ReadableStore, run, kinds: Sequence[str]) -> dict[str, str]:
    """kind -> sha256 of every model of the run's world, or a one-line error saying what is missing."""
    experiment_id = run.info.experiment_id
    named = _named(run, kinds)
    if run.data.tags.get(PARENT_TAG) == "true":
        for child in _search(
            store,
            experiment_id,
            f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
            limit=100,
        ):
            # The newest child comes first; what is named already is kept.
            named = {**_named(child, kinds), **named}
    for kind, sha in list(named.items()):
        if len(named) == len(kinds):
            break
        for scorer in _search(
            store, experiment_id, f"params.`{SCORED_PARAM}{kind}` = '{sha}'"
        ):
            named = {**_named(scorer, kinds), **named}
    if not named:
        raise TinyWorldsError(
            f"{_describe(run)}: has no models (neither trained nor scored any); "
            "give a training, evaluate or pipeline run"
        )
    missing = [kind for kind in kinds if kind not in named]
    if missing:
        raise TinyWorldsError(
            f"{_describe(run)}: names no {' or '.join(missing)} model, and a world model needs "
            f"{', '.join(kinds)}; give its pipeline's parent run or an evaluate run"
        )
    return {kind: named[kind] for kind in kinds}


def holder_of(store: ReadableStore, run, kind: str, sha: str):
    """The run that attached model `sha` of `kind`: `run` itself or the newest other one."""
    if run.data.tags.get(MODEL_TAG_PREFIX + kind) == sha:
        return run
    found = _search(
        store, run.info.experiment_id, f"tags.`{MODEL_TAG_PREFIX}{kind}` = '{sha}'"
    )
    if not found:
        raise TinyWorldsError(
            f"{_describe(run)}: the {kind} model {sha[:12]} it names is attached to no run "
            "(trained before runs carried their models? rerun its stage)"
        )
    return found[0]


def artifact_root(store: ReadableStore, run) -> str:
    """Where the run's artifacts are. A copied SQLite store keeps the absolute paths of the clone
    it came from; its artifacts are then looked for in the `mlartifacts/` copied beside it."""
    root = run.info.artifact_uri
    db = sqlite_path(store.uri)
    parsed = urlparse(root)
    if db is None or parsed.scheme != "file":
        return root
    path = Path(unquote(parsed.path))
    if path.exists() or LOCAL_ARTIFACTS not in path.parts:
        return root
    below = path.parts[len(path.parts) - path.parts[::-1].index(LOCAL_ARTIFACTS) :]
    return (db.parent / LOCAL_ARTIFACTS).joinpath(*below).as_uri()


def cache_root() -> Path:
    """Where fetched models live: $XDG_CACHE_HOME/tinyworlds/mlflow-models (~/.cache by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tinyworlds" / "mlflow-models"


def _fetch(store: ReadableStore, holder, kind: str, sha: str, target: Path) -> None:
    """Download `models/<kind>` of `holder` to `target` (written beside it, then renamed)."""
    import mlflow.artifacts

    uri = f"{artifact_root(store, holder)}/{ARTIFACT_DIR}/{kind}"
    with atomic_output(target) as tmp:
        staging = Path(tempfile.mkdtemp(prefix=f".{kind}.download-", dir=target.parent))
        try:
            doing = f"downloading the {kind} model of {_describe(holder)}"
            # No progress bar: fetch_run_models says what it fetched.
            quiet = mlflow_settings(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
            with store_errors(store.uri, doing), quiet:
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=uri, dst_path=str(staging), tracking_uri=store.uri
                )
            os.replace(local, tmp)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if not (tmp / WEIGHTS_FILE).is_file() or weights_sha256(tmp) != sha:
            raise TinyWorldsError(
                f"{_describe(holder)}: its {kind} model does not match the sha256 {sha[:12]} "
                "it was tagged with"
            )


def fetch_run_models(
    run_ref: str,
    kinds: Sequence[str],
    cache: Path | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> Path:
    """A local directory with one folder per kind holding the models of run `run_ref`'s world,
    from the tracking store of params.yaml / `MLFLOW_TRACKING_URI`; kept in the cache."""
    store = open_for_reading()
    run = find_run(store, run_ref)
    world = world_of(store, run, kinds)
    folder = (cache or cache_root()) / run.info.run_id
    for kind, sha in world.items():
        target = folder / kind
        if (target / WEIGHTS_FILE).is_file() and weights_sha256(target) == sha:
            continue  # fetched before
        holder = holder_of(store, run, kind, sha)
        _fetch(store, holder, kind, sha, target)
    say(
        f"models of {_describe(run)}: "
        + ", ".join(f"{kind} {sha[:12]}" for kind, sha in world.items())
        + f", in {folder}"
    )
    return folder
