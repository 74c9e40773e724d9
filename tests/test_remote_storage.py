"""Stores on an fsspec filesystem: fsspec's in-memory filesystem stands in for S3.

A store is built locally, as the pipeline does, and copied to `memory://bucket/...` as one
would sync it to a bucket; reads through the URL must match reads of the local store.
"""

from __future__ import annotations

import fsspec
import h5py
import numpy as np
import pytest
import torch
import zarr
from fsspec.implementations.memory import MemoryFileSystem

from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.core.params import Layout
from tinyworlds.data import roots
from tinyworlds.data.clips import ClipDataset, SplitConfig, VideoArrays, open_array
from tinyworlds.data.stores import open_frame_store

SPLIT = SplitConfig(val_fraction=0.2, block_frames=40, gap_frames=4)


def write_frames(path, num_frames=120, size=8):
    """A local zarr frame store whose frame t has t painted into a pixel."""
    frames = np.zeros((num_frames, size, size, 3), dtype=np.uint8)
    frames[:, 0, 0, 0] = np.arange(num_frames)
    group = zarr.open_group(str(path), mode="w")
    group.create_array("frames", data=frames, chunks=(16, size, size, 3))
    group.attrs.update({"fps": 15, "source_sha256": "abc"})
    return frames


@pytest.fixture
def bucket(tmp_path):
    """A local project with one frame store, and a copy of its data/ at memory://bucket/NAME."""
    memory = fsspec.filesystem("memory")
    name = tmp_path.name  # the memory filesystem is shared by the whole process: one prefix per test
    layout = Layout(tmp_path)
    frames = write_frames(layout.frames("pong"))
    memory.put(str(tmp_path / "data"), f"/bucket/{name}", recursive=True)
    yield {"url": f"memory://bucket/{name}", "layout": layout, "frames": frames}
    memory.rm(f"/bucket/{name}", recursive=True)


def test_a_frame_store_opens_from_a_url(bucket):
    with open_frame_store(f"{bucket['url']}/frames/pong.zarr") as store:
        assert store.kind == "zarr" and (len(store), store.size, store.fps) == (120, 8, 15.0)
        np.testing.assert_array_equal(store.frames[10:20], bucket["frames"][10:20])
        assert store.disk_bytes() > 0


def test_an_hdf5_frame_store_opens_from_a_url(tmp_path):
    frames = np.arange(5 * 4 * 4 * 3, dtype=np.uint8).reshape(5, 4, 4, 3)
    with fsspec.open(f"memory://h5/{tmp_path.name}.h5", "wb") as handle, h5py.File(handle, "w") as f:
        f.create_dataset("frames", data=frames)
    with open_frame_store(f"memory://h5/{tmp_path.name}.h5") as store:
        assert store.kind == "hdf5" and len(store) == 5
        np.testing.assert_array_equal(store.frames[1:3], frames[1:3])
    np.testing.assert_array_equal(open_array(f"memory://h5/{tmp_path.name}.h5", "frames")[:], frames)


def test_clips_read_through_a_url_match_the_local_store(bucket):
    local = VideoArrays("pong", {"frames": (bucket["layout"].frames("pong"), "frames")})
    remote = VideoArrays("pong", {"frames": (f"{bucket['url']}/frames/pong.zarr", "frames")})
    for preload in (False, True):
        here = ClipDataset([local], clip_len=4, frame_skip=2, split_config=SPLIT, preload=preload)
        there = ClipDataset([remote], clip_len=4, frame_skip=2, split_config=SPLIT, preload=preload)
        assert len(there) == len(here) > 0
        for i in (0, len(here) // 2, len(here) - 1):
            assert torch.equal(there[i]["frames"], here[i]["frames"])  # [T, C, H, W]


class RecordingFileSystem(MemoryFileSystem):
    """memory:// under another protocol, remembering the options it was made with."""

    protocol = "recording"
    options_seen: list[dict] = []

    def __init__(self, *args, **storage_options):
        RecordingFileSystem.options_seen.append(storage_options)
        super().__init__(*args, **storage_options)

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).replace("recording://", "memory://", 1))


def test_storage_options_reach_the_filesystem(bucket):
    fsspec.register_implementation("recording", RecordingFileSystem, clobber=True)
    url = bucket["url"].replace("memory://", "recording://") + "/frames/pong.zarr"
    video = VideoArrays("pong", {"frames": (url, "frames")}, storage_options={"endpoint_url": "http://minio:9000"})
    dataset = ClipDataset([video], clip_len=3, split_config=SPLIT)
    assert dataset[5]["frames"][:, 0, 0, 0].tolist() == [5, 6, 7]
    assert {"endpoint_url": "http://minio:9000"} in [
        {k: v for k, v in seen.items() if k != "asynchronous"} for seen in RecordingFileSystem.options_seen
    ]
    with open_frame_store(url, storage_options={"endpoint_url": "http://other:9000"}) as store:
        assert len(store) == 120 and store.frames[3:4][0, 0, 0, 0] == 3
    assert any(seen.get("endpoint_url") == "http://other:9000" for seen in RecordingFileSystem.options_seen)


def test_file_urls_read_like_paths(bucket):
    url = f"file://{bucket['layout'].frames('pong')}"
    dataset = ClipDataset([VideoArrays("pong", {"frames": (url, "frames")})], clip_len=3, split_config=SPLIT)
    assert dataset[5]["frames"][:, 0, 0, 0].tolist() == [5, 6, 7]
    assert open_frame_store(url).kind == "zarr"


def test_a_missing_url_is_one_line(bucket):
    with pytest.raises(TinyWorldsError, match=r"^memory://bucket/nothing.zarr: store not found$"):
        open_array("memory://bucket/nothing.zarr", "frames")
    with pytest.raises(TinyWorldsError, match=r"^memory://bucket/nothing.zarr: no such frame store$"):
        open_frame_store("memory://bucket/nothing.zarr")


def test_data_root_maps_the_training_stores_to_a_url(bucket, capsys):
    layout = bucket["layout"]
    local = roots.data_root({"data": {"root": "data"}}, layout)
    assert local.frames("pong") == layout.frames("pong") and local.tokens("x") == layout.tokens("x")
    assert roots.data_root({}, layout) == local  # data.root is optional

    params = {"data": {"root": bucket["url"] + "/", "storage_options": {"skip_instance_cache": True}}}
    remote = roots.data_root(params, layout)
    assert remote.frames("pong") == f"{bucket['url']}/frames/pong.zarr"
    assert remote.latent_actions("pong") == f"{bucket['url']}/latent_actions/pong.zarr"
    assert roots.frame_store_shape(remote, ["pong"]) == (8, 3)
    train, val = roots.clip_datasets({"data": {"frame_skip": 1, "split": vars(SPLIT)}},
                                      roots.frame_videos(remote, ["pong"]), 4)
    assert len(train) > 0 and len(val) > 0 and train[0]["frames"].shape == (4, 3, 8, 8)

    # The identity (part of the resume fingerprint) is the copy's; a differing local copy is flagged.
    assert remote.identity("frames", "pong")["path"] == remote.frames("pong") and capsys.readouterr().err == ""
    write_frames(layout.frames("pong"), num_frames=100)
    remote.identity("frames", "pong")
    assert "differs from" in capsys.readouterr().err


@pytest.mark.parametrize("bad, words", [({"root": 3}, "data.root=3"), ({"storage_options": "x"}, "data.storage_options")])
def test_bad_data_root_settings_are_named(tmp_path, bad, words):
    with pytest.raises(TinyWorldsError, match=words):
        roots.data_root({"data": bad}, Layout(tmp_path))
