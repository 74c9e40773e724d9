"""Stage `train_dynamics`: MaskGIT dynamics on the cached tokens and latent actions.

The loop reads only data/tokens and data/latent_actions: neither the tokenizer nor the LAM
runs inside it. The tokenizer is loaded once, outside the loop, to turn preview predictions
into images for MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tinyworlds.core.config import build_model_config, clip_len, resolved_config
from tinyworlds.core.device import device_for
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.core.params import Layout, dataset_names, section
from tinyworlds.data.clips import VideoArrays
from tinyworlds.data.roots import DataRoot, clip_datasets, data_root
from tinyworlds.data.stores import open_zarr_group
from tinyworlds.models.checkpoint import load_model
from tinyworlds.models.dynamics import DynamicsConfig, DynamicsModel
from tinyworlds.models.pixels import to_uint8
from tinyworlds.training import setup
from tinyworlds.training.distributed import is_main_process
from tinyworlds.training.loop import Trainer, fingerprint

STAGE = "train_dynamics"


def dynamics_loss(model: DynamicsModel, batch: dict[str, torch.Tensor]):
    return model.loss(batch["tokens"], batch["latent_actions"])


def token_videos(data: DataRoot, names: list[str]) -> list[VideoArrays]:
    return [
        VideoArrays(name, {"tokens": (data.tokens(name), "tokens"), "latent_actions": (data.latent_actions(name), "latent_actions")},
                    data.storage_options, frame_store=data.frames(name))
        for name in names
    ]


def cache_facts(data: DataRoot, names: list[str]) -> dict[str, int]:
    """vocab_size, num_patches and num_actions, read from the caches and checked to agree."""
    facts = {}
    for name in names:
        tokens = dict(open_zarr_group(data.tokens(name), data.storage_options).attrs)
        actions = dict(open_zarr_group(data.latent_actions(name), data.storage_options).attrs)
        found = {"vocab_size": tokens["vocab_size"], "num_patches": tokens["num_patches"], "num_actions": actions["num_actions"]}
        if facts and found != facts:
            raise TinyWorldsError(f"{name}: token/action caches disagree with the other datasets ({found} vs {facts})")
        facts = found
    return facts


def train_dynamics(params: dict[str, Any], root: Path = Path(".")) -> dict[str, float]:
    layout = Layout(root)
    data = data_root(params, layout)
    names = dataset_names(params)
    length = clip_len(params, "dynamics")
    model_config = build_model_config(
        DynamicsConfig, params, "dynamics", max_frames=length, **cache_facts(data, names)
    )
    train_config = setup.build_train_config(params, "dynamics")
    device = device_for(params)
    train_set, val_set = clip_datasets(params, token_videos(data, names), length)
    config = resolved_config(model=model_config, train=train_config, data=section(params, "data"), device=str(device))
    identities = [data.identity(kind, n, warn=is_main_process()) for n in names for kind in ("tokens", "latent_actions")]
    state_fingerprint = fingerprint(config, identities)

    torch.manual_seed(train_config.seed)
    model = DynamicsModel(model_config)
    tokenizer = load_model(layout.model("tokenizer"), device=device).eval()
    picks = torch.linspace(0, max(len(val_set) - 1, 0), 4).long().unique().tolist() if len(val_set) else []
    preview = [val_set[i] for i in picks]

    with setup.open_tracking(STAGE, params, names, config) as run:

        def show_predictions(model: DynamicsModel, step: int) -> None:
            if not preview:
                return
            tokens = torch.stack([p["tokens"] for p in preview]).to(device)  # [R, T, P]
            actions = torch.stack([p["latent_actions"] for p in preview]).to(device)  # [R, T-1]
            # Predict the last frame from the others, with the action the LAM saw there.
            predicted = model.generate(tokens[:, :-1], actions[:, -1:], context_actions=actions[:, :-1],
                                       steps=8, temperature=0.0)  # [R, 1, P]
            truth = to_uint8(tokenizer.decode(tokens))  # [R, T, C, H, W]
            guess = to_uint8(tokenizer.decode(torch.cat([tokens[:, :-1], predicted], dim=1)))
            rows = [r for pair in zip(truth, guess) for r in pair]
            run.log_image(setup.image_grid(rows), f"predictions/step_{step:06d}.png")

        trainer = Trainer(
            STAGE, model, dynamics_loss, train_set, val_set, train_config, device,
            layout.train_state(STAGE), state_fingerprint,
            log=run.log_metrics, on_validate=show_predictions, tokens_per_item=length * model_config.num_patches,
        )
        result = trainer.fit()
        if not is_main_process():
            return {}  # rank 0 writes the outputs
        return setup.finish_training(STAGE, result, layout, run, layout.model("dynamics"), {})
