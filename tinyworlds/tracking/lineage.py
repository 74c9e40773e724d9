"""Who made a run: the git commit, and the pipeline run (one `dvc repro` / `dvc exp run`) it belongs to."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path

from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.tracking.store import project_root


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


def pipeline_run() -> tuple[str, bool]:
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
    return pipeline_run()[0]
