"""Where the training stages read frame, token and latent-action stores, and the clips they cut.

`data.root` in params: the project's own data/ (the default), another folder, or an fsspec
URL holding copies in the same layout. `clip_datasets` applies the shared train/validation
split and frame skip to any set of per-video arrays.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.core.params import Layout, section
from tinyworlds.data.clips import ClipDataset, SplitConfig, VideoArrays, open_array
from tinyworlds.data.stores import Location, is_url, open_zarr_group

# Stores smaller than this are read into memory once: a clip is then a slice instead of a
# chunk decode, which keeps the loader far ahead of training on a 2-core machine.
PRELOAD_MAX_BYTES = 2 * 1024**3


def split_config(params: dict[str, Any]) -> SplitConfig:
    return SplitConfig(**section(params, "data", "split"))


@dataclass(frozen=True)
class DataRoot:
    """Where the training stages read frame, token and latent-action stores: `data.root`.

    `data` (the default) is the project's data/ folder: the stores ingest, tokenize and
    train_lam write (`Layout`). Another folder, or an fsspec URL (s3://bucket/tinyworlds),
    holds copies in the same layout below it (frames/NAME.zarr, tokens/NAME.zarr,
    latent_actions/NAME.zarr), read with `data.storage_options`. Stages always write the
    local layout, which DVC tracks; a copy elsewhere is for reading training data at scale.
    """

    layout: Layout
    root: str | None = None  # None: the local layout itself
    storage_options: dict | None = None

    def store(self, kind: str, name: str) -> Location:
        """The store of `kind` (frames | tokens | latent_actions) for dataset `name`."""
        local = getattr(self.layout, kind)(name)
        if self.root is None:
            return local
        below = local.relative_to(self.layout.root / "data").as_posix()  # e.g. frames/pong.zarr
        return f"{self.root.rstrip('/')}/{below}" if is_url(self.root) else self.layout.root / self.root / below

    def frames(self, name: str) -> Location:
        return self.store("frames", name)

    def tokens(self, name: str) -> Location:
        return self.store("tokens", name)

    def latent_actions(self, name: str) -> Location:
        return self.store("latent_actions", name)

    def identity(self, kind: str, name: str, warn: bool = True) -> dict[str, Any]:
        """`store_identity` of the store read, with a warning (if `warn`: one process of
        several says it) when a local copy differs from it."""
        found = store_identity(self.store(kind, name), self.storage_options)
        local = getattr(self.layout, kind)(name)
        if self.root is not None and local.exists() and warn:
            here = store_identity(local)
            if (here["attrs"], here["arrays"]) != (found["attrs"], found["arrays"]):
                # Warn, not fail: a smaller local sample is legitimate; a stale copy is not.
                print(f"warning: {found['path']} differs from {local} (shapes or provenance); "
                      f"training reads the former, DVC tracks the latter", file=sys.stderr)
        return found


def data_root(params: dict[str, Any], layout: Layout) -> DataRoot:
    """`data.root` and `data.storage_options` from params, checked."""
    data = params.get("data") or {}
    root, options = data.get("root") or "data", data.get("storage_options") or None
    if not isinstance(root, str):
        raise TinyWorldsError(f"params.yaml: data.root={root!r}: must be a folder or a URL such as s3://bucket/tinyworlds")
    if options is not None and not isinstance(options, dict):
        raise TinyWorldsError(f"params.yaml: data.storage_options must be a mapping of fsspec options, got {options!r}")
    return DataRoot(layout, None if root == "data" else root, options)


def frame_store_shape(data: DataRoot, names: list[str]) -> tuple[int, int]:
    """(size, channels) shared by every frame store trained on together, or a clear error."""
    shapes = {}
    for name in names:
        frames = open_array(data.frames(name), "frames", data.storage_options)
        shapes[name] = tuple(frames.shape[1:])
    if len(set(shapes.values())) != 1:
        raise TinyWorldsError(f"datasets trained together must have the same frame shape; got {shapes}")
    height, width, channels = next(iter(shapes.values()))
    if height != width:
        raise TinyWorldsError(f"frame stores must hold square frames; got {height}x{width}")
    return height, channels


def store_identity(path: Location, storage_options: dict | None = None) -> dict[str, Any]:
    """What identifies a store's content cheaply: its length and its recorded provenance."""
    group = open_zarr_group(path, storage_options)
    attrs = dict(group.attrs)
    return {"path": str(path), "attrs": {k: attrs[k] for k in sorted(attrs) if "sha256" in k or k.startswith("tokenizer")},
            "arrays": {name: list(array.shape) for name, array in group.arrays()}}


def should_preload(videos: list[VideoArrays]) -> bool:
    total = 0
    for video in videos:
        for path, name in video.fields.values():
            array = open_array(path, name, video.storage_options)
            total += int(np.prod(array.shape)) * array.dtype.itemsize
    return total <= PRELOAD_MAX_BYTES


def clip_datasets(params: dict[str, Any], videos: list[VideoArrays], length: int) -> tuple[ClipDataset, ClipDataset]:
    """Train and validation clips over `videos`, with the shared split and frame skip."""
    skip = int(section(params, "data", "frame_skip"))
    preload = should_preload(videos)
    common = dict(clip_len=length, frame_skip=skip, split_config=split_config(params), preload=preload)
    return ClipDataset(videos, split="train", **common), ClipDataset(videos, split="val", **common)


def frame_videos(data: DataRoot, names: list[str]) -> list[VideoArrays]:
    return [VideoArrays(name, {"frames": (data.frames(name), "frames")}, data.storage_options, frame_store=data.frames(name))
            for name in names]
