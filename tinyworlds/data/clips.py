"""Training clips: fixed-length windows over per-frame arrays, split by time blocks.

Every store in the pipeline is aligned 1:1 on the time axis with the frame store it came
from (frames [N, H, W, C], tokens [N, P], latent actions [N]), so one split rule serves all of
them: the tokenizer, the latent action model and the dynamics model see the same held-out
frames.

The split. Each video's timeline is cut into blocks of `block_frames`; every k-th block
(k = round(1 / val_fraction), counted from the end so even a short video gets one) is
validation. The `gap_frames` frames on either side of each validation block belong to
neither split, so a training clip never sits right next to a validation clip. A clip is
kept only if all its frames carry the same label, hence no clip overlaps the other split and
no clip crosses from one video into the next (each video is windowed on its own). Nor does a
clip cross a cut that ingest's `drop_idle` made: frames on either side of a cut were not
consecutive in the video, so a clip over one would show a jump no model should learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from torch.utils.data import Dataset

from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.data.stores import Location, location_exists, open_frame_store, open_hdf5, open_zarr_group

TRAIN, VAL, GAP = 0, 1, 2


@dataclass(frozen=True)
class SplitConfig:
    val_fraction: float = 0.1
    block_frames: int = 300
    gap_frames: int = 16

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise TinyWorldsError(f"split.val_fraction={self.val_fraction}: must be in (0, 1)")
        if self.block_frames <= 0 or self.gap_frames < 0:
            raise TinyWorldsError("split.block_frames must be > 0 and split.gap_frames >= 0")


def frame_labels(num_frames: int, split: SplitConfig) -> np.ndarray:
    """TRAIN / VAL / GAP for every frame of one video; [N] int8."""
    labels = np.full(num_frames, TRAIN, dtype=np.int8)
    num_blocks = -(-num_frames // split.block_frames)
    every = max(2, round(1 / split.val_fraction))
    for block in range(num_blocks):
        if (num_blocks - 1 - block) % every != 0:
            continue
        start, stop = block * split.block_frames, min(num_frames, (block + 1) * split.block_frames)
        labels[max(0, start - split.gap_frames) : start] = GAP
        labels[stop : stop + split.gap_frames] = GAP
        labels[start:stop] = VAL
    if num_blocks == 1:
        # One block cannot be both train and val: the video is too short to split by blocks,
        # so hold out its last val_fraction instead (with the gap before it).
        val_start = int(num_frames * (1 - split.val_fraction))
        labels[:] = TRAIN
        labels[max(0, val_start - split.gap_frames) : val_start] = GAP
        labels[val_start:] = VAL
    return labels


def clip_starts(labels: np.ndarray, span: int, want: int, stride: int = 1,
                segment: np.ndarray | None = None) -> np.ndarray:
    """Start indices of windows of `span` frames that lie wholly inside frames labelled `want`
    and, given the store's `segment` ids [N] (non-decreasing, see `tinyworlds.data.ingest`),
    inside one segment."""
    if span > len(labels):
        return np.zeros(0, dtype=np.int64)
    inside = np.concatenate([[0], np.cumsum(labels == want)])
    starts = np.arange(0, len(labels) - span + 1)
    whole = (inside[starts + span] - inside[starts]) == span
    if segment is not None:
        whole &= segment[starts] == segment[starts + span - 1]  # ids never decrease: same at both ends = no cut
    return starts[whole][::stride] if stride > 1 else starts[whole]


def open_array(path: Location, name: str, storage_options: dict | None = None):
    """A lazily-read array `name` of a zarr group or an HDF5 file (chosen by suffix), from a
    local path or an fsspec URL (`s3://bucket/frames/pong.zarr`) with its `storage_options`."""
    if not location_exists(path, storage_options):
        raise TinyWorldsError(f"{path}: store not found")
    if str(path).lower().endswith((".h5", ".hdf5")):
        handle = open_hdf5(path, storage_options)
        if name not in handle:
            raise TinyWorldsError(f"{path}: has no {name!r} dataset")
        return handle[name]
    try:
        group = open_zarr_group(path, storage_options)
        return group[name]
    except KeyError:
        raise TinyWorldsError(f"{path}: has no {name!r} array") from None
    except Exception as err:  # zarr raises several types for a store that is not one
        raise TinyWorldsError(f"{path}: not a readable zarr store ({err})") from None


@dataclass(frozen=True)
class VideoArrays:
    """The per-frame arrays of one video, aligned on time: field -> (store location, array name).

    e.g. {"frames": (Path("data/frames/pong.zarr"), "frames")} for the tokenizer, or
    {"tokens": (tokens.zarr, "tokens"), "latent_actions": (latent_actions.zarr, "latent_actions")} for dynamics.
    A location may be an fsspec URL ("s3://bucket/frames/pong.zarr"), opened with
    `storage_options`. `frame_store`: the video's frame store, whose `segment` array (if
    ingest's drop_idle cut the video) keeps clips from crossing a cut; the token and latent
    action caches are aligned with it.
    """

    name: str
    fields: dict[str, tuple[Location, str]]
    storage_options: dict | None = None
    frame_store: Location | None = None


class ClipDataset(Dataset):
    """Clips of `clip_len` frames taken every `frame_skip` frames, from one split.

    Items are dicts of tensors: "frames" -> uint8 [T, C, H, W] (converted to float on the
    device: 4x less to copy), "tokens" -> int64 [T, P], "latent_actions" -> int64 [T-1] (the action
    stored at frame t is the transition t -> t + frame_skip), and "video" -> int64 [] (the
    clip's index in `videos`, for losses that treat videos apart). Arrays are opened lazily in
    each process, so the dataset works with DataLoader workers; `preload` reads whole arrays into
    memory once (worth it for small stores: a clip then costs a slice, not a chunk decode).
    """

    def __init__(
        self,
        videos: list[VideoArrays],
        *,
        clip_len: int,
        frame_skip: int = 1,
        split: str = "train",
        split_config: SplitConfig = SplitConfig(),
        stride: int | None = None,
        preload: bool = False,
    ) -> None:
        if clip_len < 1 or frame_skip < 1:
            raise TinyWorldsError(f"clip_len={clip_len}, frame_skip={frame_skip}: both must be >= 1")
        if split not in ("train", "val"):
            raise TinyWorldsError(f"split={split!r}: must be 'train' or 'val'")
        self.videos = videos
        self.clip_len, self.frame_skip, self.preload = clip_len, frame_skip, preload
        self.span = (clip_len - 1) * frame_skip + 1
        # Validation clips do not overlap by default, so each held-out frame counts once.
        stride = stride or (1 if split == "train" else self.span)
        want = TRAIN if split == "train" else VAL
        index = []
        for video_id, video in enumerate(videos):
            lengths = {field: open_array(path, key, video.storage_options).shape[0]
                       for field, (path, key) in video.fields.items()}
            if len(set(lengths.values())) != 1:
                raise TinyWorldsError(f"{video.name}: per-frame arrays are not aligned ({lengths})")
            count = next(iter(lengths.values()))
            segment = None if video.frame_store is None else open_frame_store(video.frame_store, video.storage_options).segment
            if segment is not None and len(segment) != count:
                raise TinyWorldsError(f"{video.name}: {video.frame_store} has {len(segment)} segment ids for "
                                      f"{count} frames; rerun `dvc repro`")
            labels = frame_labels(count, split_config)
            starts = clip_starts(labels, self.span, want, stride, segment)
            index.append(np.stack([np.full_like(starts, video_id), starts], axis=1))
        self.index = np.concatenate(index) if index else np.zeros((0, 2), dtype=np.int64)
        self._arrays: dict[tuple[int, str], object] | None = None

    def __len__(self) -> int:
        return len(self.index)

    @property
    def item_videos(self) -> np.ndarray:
        """The video (index into `videos`) of each item [len(self)]: per-video batches draw on it."""
        return self.index[:, 0]

    def _array(self, video_id: int, field: str):
        if self._arrays is None:  # first use in this process (DataLoader workers fork)
            self._arrays = {}
        key = (video_id, field)
        if key not in self._arrays:
            video = self.videos[video_id]
            path, name = video.fields[field]
            array = open_array(path, name, video.storage_options)
            self._arrays[key] = np.asarray(array[:]) if self.preload else array
        return self._arrays[key]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = None  # open handles do not cross process boundaries
        return state

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        video_id, start = (int(v) for v in self.index[i])
        item = {"video": torch.tensor(video_id)}
        for field in self.videos[video_id].fields:
            window = np.asarray(self._array(video_id, field)[start : start + self.span : self.frame_skip])
            if field == "frames":
                item[field] = torch.from_numpy(np.ascontiguousarray(rearrange(window, "t h w c -> t c h w")))
            elif field == "latent_actions":
                item[field] = torch.from_numpy(window[:-1].astype(np.int64))  # [T-1]
            else:
                item[field] = torch.from_numpy(window.astype(np.int64))
        return item
