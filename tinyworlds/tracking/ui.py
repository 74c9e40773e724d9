"""What the MLflow UI opens on: the model-training view of the experiment, its runs grouped by
pipeline with the headline figures as columns, and a chart view that overlays loss curves.

MLflow 3.17's UI picks its GenAI or model-training view with a switch each browser remembers
(`mlflow.workflowType`), which a link overrides with `?workflowType=machine_learning`; where
that switch is off, its code goes by the experiment tag `mlflow.experimentKind`, so that is
set too. Views travel as "shared views": a JSON view state in the experiment tag
`mlflow.sharedViewState.<key>`, which a link opens with `?viewStateShareKey=<key>` (what the
UI's own Share button writes). Nothing of MLflow is patched: these are tags and URL
parameters its UI reads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from urllib.parse import quote

from tinyworlds.tracking.naming import HEADLINE_PART
from tinyworlds.tracking.tags import PIPELINE_NAME_TAG, STAGE_TAG

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
SHARED_VIEW_TAG = "mlflow.sharedViewState."
RUNS_VIEW = "tinyworlds"  # every run, grouped by pipeline, headline columns
COMPARE_VIEW = "tinyworlds-compare"  # the train_dynamics runs, loss charts overlaid
COMPARED_STAGE = "train_dynamics"
# Of evaluate's headline block, the figures worth a column: the tokenizer's object PSNR, the
# rollout's worst margin over copying the last frame, and controllability (ΔtPSNR).
HEADLINE_COLUMNS = (
    "tokenizer_fg_psnr",
    "rollout_minus_copy_fg_psnr_min",
    "delta_fg_psnr",
)
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def _metric_column(name: str) -> str:
    return f"metrics.`{name}`"


def headline_columns(datasets: Sequence[str]) -> list[str]:
    """The metric columns of the runs view: the losses, then evaluate's main figures for the
    mean over datasets (evaluate writes `mean` for two or more) or the one dataset."""
    scopes = ["mean"] if len(datasets) > 1 else list(datasets)
    figures = [
        f"{scope}.{HEADLINE_PART}.{figure}"
        for scope in scopes
        for figure in HEADLINE_COLUMNS
    ]
    return [_metric_column(name) for name in ("loss", "val_loss", *figures)]


def runs_view(datasets: Sequence[str]) -> dict:
    """Newest first, grouped by pipeline (parent and stage runs in one open group, no click
    needed), charts of each run rather than of each group."""
    return {
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "selectedColumns": headline_columns(datasets),
        "groupBy": {
            "aggregateFunction": "min",
            "groupByKeys": [{"mode": "tag", "groupByData": PIPELINE_NAME_TAG}],
        },
        "useGroupedValuesInCharts": False,
    }


def compare_view() -> dict:
    """The train_dynamics runs of every experiment, newest first, loss charts only. Grouped by
    stage, because the UI nests a filtered run under its parent, which would hide its curves."""
    return {
        "searchFilter": f"tags.`{STAGE_TAG}` = '{COMPARED_STAGE}'",
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "selectedColumns": [_metric_column("loss"), _metric_column("val_loss")],
        "groupBy": {
            "aggregateFunction": "min",
            "groupByKeys": [{"mode": "tag", "groupByData": STAGE_TAG}],
        },
        "useGroupedValuesInCharts": False,
        "chartsSearchFilter": "loss",
    }


def experiment_tags(datasets: Sequence[str]) -> dict[str, str]:
    """The tags that make the UI open on what matters (see the module docstring)."""
    return {
        SHARED_VIEW_TAG + RUNS_VIEW: json.dumps(
            runs_view(datasets), separators=(",", ":")
        ),
        SHARED_VIEW_TAG + COMPARE_VIEW: json.dumps(
            compare_view(), separators=(",", ":")
        ),
    }


def set_up_experiment(
    client, experiment_id: str, datasets: Sequence[str], in_pipeline: bool
) -> None:
    """Write the views and mark the experiment as model training unless someone marked it
    otherwise; writes only what changed. The latest pipeline's datasets pick the headline
    columns: a run outside a pipeline (`dream --log`, a stage script run by hand) writes the
    views only where there are none yet."""
    tags = client.get_experiment(experiment_id).tags
    wanted = experiment_tags(datasets)
    if not in_pipeline:
        wanted = {key: value for key, value in wanted.items() if key not in tags}
    if EXPERIMENT_KIND_TAG not in tags:
        wanted[EXPERIMENT_KIND_TAG] = MODEL_TRAINING
    for key, value in wanted.items():
        if tags.get(key) != value:
            client.set_experiment_tag(experiment_id, key, value)


def ui_base(uri: str) -> str:
    """The UI's address for a tracking URI: the server itself, or where `mlflow ui` serves."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_ADDRESS


def view_link(uri: str, experiment_id: str, view: str = RUNS_VIEW) -> str:
    """The link that opens `view` of the experiment in the model-training UI."""
    chart = "&compareRunsMode=CHART" if view == COMPARE_VIEW else ""
    return (
        f"{ui_base(uri)}/#/experiments/{experiment_id}/runs?viewStateShareKey={quote(view)}"
        f"&workflowType=machine_learning{chart}"
    )


def ui_command(uri: str) -> str | None:
    """The command that serves the UI for a store without a server (None for a server)."""
    return (
        None
        if uri.startswith(("http://", "https://"))
        else f"mlflow ui --backend-store-uri {uri}"
    )
