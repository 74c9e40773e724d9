"""Write-next-to-then-rename, so no reader ever sees a half-written output.

Every stage output (a frame store, a video, a checkpoint directory, a token cache) is built
under a hidden temporary name in the same directory as the target and renamed over it only
once it is complete. If anything fails, the temporary is removed and whatever was at the
target before is left exactly as it was.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tinyworlds.core.errors import TinyWorldsError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def ensure_parent_writable(target: Path) -> None:
    """Create the target's directory, or fail with a one-line error naming it."""
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TinyWorldsError(f"{target}: cannot create output directory {parent} ({err.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TinyWorldsError(f"{target}: output directory {parent} is not writable")


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success rename it onto `target`.

    Works for files and directories alike (zarr stores are directories). The previous
    target, if any, is replaced only after the new one is complete; on an exception
    (including KeyboardInterrupt) the temporary is deleted and the old target kept.
    """
    target = Path(target)
    ensure_parent_writable(target)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if not tmp.exists():
            raise TinyWorldsError(f"{target}: nothing was written")
        if target.is_dir() and not target.is_symlink():
            # A directory cannot be renamed over a non-empty one: move the old one aside
            # first, so that a crash between the two renames still leaves one good copy.
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def write_json(doc: dict[str, Any], path: Path) -> Path:
    """A JSON document (indented, keys sorted: stable diffs for `dvc metrics`), written atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


def write_csv(rows: list[dict[str, float]], path: Path) -> Path:
    """Rows as CSV with `step` first (the loss curves `dvc plots` reads), written atomically."""
    columns = sorted({k for row in rows for k in row}, key=lambda k: (k != "step", k))
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path
