"""Stage `tokenize`: every frame of every training dataset -> cached patch tokens.

The tokenizer's encoder attends within a frame only, so a frame's tokens are a function of
that frame alone: they can be computed once, stored 1:1 with the frame store
(data/tokens/NAME.zarr, `tokens` [N, P]) and read by the dynamics model at any clip start
and frame skip, without the tokenizer ever running inside its training loop.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange

from tinyworlds.core.atomic import atomic_output
from tinyworlds.core.device import device_for
from tinyworlds.core.params import Layout, dataset_names, section
from tinyworlds.data.clips import open_array
from tinyworlds.data.stores import file_sha256
from tinyworlds.models.checkpoint import load_model
from tinyworlds.models.pixels import to_model
from tinyworlds.models.tokenizer import VideoTokenizer

TOKENS_PER_CHUNK = 1024  # frames per zarr chunk: [1024, P] uint16 is 128 KiB at P = 64


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.int32)



@torch.inference_mode()
def encode_frames(tokenizer: VideoTokenizer, frames_uint8: np.ndarray, device: torch.device) -> np.ndarray:
    """uint8 frames [N, H, W, C] -> token ids [N, P], each frame encoded on its own."""
    frames = torch.from_numpy(np.ascontiguousarray(frames_uint8)).to(device)
    frames = rearrange(frames, "n h w c -> n 1 c h w")  # [N, T=1, C, H, W]
    tokens = tokenizer.encode(to_model(frames))  # [N, 1, P]
    return rearrange(tokens, "n 1 p -> n p").cpu().numpy()


def tokenize_store(tokenizer: VideoTokenizer, frames_path: Path, out: Path, *, batch_size: int,
                   device: torch.device, attrs: dict[str, Any], progress: bool = True) -> int:
    """Write `out` (zarr, `tokens` [N, P]) for the frame store at `frames_path`; returns N."""
    import zarr
    from rich.progress import Progress

    frames = open_array(frames_path, "frames")
    count, patches = frames.shape[0], tokenizer.num_patches
    with atomic_output(out) as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        tokens = group.create_array(
            "tokens", shape=(count, patches), dtype=token_dtype(tokenizer.vocab_size),
            chunks=(min(TOKENS_PER_CHUNK, max(count, 1)), patches),
        )
        with Progress(disable=not (progress and sys.stderr.isatty())) as bar:
            task = bar.add_task(f"tokenize {frames_path.name}", total=count)
            for start in range(0, count, batch_size):
                stop = min(count, start + batch_size)
                tokens[start:stop] = encode_frames(tokenizer, frames[start:stop], device)
                bar.update(task, advance=stop - start)
        group.attrs.update({**attrs, "frames_store": str(frames_path), "frames": count, "num_patches": patches,
                            "vocab_size": tokenizer.vocab_size, "grid": int(round(patches**0.5))})
    return count


def tokenize(params: dict[str, Any], root: Path = Path(".")) -> dict[str, int]:
    layout = Layout(root)
    device = device_for(params)
    model_dir = layout.model("tokenizer")
    tokenizer = load_model(model_dir, device=device).eval()
    batch_size = int(section(params, "tokenize", "batch_size"))
    # Which tokenizer made this cache.
    attrs = {"tokenizer_sha256": file_sha256(model_dir / "model.safetensors")}
    written = {}
    for name in dataset_names(params):
        written[name] = tokenize_store(
            tokenizer, layout.frames(name), layout.tokens(name), batch_size=batch_size, device=device, attrs=attrs
        )
        print(f"tokenize: {name}: {written[name]} frames -> {layout.tokens(name)}", file=sys.stderr)
    return written
