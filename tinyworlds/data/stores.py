"""Open frame stores for reading: a zarr v3 group or an HDF5 file written by `ingest`.

Both hold `frames` (uint8 [N, H, W, C], H = W) and, when the source's sidecar had them,
`true_actions` (int16 [N]) and `player_position` (float32 [N]), and with ingest's drop_idle
`segment` (int32 [N]); their attributes are described in `tinyworlds.data.ingest`.
A plain TinyWorlds HDF5 file (only a `frames` dataset, no attributes) opens too, with
`fps` None.

Safe for torch DataLoader workers: a store pickles as its path, and the frames are opened
lazily by the process that first reads them and reopened after a fork (an HDF5 handle
must never be shared across processes).

A store can also be read from any fsspec filesystem: give a URL (`s3://bucket/frames/pong.zarr`,
`gs://...`, `file:///...`, `memory://...`) instead of a path, and the filesystem's options
(`storage_options`, e.g. {"endpoint_url": ...}) with it. zarr reads URLs through its
FsspecStore; HDF5 is read through an fsspec file object.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Union

import h5py
import numpy as np
import zarr

from tinyworlds.core.errors import TinyWorldsError

# A local path, or an fsspec URL (a str with "://"). URLs stay strings: Path("s3://b/x")
# would collapse the "//".
Location = Union[str, os.PathLike]
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def is_url(location: Location) -> bool:
    return isinstance(location, str) and "://" in location


def as_location(location: Location) -> Path | str:
    """A URL as it is, anything else as a Path."""
    return location if is_url(location) else Path(location)


def filesystem(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, path within it) for a URL."""
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as err:  # e.g. s3:// without s3fs installed
        raise TinyWorldsError(f"{url}: cannot open this filesystem ({err})") from None


def location_exists(location: Location, storage_options: dict | None = None) -> bool:
    if is_url(location):
        fs, path = filesystem(location, storage_options)
        return fs.exists(path)
    return Path(location).exists()


def open_zarr_group(location: Location, storage_options: dict | None = None) -> zarr.Group:
    """A zarr group opened read-only, from a local path or an fsspec URL."""
    if is_url(location):
        return zarr.open_group(location, mode="r", storage_options=storage_options or None)
    return zarr.open_group(str(location), mode="r")


def open_hdf5(location: Location, storage_options: dict | None = None) -> h5py.File:
    """An HDF5 file opened read-only, from a local path or through an fsspec file object."""
    if is_url(location):
        fs, path = filesystem(location, storage_options)
        return h5py.File(fs.open(path, "rb"), "r")
    # locking=False: a DataLoader worker must not release a file lock its parent holds.
    return h5py.File(location, "r", locking=False)


def store_kind(path: Location, storage_options: dict | None = None) -> str | None:
    """'zarr' for a zarr v3 group directory, 'hdf5' for an HDF5 file, else None (by content)."""
    if is_url(path):
        fs, inner = filesystem(path, storage_options)
        if fs.isdir(inner):
            return "zarr" if fs.isfile(f"{inner.rstrip('/')}/zarr.json") else None
        if fs.isfile(inner):
            with fs.open(inner, "rb") as handle:
                return "hdf5" if handle.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE else None
        return None
    path = Path(path)
    if path.is_dir():
        return "zarr" if (path / "zarr.json").is_file() else None
    if path.is_file() and h5py.is_hdf5(path):
        return "hdf5"
    return None


