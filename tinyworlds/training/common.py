"""What the training stages share: configs from params, datasets from the layout, tracking."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange

from tinyworlds.data.clips import ClipDataset, SplitConfig, VideoArrays, open_array
from tinyworlds.data.stores import Location, is_url, open_zarr_group
from tinyworlds.errors import TinyWorldsError
from tinyworlds.params import Layout, dataset_names, section
from tinyworlds.training import distributed
from tinyworlds.training.loop import TrainConfig, fingerprint

# Stores smaller than this are read into memory once: a clip is then a slice instead of a
# chunk decode, which keeps the loader far ahead of training on a 2-core machine.
PRELOAD_MAX_BYTES = 2 * 1024**3


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


def build_model_config(config_cls, params: dict[str, Any], stage_section: str, **derived):
    """`<stage_section>.model` from params plus values derived from the data (frame size...)."""
    given = dict(section(params, stage_section, "model"))
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise TinyWorldsError(f"params.yaml: unknown {stage_section}.model setting(s) {unknown}; known: {sorted(known)}")
    return config_cls(**{**given, **derived})


def clip_len(params: dict[str, Any], stage_section: str) -> int:
    return int(section(params, stage_section, "train", "clip_len"))


def split_config(params: dict[str, Any]) -> SplitConfig:
    return SplitConfig(**section(params, "data", "split"))


def device_for(params: dict[str, Any]) -> torch.device:
    """`train.device`; under torchrun with CUDA, this rank's GPU (cuda:LOCAL_RANK)."""
    return distributed.rank_device(str(params.get("train", {}).get("device", "auto")))


@dataclass(frozen=True)
class DataRoot:
    """Where the training stages read frame, token and latent-action stores: `data.root`.

    `data` (the default) is the project's data/ folder: the stores ingest, tokenize and
    train_actions write (`Layout`). Another folder, or an fsspec URL (s3://bucket/tinyworlds),
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

    def identity(self, kind: str, name: str) -> dict[str, Any]:
        """`store_identity` of the store read, with a warning if a local copy differs from it."""
        found = store_identity(self.store(kind, name), self.storage_options)
        local = getattr(self.layout, kind)(name)
        if self.root is not None and local.exists() and distributed.is_main_process():
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
    return [VideoArrays(name, {"frames": (data.frames(name), "frames")}, data.storage_options) for name in names]



def image_grid(rows: list[torch.Tensor]) -> np.ndarray:
    """Rows of uint8 clips [T, C, H, W] -> one uint8 image [rows*H, T*W, 3] (gray -> RGB)."""
    clips = torch.stack([r.detach().cpu() for r in rows])  # [R, T, C, H, W]
    if clips.shape[2] == 1:
        clips = clips.expand(-1, -1, 3, -1, -1)
    return rearrange(clips, "r t c h w -> (r h) (t w) c").numpy()


def open_tracking(stage: str, params: dict[str, Any], datasets: list[str], config: dict[str, Any]):
    """The MLflow run of this stage (see tinyworlds.tracking), checked before training starts;
    on ranks other than 0 a `ReplicaRun` that logs nothing."""
    from tinyworlds.tracking import StageRun

    if not distributed.is_main_process():
        return ReplicaRun()
    tracking = params.get("tracking", {}) or {}
    return StageRun(
        stage=stage,
        config=config,
        datasets=datasets,
        experiment=tracking.get("experiment") or "tinyworlds",
        tracking_uri=tracking.get("uri"),
    )



class ReplicaRun:
    """The tracking run of a rank other than 0: rank 0 logs for the whole process group."""

    def __enter__(self) -> ReplicaRun:
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_image(self, image, artifact_file: str) -> None:
        pass


def resolved_config(**parts: Any) -> dict[str, Any]:
    """A JSON-able dict of dataclass configs and plain values, for MLflow params and fingerprints."""
    out = {}
    for key, value in parts.items():
        out[key] = asdict(value) if hasattr(value, "__dataclass_fields__") else value
    return out


def finish_training(stage: str, result, layout: Layout, run, model_dir: Path, extra: dict[str, float]) -> dict[str, float]:
    """Write the trained model, the metrics JSON and the loss curve CSV; log them to MLflow."""
    from tinyworlds.models.checkpoint import count_parameters, save_model
    from tinyworlds.training.loop import write_history_csv, write_metrics_json

    save_model(result.model, model_dir)
    final = {**result.final, **extra, "steps": result.step, "parameters": count_parameters(result.model)}
    final = {k: float(v) for k, v in final.items()}
    write_metrics_json(final, layout.metrics(stage))
    write_history_csv(result.history, layout.history(stage))
    run.log_final(final)
    run.log_artifact(model_dir / "config.json")
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
    identity = fingerprint(config, [data.identity("frames", n) for n in names])
    return FrameStage(layout, data, names, length, model_config, train_config, device, train_set, val_set, config, identity)
