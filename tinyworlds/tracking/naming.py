"""What runs and metrics are called in MLflow, so that its UI reads without a legend.

Run names: `train_dynamics · pong+breakout · exp-abc12`: the stage, the datasets and the DVC
experiment (the short commit under a plain `dvc repro`). A pipeline's parent run is named after
the DVC experiment, or `repro <commit> <date time>`.

Metric names: a few headline figures stay at the top level, where MLflow's charts put them
first ("Model metrics") and the runs table can show them: the losses (`loss`, `val_*`) and
evaluate's headline block (`pong.headline.tokenizer_fg_psnr`, named as `dvc metrics show` names
it). Everything else is detail, under a section prefix MLflow groups by (the part before `/`):
a dotted name's first part (`pong.tokenizer.fg_psnr` -> `pong/tokenizer.fg_psnr`), else the
stage's section (`lr` -> `train/lr` in a training stage, `psnr` -> `dream/psnr` in `dream`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

SEPARATOR = " · "
HEADLINE_PART = "headline"  # evaluate's block of the figures the goals read


def is_headline(key: str) -> bool:
    """The losses and evaluate's headline figures: the metrics a run is judged by."""
    return key == "loss" or key.startswith("val_") or HEADLINE_PART in key.split(".")


def detail_section(stage: str) -> str:
    """Where a stage's undotted detail metrics go: `train` for every training stage, else the stage."""
    return "train" if stage.startswith("train_") else stage


def metric_name(key: str, stage: str) -> str:
    """The MLflow name of metric `key` of `stage`: headline as is, detail under a section prefix."""
    if is_headline(key) or "/" in key:
        return key
    section, dot, rest = key.partition(".")
    return f"{section}/{rest}" if dot else f"{detail_section(stage)}/{key}"


def short_commit(commit: str) -> str | None:
    return commit[:7] if commit and commit != "unknown" else None


def pipeline_label(
    dvc_experiment: str | None, commit: str, when: float | None = None
) -> str | None:
    """The name of a pipeline's parent run: the DVC experiment, else `repro <commit> <date time>`."""
    if dvc_experiment:
        return dvc_experiment
    short = short_commit(commit)
    if short is None:
        return None
    return f"repro {short} {time.strftime('%Y-%m-%d %H:%M', time.localtime(when))}"


def stage_run_name(
    stage: str, datasets: Sequence[str], dvc_experiment: str | None, commit: str
) -> str:
    """`train_dynamics · pong+breakout · exp-abc12` (the short commit when not in an experiment)."""
    parts = [stage, "+".join(datasets), dvc_experiment or short_commit(commit)]
    return SEPARATOR.join(part for part in parts if part)
