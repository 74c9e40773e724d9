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
from tinyworlds.data.clips import TRAIN, SplitConfig, frame_labels, open_array
from tinyworlds.data.stores import open_frame_store
from tinyworlds.metrics.objects import merge_equivalent_actions
from tinyworlds.models.lam import LatentActionModel, slowest_direction
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
def transition_latents(model: LatentActionModel, frames, *, clip_len: int, frame_skip: int,
                       device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Raw latent [N, L] of every transition t -> t + frame_skip of a frame array [N, H, W, C];
    NaN where t + frame_skip is past the end."""
    count = frames.shape[0]
    latents = np.full((count, len(model.config.levels)), np.nan, dtype=np.float32)
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
            rows = model.latents(to_model(clips)).float().cpu().numpy()  # [B, T-1, L]
            for start, row in zip(batch_starts, rows):
                latents[sequence[start : start + length - 1]] = row
    return latents


def video_latents(model: LatentActionModel, frames_path: Path | str, *, clip_len: int, frame_skip: int,
                  device: torch.device, storage_options: dict | None = None) -> np.ndarray:
    """`transition_latents` of a frame store [N, L], NaN also across a drop_idle cut (a jump, not an action)."""
    latents = transition_latents(model, open_array(frames_path, "frames", storage_options), clip_len=clip_len,
                                 frame_skip=frame_skip, device=device)
    segment = open_frame_store(frames_path, storage_options).segment
    if segment is not None:
        latents[:-frame_skip][segment[:-frame_skip] != segment[frame_skip:]] = np.nan
    return latents


def consecutive_pairs(latents: np.ndarray, frame_skip: int, labels: np.ndarray | None = None) -> np.ndarray:
    """Transitions t [n] whose latent and the next one's (t + frame_skip) are known, and (frame
    split labels [N] given) whose three frames are all in the training split."""
    known = np.isfinite(latents).all(axis=1)  # [N]
    t = np.arange(max(len(latents) - frame_skip, 0))
    ok = known[t] & known[t + frame_skip]
    if labels is not None:
        train = np.append(labels == TRAIN, np.zeros(frame_skip, dtype=bool))  # [N + skip]: past the end is not
        ok &= train[t] & train[t + frame_skip] & train[t + 2 * frame_skip]
    return t[ok]


def fit_direction(latents: list[np.ndarray], pairs: list[np.ndarray], frame_skip: int) -> dict:
    """`slowest_direction` over the consecutive transitions t, t + frame_skip (`consecutive_pairs`)
    of one or more videos' latents [N, L]. Returns the readout entry {"direction": [L],
    "slowness": float, "pairs": int}."""
    before = np.concatenate([latent[t] for latent, t in zip(latents, pairs)])  # [n, L]
    after = np.concatenate([latent[t + frame_skip] for latent, t in zip(latents, pairs)])  # [n, L]
    direction, slowness = slowest_direction(torch.from_numpy(before), torch.from_numpy(after))
    return {"direction": direction.tolist(), "slowness": slowness, "pairs": len(before)}


def read_latent_actions(model: LatentActionModel, latents: np.ndarray, direction: list[float] | None = None) -> np.ndarray:
    """Latents [N, L] (NaN: none) -> action ids [N] int16 by the model's readout, -1 where none."""
    known = np.isfinite(latents).all(axis=1)
    actions = np.full(len(latents), -1, dtype=np.int16)
    if known.any():
        along = None if direction is None else torch.tensor(direction)
        actions[known] = model.read_ids(torch.from_numpy(latents[known]), along).numpy()
    return actions


def write_latent_actions(out: Path, actions: np.ndarray, *, frames_path: Path | str, num_actions: int,
                         frame_skip: int, clip_len: int) -> None:
    """data/latent_actions/NAME.zarr: `latent_actions` [N] beside what they mean; written whole or not at all."""
    import zarr

    with atomic_output(out) as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        group.create_array("latent_actions", data=actions, chunks=(min(len(actions), 65536),))
        group.attrs.update({"frames_store": str(frames_path), "num_actions": num_actions,
                            "frame_skip": frame_skip, "clip_len": clip_len,
                            "meaning": "latent_actions[t] is the latent action of transition t -> t + frame_skip; -1: none"})


READOUT_FILE = "readout.json"  # beside the LAM's weights: each video's slowest direction (`readout: direction`)


def fit_readout(latents: dict[str, np.ndarray], split: SplitConfig, frame_skip: int) -> dict:
    """Each video's slowest direction from its training frames' latents [N, L], and one over
    all of them for clips of other videos: {"datasets": {name: entry}, "pooled": entry}
    (`fit_direction`). Held-out frames stay out, so the evaluation scores ids it did not fit."""
    pairs = {name: consecutive_pairs(latent, frame_skip, frame_labels(len(latent), split)) for name, latent in latents.items()}
    return {"datasets": {name: fit_direction([latents[name]], [pairs[name]], frame_skip) for name in latents},
            "pooled": fit_direction(list(latents.values()), list(pairs.values()), frame_skip)}


def readout_direction(readout: dict | None, dataset: str | None) -> list[float] | None:
    """The direction to read `dataset`'s ids with: its own, the pooled one for a video the LAM
    was not fitted on (or None), or None without a readout."""
    if readout is None:
        return None
    return readout["datasets"].get(dataset, readout["pooled"])["direction"]


def cache_latent_actions(model: LatentActionModel, videos: dict[str, tuple[Path | str, Path]], *, split: SplitConfig,
                         clip_len: int, frame_skip: int, device: torch.device,
                         storage_options: dict | None = None) -> tuple[dict[str, np.ndarray], dict | None]:
    """Label every transition of each video {name: (frame store, latent-action store to write)}
    by the model's readout and write the ids. With `readout: direction` each video's direction
    is fitted first (`fit_readout`, on its training split). Returns ({name: ids [N]}, the
    readout or None), so the caller can keep the readout beside the weights."""
    latents = {name: video_latents(model, frames_path, clip_len=clip_len, frame_skip=frame_skip, device=device,
                                   storage_options=storage_options) for name, (frames_path, _) in videos.items()}
    readout = fit_readout(latents, split, frame_skip) if model.config.readout == "direction" else None
    actions = {}
    for name, (frames_path, out) in videos.items():
        actions[name] = read_latent_actions(model, latents[name], readout_direction(readout, name))
        write_latent_actions(out, actions[name], frames_path=frames_path, num_actions=model.num_actions,
                             frame_skip=frame_skip, clip_len=clip_len)
    return actions, readout


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


def named_directions(names_doc: dict | None) -> dict[str, int]:
    """{"up" / "down" / "left" / "right": latent id} for the arrow keys, from the true actions
    the ids most often match (`name_latent_actions`; ALE's names, so Pong's paddle goes up on
    RIGHT): each direction gets the id with the largest share of it summed over the datasets.
    Empty without names; a direction no id is named after is left out."""
    scores: dict[str, dict[int, float]] = {}
    for doc in (names_doc or {}).get("datasets", {}).values():
        for action, (name, share) in enumerate(zip(doc["names"], doc["share"])):
            if name and name.lower() in ("up", "down", "left", "right"):
                by_id = scores.setdefault(name.lower(), {})
                by_id[action] = by_id.get(action, 0.0) + share
    return {direction: max(by_id, key=by_id.get) for direction, by_id in scores.items()}
