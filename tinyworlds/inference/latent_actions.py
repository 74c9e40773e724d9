"""The latent action id of every transition of a frame store, cached for the dynamics model.

The trained LAM labels every transition t -> t + frame_skip of a dataset; the ids go to
data/latent_actions/NAME.zarr (`latent_actions` [N], aligned 1:1 with the frame store, -1 where
t + frame_skip is past the end). Written by stage train_lam once the LAM is trained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from tinyworlds.core.atomic import atomic_output
from tinyworlds.data.clips import open_array
from tinyworlds.data.stores import open_frame_store
from tinyworlds.metrics.objects import merge_equivalent_actions
from tinyworlds.models.lam import LatentActionModel
from tinyworlds.models.pixels import to_model


def window_starts(length: int, clip_len: int) -> list[int]:
    """Starts of clips that cover a sequence of `length` with each transition labelled once.

    Consecutive windows share one frame (stride clip_len - 1), so transition j -> j + 1 lies in
    exactly one window; the last window is moved back to end at the sequence's end.
    """
    if length <= clip_len:
        return [0]
    starts = list(range(0, length - clip_len + 1, clip_len - 1))
    if starts[-1] + clip_len < length:
        starts.append(length - clip_len)
    return starts


@torch.inference_mode()
def label_transitions(model: LatentActionModel, frames, *, clip_len: int, frame_skip: int,
                      device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Latent action id of every transition t -> t + frame_skip of a frame array [N, H, W, C]."""
    count = frames.shape[0]
    actions = np.full(count, -1, dtype=np.int16)
    for phase in range(min(frame_skip, count)):
        # Frames phase, phase + skip, ... form one sequence whose transitions are t -> t + skip.
        sequence = np.arange(phase, count, frame_skip)
        if len(sequence) < 2:
            continue
        length = min(clip_len, len(sequence))
        starts = window_starts(len(sequence), length)
        for first in range(0, len(starts), batch_size):
            batch_starts = starts[first : first + batch_size]
            lo, hi = sequence[batch_starts[0]], sequence[batch_starts[-1] + length - 1]
            block = np.asarray(frames[lo : hi + 1])[::frame_skip]  # [n, H, W, C], sequence order
            offsets = np.array(batch_starts) - batch_starts[0]
            clips = block[offsets[:, None] + np.arange(length)]  # [B, T, H, W, C]
            clips = rearrange(torch.from_numpy(clips).to(device), "b t h w c -> b t c h w")
            ids = model.infer(to_model(clips)).cpu().numpy()  # [B, T-1]
            for start, row in zip(batch_starts, ids):
                actions[sequence[start : start + length - 1]] = row
    return actions


def cache_latent_actions(model: LatentActionModel, frames_path: Path | str, out: Path, *, clip_len: int,
                         frame_skip: int, device: torch.device, storage_options: dict | None = None) -> np.ndarray:
    import zarr

    actions = label_transitions(model, open_array(frames_path, "frames", storage_options), clip_len=clip_len,
                                frame_skip=frame_skip, device=device)
    segment = open_frame_store(frames_path, storage_options).segment
    if segment is not None:  # a transition over a drop_idle cut is a jump, not an action
        actions[:-frame_skip][segment[:-frame_skip] != segment[frame_skip:]] = -1
    with atomic_output(out) as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        group.create_array("latent_actions", data=actions, chunks=(min(len(actions), 65536),))
        group.attrs.update({"frames_store": str(frames_path), "num_actions": model.num_actions,
                            "frame_skip": frame_skip, "clip_len": clip_len,
                            "meaning": "latent_actions[t] is the latent action of transition t -> t + frame_skip; -1: none"})
    return actions


NAMES_FILE = "action_names.json"  # beside the LAM's weights: what each latent id most often is
USED_SHARE = 0.01  # an id given to fewer transitions than this is shown as unused


def name_latent_actions(latent: np.ndarray, true_actions: np.ndarray, meanings: list[str],
                        num_actions: int) -> dict[str, list]:
    """For each latent id, the true action it co-occurs with most (effect-identical actions
    merged, FIRE variants with their move) and that action's share of the id's transitions.

    latent, true_actions [N] aligned per transition (latent -1: none). Returns {"names": [A]
    names or None for an id never seen, "share": [A] in [0, 1]}.
    """
    keep = latent >= 0
    merged, merged_names = merge_equivalent_actions(true_actions[keep], meanings)
    counts = np.zeros((num_actions, len(merged_names)), dtype=np.int64)  # [A, merged actions]
    np.add.at(counts, (latent[keep], merged), 1)
    totals = counts.sum(axis=1)
    names = [merged_names[int(row.argmax())] if total else None for row, total in zip(counts, totals)]
    share = [float(row.max() / total) if total else 0.0 for row, total in zip(counts, totals)]
    return {"names": names, "share": share}


def action_labels(names_doc: dict | None, num_actions: int) -> list[str]:
    """One short label per latent id for people (play's buttons): the true action each id most
    often matches in each labelled dataset, or "unused" / "" when nothing is known."""
    if not names_doc:
        return [""] * num_actions
    usage = names_doc.get("usage") or [1.0] * num_actions
    labels = []
    for action in range(num_actions):
        if usage[action] < USED_SHARE:
            labels.append("unused")
            continue
        parts = [f"{doc['names'][action]} ({dataset})" for dataset, doc in sorted(names_doc.get("datasets", {}).items())
                 if doc["names"][action] is not None]
        labels.append(", ".join(parts))
    return labels
