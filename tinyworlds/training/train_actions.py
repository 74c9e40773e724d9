"""Stage `train_actions`: the latent action model, then the action id of every transition.

After training, the LAM labels every transition t -> t + frame_skip of every training
dataset; the ids go to data/latent_actions/NAME.zarr (`actions` [N], aligned 1:1 with the
frame store, -1 where t + frame_skip is past the end), which is what the dynamics model
trains on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange

from tinyworlds.atomic import atomic_output
from tinyworlds.data.clips import open_array
from tinyworlds.models.lam import LatentActionConfig, LatentActionModel
from tinyworlds.models.pixels import to_model, to_uint8
from tinyworlds.params import section
from tinyworlds.training import common
from tinyworlds.training.distributed import is_main_process
from tinyworlds.training.loop import Trainer
from tinyworlds.training.train_tokenizer import preview_clips

STAGE = "train_actions"


def lam_loss(model: LatentActionModel, batch: dict[str, torch.Tensor]):
    return model.loss(to_model(batch["frames"]), batch["video"])


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
    with atomic_output(out) as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        group.create_array("actions", data=actions, chunks=(min(len(actions), 65536),))
        group.attrs.update({"frames_store": str(frames_path), "num_actions": model.num_actions,
                            "frame_skip": frame_skip, "clip_len": clip_len,
                            "meaning": "actions[t] is the latent action of transition t -> t + frame_skip; -1: none"})
    return actions


def train_actions(params: dict[str, Any], root: Path = Path(".")) -> dict[str, float]:
    stage = common.prepare_frame_stage(params, "actions", LatentActionConfig, root)
    layout, names, length, device = stage.layout, stage.names, stage.clip_len, stage.device
    train_config, train_set, val_set = stage.train_config, stage.train_set, stage.val_set
    frame_skip = int(section(params, "data", "frame_skip"))

    torch.manual_seed(train_config.seed)
    model = LatentActionModel(stage.model_config)
    preview = preview_clips(val_set).to(device) if len(val_set) else None

    with common.open_tracking(STAGE, params, names, stage.config) as run:

        def show_predictions(model: LatentActionModel, step: int) -> None:
            if preview is None:
                return
            frames = to_model(preview)  # [R, T, C, H, W]
            codes = model.fsq(model.latents(frames))  # [R, T-1, L]
            predicted = model.predict(frames[:, :-1], codes)  # [R, T-1, C, H, W]: frames 1..T-1
            # Row pairs: the real clip, then frame 0 followed by the predicted next frames.
            rows = [r for truth, pred in zip(preview, to_uint8(predicted)) for r in (truth, torch.cat([truth[:1], pred]))]
            run.log_image(common.image_grid(rows), f"predictions/step_{step:06d}.png")

        trainer = Trainer(
            STAGE, model, lam_loss, train_set, val_set, train_config, device,
            layout.train_state(STAGE), stage.fingerprint, log=run.log_metrics, on_validate=show_predictions,
        )
        result = trainer.fit()
        if not is_main_process():
            return {}  # rank 0 labels the transitions and writes the outputs
        result.model.eval()
        usage = np.zeros(result.model.num_actions)
        for name in names:
            actions = cache_latent_actions(result.model, stage.data.frames(name), layout.latent_actions(name),
                                           clip_len=length, frame_skip=frame_skip, device=device,
                                           storage_options=stage.data.storage_options)
            usage += np.bincount(actions[actions >= 0], minlength=result.model.num_actions)
        fractions = usage / max(usage.sum(), 1)
        entropy = float(-(fractions[fractions > 0] * np.log(fractions[fractions > 0])).sum())
        extra = {"actions_used": float((fractions > 0.01).sum()), "action_entropy_nats": entropy,
                 **{f"action_{i}_fraction": float(f) for i, f in enumerate(fractions)}}
        return common.finish_training(STAGE, result, layout, run, layout.model("actions"), extra)
