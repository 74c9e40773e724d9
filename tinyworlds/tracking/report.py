"""`tinyworlds runs`: the latest runs as a table, or two runs side by side."""

from __future__ import annotations

import datetime
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from tinyworlds.core.errors import ParameterError, TinyWorldsError
from tinyworlds.tracking.store import (
    check_tracking,
    client_for,
    resolve_tracking_uri,
    sqlite_path,
    store_errors,
    tracking_settings,
)
from tinyworlds.tracking.tags import (
    COMMIT_TAG,
    DATASETS_TAG,
    FINAL_METRICS_TAG,
    PIPELINE_TAG,
    STAGE_TAG,
)

KEY_PARAMS_SHOWN = 6
FINAL_METRICS_SHOWN = 8


def _open_store(experiment: str | None):
    """(client, experiment id, experiment name, uri) for reading, or a one-line error."""
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
        raise ParameterError("limit", "must be at least 1", limit)
    if stage and not re.fullmatch(r"[\w.:@/-]+", stage):
        raise ParameterError("stage", "not a stage name", stage)
    from rich.table import Table

    client, experiment_id, name, uri = _open_store(experiment)
    where = f"tags.`{STAGE_TAG}` = '{stage}'" if stage else f"tags.`{STAGE_TAG}` LIKE '%'"
    with store_errors(uri, "searching runs"):
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
        raise ParameterError("diff", f"takes exactly two run ids (--diff A --diff B), got {len(refs)}")
    client, experiment_id, name, uri = _open_store(experiment)
    with store_errors(uri, "reading runs"):
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
