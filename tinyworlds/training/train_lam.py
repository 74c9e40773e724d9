"""Stage `train_lam`: the latent action model, then the action id of every transition.

After training, the LAM labels every transition of every training dataset into
data/latent_actions/NAME.zarr (`tinyworlds.inference.latent_actions`), which is what the
dynamics model trains on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinyworlds.core.atomic import write_json
from tinyworlds.core.params import section
from tinyworlds.data.stores import open_frame_store
from tinyworlds.data.roots import split_config
from tinyworlds.inference.latent_actions import NAMES_FILE, READOUT_FILE, cache_latent_actions, name_latent_actions
from tinyworlds.models.lam import LatentActionConfig, LatentActionModel
from tinyworlds.models.pixels import to_model, to_uint8
from tinyworlds.training import setup
from tinyworlds.training.distributed import is_main_process
from tinyworlds.training.loop import Trainer
from tinyworlds.training.train_tokenizer import preview_clips

STAGE = "train_lam"


def lam_loss(model: LatentActionModel, batch: dict[str, torch.Tensor]):
    return model.loss(to_model(batch["frames"]), batch["video"])


def train_lam(params: dict[str, Any], root: Path = Path(".")) -> dict[str, float]:
    stage = setup.prepare_frame_stage(params, "lam", LatentActionConfig, root)
    layout, names, length, device = stage.layout, stage.names, stage.clip_len, stage.device
    train_config, train_set, val_set = stage.train_config, stage.train_set, stage.val_set
    frame_skip = int(section(params, "data", "frame_skip"))

    torch.manual_seed(train_config.seed)
    model = LatentActionModel(stage.model_config)
    preview = preview_clips(val_set).to(device) if len(val_set) else None

    with setup.open_tracking(STAGE, params, names, stage.config) as run:

        def show_predictions(model: LatentActionModel, step: int) -> None:
            if preview is None:
                return
            frames = to_model(preview)  # [R, T, C, H, W]
            codes = model.fsq(model.latents(frames))  # [R, T-1, L]
            predicted = model.predict_next(frames[:, :-1], codes)  # [R, T-1, C, H, W]: frames 1..T-1
            # Row pairs: the real clip, then frame 0 followed by the predicted next frames.
            rows = [r for truth, pred in zip(preview, to_uint8(predicted)) for r in (truth, torch.cat([truth[:1], pred]))]
            run.log_image(setup.image_grid(rows), f"predictions/step_{step:06d}.png")

        trainer = Trainer(
            STAGE, model, lam_loss, train_set, val_set, train_config, device,
            layout.train_state(STAGE), stage.fingerprint, log=run.log_metrics, on_validate=show_predictions,
        )
        result = trainer.fit()
        if not is_main_process():
            return {}  # rank 0 labels the transitions and writes the outputs
        result.model.eval()
        model = result.model
        labelled, readout = cache_latent_actions(
            model, {name: (stage.data.frames(name), layout.latent_actions(name)) for name in names},
            split=split_config(params), clip_len=length, frame_skip=frame_skip, device=device,
            storage_options=stage.data.storage_options)
        usage = np.zeros(model.num_actions)
        named = {}  # per dataset with recorded actions: what each latent id most often is
        for name, actions in labelled.items():
            usage += np.bincount(actions[actions >= 0], minlength=model.num_actions)
            store = open_frame_store(stage.data.frames(name), stage.data.storage_options)
            if store.true_actions is not None and store.attrs.get("action_meanings"):
                named[name] = name_latent_actions(actions, store.true_actions.astype(np.int64),
                                                  list(store.attrs["action_meanings"]), model.num_actions)
        fractions = usage / max(usage.sum(), 1)
        entropy = float(-(fractions[fractions > 0] * np.log(fractions[fractions > 0])).sum())
        extra = {"actions_used": float((fractions > 0.01).sum()), "action_entropy_nats": entropy,
                 **{f"action_{i}_fraction": float(f) for i, f in enumerate(fractions)}}
        if readout is not None:
            # How held each video's direction is (0: never changes within a held move); MLflow shows it per run.
            extra |= {f"{name}_direction_slowness": entry["slowness"] for name, entry in readout["datasets"].items()}
        final = setup.finish_training(STAGE, result, layout, run, layout.model("lam"), extra)
        # Beside the weights: `tinyworlds play` labels its buttons with the names, and every
        # later reader of ids (evaluate, play, dream) reads each video's direction from the readout.
        write_json({"usage": fractions.tolist(), "datasets": named}, layout.model("lam") / NAMES_FILE)
        if readout is not None:
            write_json(readout, layout.model("lam") / READOUT_FILE)
        return final
