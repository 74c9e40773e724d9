"""Stage `train_tokenizer`: the FSQ-VAE video tokenizer on the frames of `data.train_on`."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange

from tinyworlds.data.clips import open_array
from tinyworlds.metrics import finite_mean, psnr
from tinyworlds.metrics.objects import background_frame
from tinyworlds.models.fsq import id_usage, perplexity
from tinyworlds.models.pixels import to_model, to_uint8
from tinyworlds.models.tokenizer import TokenizerConfig, VideoTokenizer
from tinyworlds.training import setup
from tinyworlds.training.distributed import is_main_process
from tinyworlds.training.loop import Trainer

STAGE = "train_tokenizer"


def tokenizer_loss(model: VideoTokenizer, batch: dict[str, torch.Tensor], backgrounds: torch.Tensor | None = None):
    """The model's loss on a batch; `backgrounds` [V, C, H, W] (model scale), one per training
    video, let it weigh the objects (`TokenizerConfig.foreground_weight`)."""
    frames = to_model(batch["frames"])  # [B, T, C, H, W]
    background = None if backgrounds is None else backgrounds[batch["video"]]  # [B, C, H, W]
    return model.loss(frames, background)


def video_backgrounds(stage: setup.FrameStage) -> torch.Tensor:
    """Each training video's static background (its per-pixel median frame): [V, C, H, W] on
    the model's scale, in the order of the clips' `video` index."""
    frames = [background_frame(open_array(stage.data.frames(name), "frames", stage.data.storage_options))
              for name in stage.names]  # each [H, W, C] uint8
    return to_model(rearrange(torch.from_numpy(np.stack(frames)), "v h w c -> v c h w"))


def preview_clips(dataset, count: int = 4) -> torch.Tensor:
    """`count` evenly spaced validation clips, uint8 [R, T, C, H, W], for image grids."""
    picks = torch.linspace(0, len(dataset) - 1, count).long().unique().tolist()
    return torch.stack([dataset[i]["frames"] for i in picks])


@torch.no_grad()
def reconstruction_metrics(model: VideoTokenizer, dataset, device, batch_size: int, max_batches: int = 16) -> dict[str, float]:
    """Validation PSNR (dB, uint8 scale) and codebook usage of the tokens."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    scores, usage = [], torch.zeros(model.vocab_size, device=device)
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        frames = batch["frames"].to(device)  # [B, T, C, H, W] uint8
        reconstruction, tokens = model(to_model(frames))
        scores.append(psnr(to_uint8(reconstruction), frames, dims=(2, 3, 4)).flatten())
        usage += id_usage(tokens, model.vocab_size) * tokens.numel()
    fractions = usage / usage.sum().clamp(min=1)
    return {
        "val_psnr": finite_mean(torch.cat(scores)) if scores else float("nan"),
        "codebook_used": float((fractions > 0).float().mean()),
        "codebook_perplexity": float(perplexity(fractions)),
    }


def train_tokenizer(params: dict[str, Any], root: Path = Path(".")) -> dict[str, float]:
    stage = setup.prepare_frame_stage(params, "tokenizer", TokenizerConfig, root)
    layout, names, length, device = stage.layout, stage.names, stage.clip_len, stage.device
    train_config, train_set, val_set = stage.train_config, stage.train_set, stage.val_set

    backgrounds = video_backgrounds(stage).to(device) if stage.model_config.weighs_objects else None
    torch.manual_seed(train_config.seed)
    model = VideoTokenizer(stage.model_config)
    preview = preview_clips(val_set).to(device) if len(val_set) else None

    with setup.open_tracking(STAGE, params, names, stage.config) as run:

        def show_reconstructions(model: VideoTokenizer, step: int) -> None:
            if preview is None:
                return
            reconstruction, _ = model(to_model(preview))
            rows = [row for pair in zip(preview, to_uint8(reconstruction)) for row in pair]  # truth, recon, ...
            run.log_image(setup.image_grid(rows), f"reconstructions/step_{step:06d}.png")

        trainer = Trainer(
            STAGE, model, functools.partial(tokenizer_loss, backgrounds=backgrounds), train_set, val_set, train_config, device,
            layout.train_state(STAGE), stage.fingerprint,
            log=run.log_metrics, on_validate=show_reconstructions, tokens_per_item=length * model.num_patches,
        )
        result = trainer.fit()
        if not is_main_process():
            return {}  # rank 0 evaluates and writes the outputs
        result.model.eval()
        extra = reconstruction_metrics(result.model, val_set, device, train_config.batch_size)
        return setup.finish_training(STAGE, result, layout, run, layout.model("tokenizer"), extra)
