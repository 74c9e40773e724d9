"""The world model's goals, checked against data/metrics/evaluate.json: `tinyworlds results`.

Each goal reads the `headline` block `evaluate` writes per dataset. The table it prints is the
README's results table, so the README can be refreshed from a run instead of by hand.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinyworlds.core.errors import TinyWorldsError


@dataclass(frozen=True)
class Goal:
    label: str  # what the row says
    shown: Callable[[dict[str, Any]], str]  # the figures, from a dataset's headline block
    met: Callable[[dict[str, Any]], bool | None]  # None: the data cannot tell (no labels, say)


def _get(headline: dict[str, Any], key: str) -> float:
    value = headline.get(key)
    return float("nan") if value is None else float(value)


def _known(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def _range(headline: dict[str, Any], key: str, digits: int = 3, *, signed: bool = False) -> str:
    """' [low-high]' (signed: ' [+low to +high]'): the 95% interval of `key`, or '' where the
    headline has none (older runs)."""
    low, high = _get(headline, f"{key}_low"), _get(headline, f"{key}_high")
    if not _known(low, high):
        return ""
    return f" [{low:+.{digits}f} to {high:+.{digits}f}]" if signed else f" [{low:.{digits}f}-{high:.{digits}f}]"


def _moves(headline: dict[str, Any]) -> str:
    """' (moves: precision P, recall R)': where the rollout moves against where the truth
    does, or '' where the headline has none (older runs)."""
    precision, recall = _get(headline, "rollout_change_precision"), _get(headline, "rollout_change_recall")
    return f" (moves: precision {precision:.2f}, recall {recall:.2f})" if _known(precision, recall) else ""


def _invented(headline: dict[str, Any]) -> str:
    """' (precision P)': the share of the object pixels the tokenizer draws that the frame has,
    or '' where the headline has none (before 0.3.14)."""
    precision = _get(headline, "tokenizer_fg_precision")
    return f" (precision {precision:.2f})" if _known(precision) else ""


GOALS = (
    Goal("tokenizer keeps the objects: fg recall >= 0.95, fg PSNR >= 25 dB",
         lambda h: f"{_get(h, 'tokenizer_fg_recall'):.3f}, {_get(h, 'tokenizer_fg_psnr'):.1f} dB{_invented(h)}",
         lambda h: _get(h, "tokenizer_fg_recall") >= 0.95 and _get(h, "tokenizer_fg_psnr") >= 25),
    Goal("LAM names the moves: NMI with the move's sign >= 0.6, opposite moves apart",
         lambda h: f"{_get(h, 'lam_nmi_displacement'):.3f}{_range(h, 'lam_nmi_displacement')}, "
                   f"{'apart' if _get(h, 'lam_directions_separated') == 1 else 'together'}",
         lambda h: (_get(h, "lam_nmi_displacement") >= 0.6 and _get(h, "lam_directions_separated") == 1)
         if _known(_get(h, "lam_nmi_displacement")) else None),
    Goal("LAM names the controls: NMI with true actions >= 2/3 of a perfect move detector's",
         lambda h: f"{_get(h, 'lam_nmi'):.3f} of {_get(h, 'lam_nmi_ceiling'):.3f} "
                   f"({_get(h, 'lam_nmi_over_ceiling'):.2f}{_range(h, 'lam_nmi_over_ceiling', 2)})",
         lambda h: _get(h, "lam_nmi_over_ceiling") >= 2 / 3 if _known(_get(h, "lam_nmi_over_ceiling")) else None),
    Goal("rollout beats copying the last real frame on the objects at every horizon",
         lambda h: f"{_get(h, 'rollout_minus_copy_fg_psnr_min'):+.2f} dB at worst"
                   f"{_range(h, 'rollout_minus_copy_fg_psnr_min', 2, signed=True)}{_moves(h)}",
         lambda h: _get(h, "rollout_minus_copy_fg_psnr_min") > 0),
    Goal("controls matter: fg ΔtPSNR >= 1 dB, 95% interval above 0",
         lambda h: f"{_get(h, 'delta_fg_psnr'):+.2f} dB (low {_get(h, 'delta_fg_psnr_low'):+.2f})",
         lambda h: _get(h, "delta_fg_psnr") >= 1 and _get(h, "delta_fg_psnr_low") > 0),
)


def load_results(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TinyWorldsError(f"{path}: no evaluation yet (run `dvc repro evaluate`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TinyWorldsError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def goals_table(results: dict[str, Any]) -> str:
    """A markdown table: one row per goal, one column per dataset, each cell the figures and
    whether the goal is met (met: yes / no / n/a where the data cannot tell)."""
    names = sorted(n for n, block in results.items() if n != "mean" and isinstance(block, dict) and "headline" in block)
    if not names:
        raise TinyWorldsError("evaluate.json has no dataset with a headline block (rerun stage evaluate)")
    lines = ["| goal | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for goal in GOALS:
        cells = []
        for name in names:
            headline = results[name]["headline"]
            met = goal.met(headline)
            # "met: no", not ": no": a cell like "apart: no" would read as "not apart"
            cells.append(f"{goal.shown(headline)}; met: {'n/a' if met is None else 'yes' if met else 'no'}")
        lines.append(f"| {goal.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
