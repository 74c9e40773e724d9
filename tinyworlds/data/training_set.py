"""Stage `training_set`: the frame stores the models train on, identified by their content.

The training stages read only the frame stores of `data.train_on`. Declaring all of
data/frames as their dependency would retrain every model whenever a dataset that nothing
trains on is ingested; listing each store in dvc.yaml would need a list kept by hand. So
this small stage writes data/training_set.json, naming each trained-on dataset's store with a
digest of its content, and the training stages depend on that file: it changes exactly when
`data.train_on` changes or a store in it does. (DVC reruns this stage when any store changes,
and skips the stages after it when the file it writes comes out the same.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from tinyworlds.core.atomic import write_json
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.core.params import Layout, dataset_names

CHUNK_BYTES = 1 << 20


def store_digest(path: Path) -> str:
    """sha256 over a store's files (a zarr directory or an HDF5 file): names and bytes, in order."""
    if not path.exists():
        raise TinyWorldsError(f"{path}: no such frame store (run its ingest stage first)")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() if path.is_dir() else file.name.encode())
        with open(file, "rb") as handle:
            while block := handle.read(CHUNK_BYTES):
                digest.update(block)
    return digest.hexdigest()


def write_training_set(params: dict[str, Any], root: Path = Path(".")) -> dict[str, Any]:
    """Write data/training_set.json for the datasets of `data.train_on`; returns what it wrote."""
    layout = Layout(root)
    doc = {"datasets": {name: {"frames": layout.frames(name).relative_to(layout.root).as_posix(),
                               "sha256": store_digest(layout.frames(name))}
                        for name in dataset_names(params)}}
    write_json(doc, layout.training_set())
    return doc