def _plain(value: Any) -> Any:
    """An HDF5 attribute as the JSON-like value zarr would give back."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


class LazyFrames:
    """`frames[a:b]` -> np.ndarray [n, H, W, C] uint8, opening the store in the reading process."""

    def __init__(self, path: Path | str, kind: str, shape: tuple[int, ...], storage_options: dict | None = None):
        self.path, self.kind, self.shape, self.storage_options = path, kind, shape, storage_options
        self.dtype = np.dtype(np.uint8)
        self._pid: int | None = None
        self._file: h5py.File | None = None
        self._array: Any = None

    def _open(self) -> Any:
        if self._pid != os.getpid():
            # After a fork the parent's handle is dropped here, never used. HDF5 files are
            # opened without a file lock, so dropping one cannot release the parent's lock.
            self._file, self._array = None, None
            if self.kind == "zarr":
                self._array = open_zarr_group(self.path, self.storage_options)["frames"]
            else:
                self._file = open_hdf5(self.path, self.storage_options)
                self._array = self._file["frames"]
            self._pid = os.getpid()
        return self._array

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(self._open()[index])

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._pid, self._file, self._array = None, None, None

    def __getstate__(self) -> dict:
        return {"path": self.path, "kind": self.kind, "shape": self.shape, "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["kind"], state["shape"], state.get("storage_options"))


class FrameStore:
    """A frame store opened for reading; see `open_frame_store`."""

    def __init__(self, path: Path | str, kind: str, shape: tuple[int, ...], per_frame: dict[str, np.ndarray],
                 attrs: dict, storage_options: dict | None = None):
        self.path = path  # a Path, or a URL string
        self.kind = kind
        self.storage_options = storage_options
        self.frames = LazyFrames(path, kind, shape, storage_options)  # [N, H, W, C] uint8, read on slicing
        # Each [N] or None where the store lacks it (the recording's sidecar did not know it).
        self.true_actions = per_frame.get("true_actions")  # int16: the recorded action at each frame
        self.player_position = per_frame.get("player_position")  # float32: the player's coordinate, NaN unknown
        self.segment = per_frame.get("segment")  # int32: a new id after each cut made by drop_idle
        self.attrs = attrs

    def __len__(self) -> int:
        return self.frames.shape[0]

    @property
    def size(self) -> int:
        return self.frames.shape[1]

    @property
    def channels(self) -> int:
        return self.frames.shape[3]

    @property
    def fps(self) -> float | None:
        fps = self.attrs.get("fps")
        return float(fps) if fps is not None else None

    def disk_bytes(self) -> int:
        """Bytes the store takes on disk (all files of a zarr directory)."""
        if is_url(self.path):
            fs, inner = filesystem(self.path, self.storage_options)
            return int(fs.du(inner))
        if self.path.is_file():
            return self.path.stat().st_size
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def close(self) -> None:
        self.frames.close()

    def __enter__(self) -> FrameStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"FrameStore({str(self.path)!r}, frames={len(self)}, size={self.size}, "
                f"channels={self.channels}, fps={self.fps})")


def _check_frames(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if len(shape) != 4 or dtype != np.uint8 or shape[3] not in (1, 3) or shape[1] != shape[2]:
        raise TinyWorldsError(
            f"{path}: `frames` is {dtype} {list(shape)}, expected uint8 [N, H, W, C] with H = W and C = 1 or 3"
        )


PER_FRAME_ARRAYS = ("true_actions", "player_position", "segment")  # besides `frames`, each [N]


def _check_per_frame(path: Path, per_frame: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    for name, values in per_frame.items():
        if values.shape != (n,):
            raise TinyWorldsError(f"{path}: `{name}` has shape {list(values.shape)}, expected [{n}] (one per frame)")
    return per_frame


def open_frame_store(path: Location, storage_options: dict | None = None) -> FrameStore:
    """Open a zarr or HDF5 frame store (told apart by content), local or at an fsspec URL;
    a one-line error if it is not one."""
    path = as_location(path)
    if not location_exists(path, storage_options):
        raise TinyWorldsError(f"{path}: no such frame store")
    kind = store_kind(path, storage_options)
    if kind is None:
        raise TinyWorldsError(f"{path}: not a frame store (expected a zarr v3 group directory or an HDF5 file)")
    try:
        if kind == "zarr":
            group = open_zarr_group(path, storage_options)
            if "frames" not in group:
                raise TinyWorldsError(f"{path}: zarr group has no `frames` array")
            frames = group["frames"]
            shape, dtype = tuple(frames.shape), np.dtype(frames.dtype)
            per_frame = {name: group[name][:] for name in PER_FRAME_ARRAYS if name in group}
            attrs = dict(group.attrs)
        else:
            with open_hdf5(path, storage_options) as f:
                if not isinstance(f.get("frames"), h5py.Dataset):
                    raise TinyWorldsError(f"{path}: HDF5 file has no `frames` dataset")
                shape, dtype = tuple(f["frames"].shape), f["frames"].dtype
                per_frame = {name: f[name][:] for name in PER_FRAME_ARRAYS if name in f}
                attrs = {k: _plain(v) for k, v in f.attrs.items()}
    except TinyWorldsError:
        raise
    except Exception as err:  # zarr and h5py raise many types for a damaged store
        detail = " ".join(str(err).split())
        raise TinyWorldsError(f"{path}: cannot read frame store ({type(err).__name__}: {detail})") from None
    _check_frames(path, shape, dtype)
    return FrameStore(path, kind, shape, _check_per_frame(path, per_frame, shape[0]), attrs, storage_options)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (provenance of stores and caches)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
