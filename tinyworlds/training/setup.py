"""What the training stages share: the train config, the frame-stage setup, tracking, outputs."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange

from tinyworlds.core.atomic import write_csv, write_json
from tinyworlds.core.config import build_model_config, clip_len, resolved_config
from tinyworlds.core.device import device_for
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.core.params import Layout, dataset_names, section
from tinyworlds.data.clips import ClipDataset
from tinyworlds.data.roots import (
    DataRoot,
    clip_datasets,
    data_root,
    frame_store_shape,
    frame_videos,
)
from tinyworlds.tracking.run import open_stage_run
from tinyworlds.training import distributed
from tinyworlds.training.loop import TrainConfig, fingerprint


def build_train_config(params: dict[str, Any], stage_section: str) -> TrainConfig:
    """The shared `train` section overlaid with `<stage_section>.train` (minus data-shape keys)."""
    shared = dict(section(params, "train"))
    # Where and on how many processes, not what is trained: a run resumes on another device
    # or number of processes (the batches are the same).
    shared.pop("device", None)
    shared.pop("nproc", None)
    own = {k: v for k, v in dict(section(params, stage_section, "train")).items() if k != "clip_len"}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted((set(shared) | set(own)) - known)
    if unknown:
        raise TinyWorldsError(f"params.yaml: unknown training setting(s) {unknown} in train / {stage_section}.train")
    config = TrainConfig(**{**shared, **own})
    # batch_size is the global batch, split evenly over the processes: say so before they start.
    if config.batch_size % distributed.world_size():
        raise TinyWorldsError(f"params.yaml: {stage_section}.train.batch_size={config.batch_size}: "
                              f"must divide by the number of processes ({distributed.world_size()})")
    return config


def image_grid(rows: list[torch.Tensor]) -> np.ndarray:
    """Rows of uint8 clips [T, C, H, W] -> one uint8 image [rows*H, T*W, 3] (gray -> RGB)."""
    clips = torch.stack([r.detach().cpu() for r in rows])  # [R, T, C, H, W]
    if clips.shape[2] == 1:
        clips = clips.expand(-1, -1, 3, -1, -1)
    return rearrange(clips, "r t c h w -> (r h) (t w) c").numpy()


def open_tracking(stage: str, params: dict[str, Any], datasets: list[str], config: dict[str, Any]):
    """This stage's MLflow run; on ranks other than 0 one that logs nothing (rank 0 logs for all)."""
    return open_stage_run(stage, params, datasets, config, replica=not distributed.is_main_process())


def finish_training(stage: str, result, layout: Layout, run, model_dir: Path, extra: dict[str, float]) -> dict[str, float]:
    """Write the trained model, the metrics JSON and the loss curve CSV; log them to MLflow."""
    from tinyworlds.models.checkpoint import count_parameters, save_model

    save_model(result.model, model_dir)
    final = {**result.final, **extra, "steps": result.step, "parameters": count_parameters(result.model)}
    final = {k: float(v) for k, v in final.items()}
    write_json(final, layout.metrics(stage))
    write_csv(result.history, layout.history(stage))
    run.log_final(final)
    run.attach_model(model_dir)  # uploaded as artifacts models/<kind>/ when the run ends well
    run.set_tags({"tinyworlds.model_dir": str(model_dir), "tinyworlds.resumed_from_step": str(result.resumed_from),
                  "tinyworlds.processes": str(distributed.world_size())})
    return final


@dataclass
class FrameStage:
    """What a stage that trains on frame clips (tokenizer, latent actions) starts from."""

    layout: Layout
    data: DataRoot
    names: list[str]
    clip_len: int
    model_config: Any
    train_config: TrainConfig
    device: torch.device
    train_set: ClipDataset
    val_set: ClipDataset
    config: dict[str, Any]  # the full resolved config: MLflow params and the resume fingerprint
    fingerprint: str


def prepare_frame_stage(params: dict[str, Any], stage_section: str, config_cls, root: Path) -> FrameStage:
    """Datasets, configs and device for a model trained on the frames of `data.train_on`."""
    layout = Layout(root)
    data = data_root(params, layout)
    names = dataset_names(params)
    size, channels = frame_store_shape(data, names)
    length = clip_len(params, stage_section)
    model_config = build_model_config(config_cls, params, stage_section, frame_size=size, channels=channels, max_frames=length)
    train_config = build_train_config(params, stage_section)
    device = device_for(params)
    train_set, val_set = clip_datasets(params, frame_videos(data, names), length)
    config = resolved_config(model=model_config, train=train_config, data=section(params, "data"), device=str(device))
    identity = fingerprint(config, [data.identity("frames", n, warn=distributed.is_main_process()) for n in names])
    return FrameStage(layout, data, names, length, model_config, train_config, device, train_set, val_set, config, identity)
