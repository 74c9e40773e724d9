import numpy as np
import pytest
import torch
import zarr

from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.data.clips import (
    GAP,
    TRAIN,
    VAL,
    ClipDataset,
    SplitConfig,
    VideoArrays,
    clip_starts,
    frame_labels,
)


def make_store(path, num_frames, size=8):
    group = zarr.open_group(str(path), mode="w")
    frames = np.zeros((num_frames, size, size, 3), dtype=np.uint8)
    frames[:, 0, 0, 0] = np.arange(num_frames) % 256  # frame index in a pixel
    frames[:, 0, 0, 1] = np.arange(num_frames) // 256
    group.create_array("frames", data=frames, chunks=(16, size, size, 3))
    group.create_array("latent_actions", data=np.arange(num_frames, dtype=np.int16), chunks=(16,))
    return VideoArrays(path.stem, {"frames": (path, "frames")})


def frame_index(clip):  # [T, C, H, W] -> the frame numbers painted into it
    return (clip[:, 0, 0, 0].long() + 256 * clip[:, 1, 0, 0].long()).tolist()


def test_labels_hold_out_blocks_with_gaps():
    split = SplitConfig(val_fraction=0.25, block_frames=100, gap_frames=10)
    labels = frame_labels(800, split)
    assert (labels == VAL).sum() == 200  # 2 of 8 blocks
    val = np.flatnonzero(labels == VAL)
    for start in (val[0], val[-1] + 1):
        if 0 < start < 800:
            near = labels[max(0, start - 10) : start + 10]
            assert TRAIN not in near[:10] or VAL not in near[10:]  # a gap separates them
    assert (labels == GAP).sum() > 0


def test_short_video_still_gets_a_validation_tail():
    labels = frame_labels(50, SplitConfig(val_fraction=0.2, block_frames=300, gap_frames=4))
    assert (labels[-10:] == VAL).all() and (labels[:36] == TRAIN).all()


def test_clip_starts_never_straddle_labels():
    labels = np.array([TRAIN] * 10 + [GAP] * 2 + [VAL] * 5)
    assert clip_starts(labels, 4, TRAIN).tolist() == list(range(7))
    assert clip_starts(labels, 4, VAL).tolist() == [12, 13]
    assert clip_starts(labels, 6, VAL).tolist() == []


@pytest.mark.parametrize("skip", [1, 3])
def test_train_and_val_clips_never_share_frames_or_cross_videos(tmp_path, skip):
    videos = [make_store(tmp_path / "a.zarr", 700), make_store(tmp_path / "b.zarr", 500)]
    split = SplitConfig(val_fraction=0.2, block_frames=100, gap_frames=8)
    train = ClipDataset(videos, clip_len=4, frame_skip=skip, split="train", split_config=split)
    val = ClipDataset(videos, clip_len=4, frame_skip=skip, split="val", split_config=split)
    assert len(train) > 0 and len(val) > 0
    seen = {"train": set(), "val": set()}
    for name, dataset in (("train", train), ("val", val)):
        for i in range(len(dataset)):
            video_id = int(dataset.index[i][0])
            idx = frame_index(dataset[i]["frames"])
            assert np.diff(idx).tolist() == [skip] * 3  # consecutive frames of ONE video
            start = int(dataset.index[i][1])
            seen[name].update((video_id, f) for f in range(start, start + dataset.span))
    assert not (seen["train"] & seen["val"])
    # no frame of either split lies within the gap of the other
    for video_id, frame in seen["val"]:
        assert (video_id, frame - 8) not in seen["train"] and (video_id, frame + 8) not in seen["train"]


def test_items_are_uint8_channels_first_and_preload_matches(tmp_path):
    videos = [make_store(tmp_path / "a.zarr", 300)]
    lazy = ClipDataset(videos, clip_len=5, split="train")
    eager = ClipDataset(videos, clip_len=5, split="train", preload=True)
    assert lazy[3]["frames"].shape == (5, 3, 8, 8) and lazy[3]["frames"].dtype == torch.uint8
    assert torch.equal(lazy[17]["frames"], eager[17]["frames"])


def test_actions_field_gives_one_per_transition(tmp_path):
    path = tmp_path / "a.zarr"
    make_store(path, 300)
    dataset = ClipDataset([VideoArrays("a", {"latent_actions": (path, "latent_actions")})], clip_len=4, frame_skip=2)
    start = int(dataset.index[5][1])
    assert dataset[5]["latent_actions"].tolist() == [start, start + 2, start + 4]


def test_works_in_dataloader_workers(tmp_path):
    videos = [make_store(tmp_path / "a.zarr", 300)]
    dataset = ClipDataset(videos, clip_len=4, split="train")
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2)
    batch = next(iter(loader))
    assert batch["frames"].shape == (8, 4, 3, 8, 8)


def test_misaligned_arrays_and_missing_stores_are_errors(tmp_path):
    a, b = make_store(tmp_path / "a.zarr", 300), make_store(tmp_path / "b.zarr", 200)
    with pytest.raises(TinyWorldsError, match="not aligned"):
        ClipDataset([VideoArrays("x", {"frames": a.fields["frames"], "tokens": (b.fields["frames"][0], "frames")})], clip_len=4)
    with pytest.raises(TinyWorldsError, match="not found"):
        ClipDataset([VideoArrays("x", {"frames": (tmp_path / "nope.zarr", "frames")})], clip_len=4)


def test_clip_starts_stay_inside_one_segment():
    labels = np.array([TRAIN] * 12)
    segment = np.array([0] * 5 + [1] * 3 + [2] * 4)  # drop_idle cut the video after frames 4 and 7
    assert clip_starts(labels, 3, TRAIN, segment=segment).tolist() == [0, 1, 2, 5, 8, 9]
    assert clip_starts(labels, 3, TRAIN).tolist() == list(range(10))  # no cuts known: every window


def test_clips_never_cross_a_drop_idle_cut(tmp_path):
    path = tmp_path / "a.zarr"
    video = make_store(path, 300)
    cuts = np.zeros(300, dtype=np.int32)
    cuts[100:], cuts[150:] = 1, 2  # frames 100 and 150 follow dropped idle stretches
    zarr.open_group(str(path), mode="r+").create_array("segment", data=cuts, chunks=(16,))
    cut_aware = VideoArrays("a", video.fields, frame_store=path)
    for skip in (1, 3):
        plain = ClipDataset([video], clip_len=4, frame_skip=skip)
        dataset = ClipDataset([cut_aware], clip_len=4, frame_skip=skip)
        assert 0 < len(dataset) < len(plain)  # the store's cuts are honoured only when named
        for i in range(len(dataset)):
            idx = frame_index(dataset[i]["frames"])
            assert len({int(cuts[f]) for f in idx}) == 1, idx
    shorter = tmp_path / "shorter.zarr"  # a frame store that is not the one the arrays came from
    make_store(shorter, 200)
    zarr.open_group(str(shorter), mode="r+").create_array("segment", data=cuts[:200], chunks=(16,))
    with pytest.raises(TinyWorldsError, match="segment ids for 300 frames"):
        ClipDataset([VideoArrays("a", video.fields, frame_store=shorter)], clip_len=4)
