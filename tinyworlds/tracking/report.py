"""`tinyworlds runs`: the latest runs as a table, or two runs side by side."""

from __future__ import annotations

import datetime
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from tinyworlds.core.errors import ParameterError, TinyWorldsError
from tinyworlds.tracking.naming import is_headline
from tinyworlds.tracking.store import find_run, open_for_reading, store_errors
from tinyworlds.tracking.tags import (
    COMMIT_TAG,
    DATASETS_TAG,
    FINAL_METRICS_TAG,
    PIPELINE_NAME_TAG,
    PIPELINE_TAG,
    STAGE_TAG,
)
from tinyworlds.tracking.ui import ui_command, view_link

KEY_PARAMS_SHOWN = 6
FINAL_METRICS_SHOWN = 8


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

    client, experiment_id, name, uri = open_for_reading(experiment)
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
    metric_names = sorted(set().union(*finals), key=lambda n: (not is_headline(n), n))  # headline first
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
            tags.get(PIPELINE_NAME_TAG) or tags.get(PIPELINE_TAG, "-")[:16],
            *(_fmt(run_params.get(k)) for k in key_params[:KEY_PARAMS_SHOWN]),
            *(_fmt(run_finals.get(m)) for m in metric_names[:FINAL_METRICS_SHOWN]),
        )
    console = _console()
    console.print(table)
    hidden = len(key_params) - KEY_PARAMS_SHOWN
    if hidden > 0:
        console.print(f"{hidden} more params differ between these runs; compare two with --diff RUN --diff RUN")
    serve = ui_command(uri)
    console.print(f"in the MLflow UI{f' (serve it: {serve})' if serve else ''}: {view_link(uri, experiment_id)}")


def _print_diff(refs: list[str], experiment: str | None) -> None:
    from rich.table import Table

    if len(refs) != 2:
        raise ParameterError("diff", f"takes exactly two run ids (--diff A --diff B), got {len(refs)}")
    store = open_for_reading(experiment)
    a, b = (find_run(store, ref) for ref in refs)

    table = Table(title=f"{_short(a.info.run_id)} vs {_short(b.info.run_id)}")
    table.add_column("", no_wrap=True)
    table.add_column(a.info.run_id, max_width=60, overflow="fold")
    table.add_column(b.info.run_id, max_width=60, overflow="fold")
    for label, get in (
        ("stage", lambda r: r.data.tags.get(STAGE_TAG, "-")),
        ("started", _started),
        ("status", lambda r: r.info.status),
        ("datasets", lambda r: r.data.tags.get(DATASETS_TAG) or "-"),
        ("pipeline", lambda r: r.data.tags.get(PIPELINE_NAME_TAG) or r.data.tags.get(PIPELINE_TAG, "-")),
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
