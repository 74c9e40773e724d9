"""Opening frame stores: both formats, plain TinyWorlds HDF5, bad stores, worker processes."""

from __future__ import annotations

import multiprocessing
import pickle

import h5py
import numpy as np
import pytest
import zarr

from tests.conftest import solid_frames, write_video
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.data.ingest import ingest
from tinyworlds.data.stores import FrameStore, open_frame_store


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, FrameStore]:
    """The same 2 s clip ingested as zarr and as HDF5 (30 frames of 16x16 RGB at 15 fps)."""
    d = tmp_path_factory.mktemp("stores")
    source = write_video(d / "clip.mkv", solid_frames(60, 48, 36), codec="ffv1")
    return {fmt: ingest(source, d / f"frames.{fmt}", size=16, progress=False).out for fmt in ("zarr", "h5")}


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_open_both_formats(stores, fmt):
    with open_frame_store(stores[fmt]) as store:
        assert store.kind == ("zarr" if fmt == "zarr" else "hdf5")
        assert (len(store), store.size, store.channels, store.fps) == (30, 16, 3, 15.0)
        window = store.frames[4:8]  # [4, 16, 16, 3]
        assert isinstance(window, np.ndarray) and window.shape == (4, 16, 16, 3) and window.dtype == np.uint8
        assert store.frames.shape == (30, 16, 16, 3) and len(store.frames) == 30
        assert store.true_actions is None and store.attrs["frames"] == 30
        files = [stores[fmt]] if fmt == "h5" else [p for p in stores[fmt].rglob("*") if p.is_file()]
        assert store.disk_bytes() == sum(p.stat().st_size for p in files) > 0


def test_both_formats_hold_the_same_frames(stores):
    zarr_store, h5_store = open_frame_store(stores["zarr"]), open_frame_store(stores["h5"])
    np.testing.assert_array_equal(zarr_store.frames[:], h5_store.frames[:])
    assert {k: v for k, v in zarr_store.attrs.items() if v is not None} == h5_store.attrs
    h5_store.close()


def test_plain_tinyworlds_hdf5(tmp_path):
    with h5py.File(tmp_path / "pong_frames.h5", "w") as f:
        f.create_dataset("frames", data=np.zeros((5, 8, 8, 3), np.uint8), compression="lzf")
    with open_frame_store(tmp_path / "pong_frames.h5") as store:
        assert (len(store), store.size, store.fps, store.attrs, store.true_actions) == (5, 8, None, {}, None)


def _zarr_group_without_frames(path):
    zarr.open_group(path, mode="w").create_array("other", shape=(3,), dtype="uint8")
    return path


def _text(path):
    path.write_text("not HDF5")
    return path


def _h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, data in datasets.items():
            f.create_dataset(name, data=data)
    return path


@pytest.mark.parametrize("make, words", [
    (lambda d: d / "missing.zarr", "no such frame store"),
    (lambda d: d, "not a frame store"),
    (lambda d: _text(d / "x.h5"), "not a frame store"),
    (lambda d: _zarr_group_without_frames(d / "g.zarr"), "no `frames`"),
    (lambda d: _h5(d / "a.h5", images=np.zeros((2, 4, 4, 3), np.uint8)), "no `frames`"),
    (lambda d: _h5(d / "b.h5", frames=np.zeros((2, 4, 4, 3), np.float32)), "expected uint8"),
    (lambda d: _h5(d / "c.h5", frames=np.zeros((2, 4, 6, 3), np.uint8)), "H = W"),
    (lambda d: _h5(d / "e.h5", frames=np.zeros((2, 4, 4, 3), np.uint8), true_actions=np.zeros(3, np.int16)),
     "one per frame"),
])
def test_bad_stores(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(TinyWorldsError) as caught:
        open_frame_store(path)
    assert words in str(caught.value) and str(path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_pickles_as_its_path(stores, fmt):
    store = open_frame_store(stores[fmt])
    first = store.frames[0:3]  # opens the handle in this process
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone.frames[0:3], first)
    assert clone.attrs == store.attrs and len(clone) == len(store)
    store.close()
    clone.close()


def _read_in_child(store: FrameStore, queue) -> None:
    queue.put(store.frames[10:12].tolist())


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_reads_after_fork(stores, fmt):
    """A handle opened in the parent is not reused by a forked child; the child reopens."""
    store = open_frame_store(stores[fmt])
    expected = store.frames[10:12]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(store, queue))
    child.start()
    got = np.array(queue.get(timeout=30), dtype=np.uint8)
    child.join(timeout=30)
    assert child.exitcode == 0
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(store.frames[10:12], expected)  # parent's handle still fine
    store.close()


def test_torch_dataloader_workers(stores):
    torch = pytest.importorskip("torch")

    class Windows(torch.utils.data.Dataset):
        def __init__(self, store: FrameStore):
            self.store = store

        def __len__(self) -> int:
            return len(self.store) - 4

        def __getitem__(self, i: int):
            return torch.from_numpy(self.store.frames[i : i + 4])  # [T, H, W, C]

    store = open_frame_store(stores["h5"])
    store.frames[0:1]  # the parent has an open handle before the workers fork
    loader = torch.utils.data.DataLoader(Windows(store), batch_size=8, num_workers=2)
    batches = torch.cat(list(loader))  # [B, T, H, W, C]
    assert batches.shape == (26, 4, 16, 16, 3)
    np.testing.assert_array_equal(batches[5].numpy(), store.frames[5:9])
    store.close()
