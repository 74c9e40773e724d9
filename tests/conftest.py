"""Shared fixtures: tiny test videos made with PyAV and the checks that compare them, tiny
random-init world models saved into throwaway projects, what a pipeline logs to MLflow, and a
headless browser."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import zarr

from tinyworlds.models import (
    DynamicsConfig,
    DynamicsModel,
    LatentActionConfig,
    LatentActionModel,
    TokenizerConfig,
    VideoTokenizer,
    save_model,
)

# Distinct solid colours: source frame j is PALETTE[j % len(PALETTE)], so an output frame's
# colour tells which source frame it was taken from.
PALETTE = np.array(
    [[230, 30, 30], [30, 200, 30], [40, 40, 220], [230, 230, 40], [40, 220, 220],
     [220, 40, 220], [250, 250, 250], [10, 10, 10], [150, 90, 30], [90, 150, 230]],
    dtype=np.uint8,
)

VP9 = "libvpx-vp9" if "libvpx-vp9" in av.codecs_available else "libvpx"


def solid_frames(n: int, width: int, height: int) -> list[np.ndarray]:
    """n frames [H, W, 3]; frame j is filled with PALETTE[j % 10]."""
    return [np.broadcast_to(PALETTE[j % len(PALETTE)], (height, width, 3)).copy() for j in range(n)]


def write_video(
    path: Path,
    frames: Sequence[np.ndarray],
    *,
    fps: float = 30,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    times: Sequence[float] | None = None,
    options: dict | None = None,
    container_options: dict | None = None,
) -> Path:
    """Encode RGB frames [H, W, 3] to `path`; `times` (seconds) gives variable-frame-rate pts."""
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        stream.options = options or {}
        time_base = Fraction(1, 1000)
        if times is not None:
            stream.codec_context.time_base = time_base
        for j, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[j] * 1000), time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decode_mp4(path: Path) -> np.ndarray:
    """Every frame of a video as uint8 RGB [T, H, W, 3]."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])  # [T, H, W, 3]


def truncate(src: Path, dst: Path, fraction: float) -> Path:
    """Copy the first `fraction` of `src`'s bytes to `dst`, like a download cut off."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def nearest_colour(frames_NHWC: np.ndarray) -> np.ndarray:
    """Index into PALETTE of each frame's mean colour: [N]."""
    means = frames_NHWC.reshape(len(frames_NHWC), -1, 3).mean(axis=1)  # [N, 3]
    return np.abs(means[:, None, :] - PALETTE[None].astype(float)).sum(-1).argmin(-1)


@pytest.fixture
def make_video(tmp_path: Path) -> Callable[..., Path]:
    """`make_video(name, n=60, width=48, height=36, frames=None, **write_video options)`."""

    def make(name: str, n: int = 60, width: int = 48, height: int = 36, frames=None, **options) -> Path:
        return write_video(tmp_path / name, frames if frames is not None else solid_frames(n, width, height), **options)

    return make


# ---------------------------------------------------------------------------------------------
# tiny trained-model projects, for what runs downstream of training (world model, dream, play)

SIZE = 16
NUM_ACTIONS = 4
WINDOW = 4  # max_frames of all three models: dreams start from 3 context frames
STORE_FRAMES = 40


def save_tiny_models(models_dir: Path, num_actions: int = NUM_ACTIONS, seed: int = 0) -> None:
    """A consistent tokenizer / LAM / dynamics triple, random init, a few thousand weights each."""
    torch.manual_seed(seed)
    shared = dict(frame_size=SIZE, channels=3, patch_size=4, embed_dim=32, num_heads=2, encoder_blocks=1,
                  decoder_blocks=1, max_frames=WINDOW)
    tokenizer = VideoTokenizer(TokenizerConfig(**shared, levels=(4, 4)))
    # 3: still and the two signs along a video's direction (readout.json is the caller's to write).
    lam = {3: dict(levels=(3, 3), antisymmetric=True, readout="direction"), 4: dict(levels=(2, 2)),
           8: dict(levels=(2, 2, 2))}[num_actions]
    actions = LatentActionModel(LatentActionConfig(**shared, **lam))
    dynamics = DynamicsModel(DynamicsConfig(
        vocab_size=tokenizer.vocab_size, num_patches=tokenizer.num_patches, num_actions=actions.num_actions,
        embed_dim=32, num_heads=2, num_blocks=1, max_frames=WINDOW,
    ))
    for kind, model in (("tokenizer", tokenizer), ("lam", actions), ("dynamics", dynamics)):
        save_model(model, models_dir / kind)


WORLD_KINDS = ("tokenizer", "lam", "dynamics")


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store to copy: MLflow's schema migrations take seconds."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments(max_results=1)  # creates the schema
    return path


def log_pipeline(models_dir: Path, experiment: str, lr: float, tracking_uri: str | None = None) -> dict[str, str]:
    """What one `dvc exp run` of the pipeline logs, in seconds: a run per training stage with a
    loss curve (lower for a higher `lr`) and its model from `models_dir` attached, and an
    evaluate run that scores the three. Returns {stage: run id, "parent": the pipeline's run}."""
    from unittest import mock

    from tinyworlds.tracking.models import weights_sha256
    from tinyworlds.tracking.run import StageRun

    ids = {}
    with mock.patch.dict(os.environ, {"TINYWORLDS_PIPELINE_RUN": f"pipe-{experiment}", "DVC_EXP_NAME": experiment}):
        for kind in WORLD_KINDS:
            config = {"model": {"embed_dim": 32}, "train": {"lr": lr, "steps": 20}}
            with StageRun(f"train_{kind}", config, datasets=["pong"], tracking_uri=tracking_uri) as run:
                for step in range(4, 21, 4):
                    validated = {"val_loss": 2.2 / (1 + lr * 100 * step)} if step % 8 == 0 else {}
                    run.log_metrics({"loss": 2.0 / (1 + lr * 100 * step), "lr": lr, **validated}, step=step)
                run.log_final({"loss": 2.0 / (1 + lr * 2000), "val_loss": 2.2 / (1 + lr * 2000), "steps": 20})
                run.attach_model(models_dir / kind)
            ids[f"train_{kind}"] = run.run_id
        scored = {"models": {kind: weights_sha256(models_dir / kind) for kind in WORLD_KINDS}}
        with StageRun("evaluate", scored, datasets=["pong"], tracking_uri=tracking_uri) as run:
            run.log_final({"pong.headline.tokenizer_fg_psnr": 15.0 + lr * 1000, "pong.tokenizer.fg_psnr": 15.0})
        ids["evaluate"] = run.run_id
        ids["parent"] = run.parent_run_id
    return ids


def store_frames(n: int = STORE_FRAMES) -> np.ndarray:
    """uint8 [N, 16, 16, 3]: a 4x4 block of a palette colour moving over a dark background."""
    frames = np.full((n, SIZE, SIZE, 3), 20, dtype=np.uint8)
    for j in range(n):
        y, x = (j * 3) % (SIZE - 4), (j * 5) % (SIZE - 4)
        frames[j, y : y + 4, x : x + 4] = (230, 200, 40)
    return frames


def fit(model: torch.nn.Module, loss_fn: Callable[[], tuple], steps: int, lr: float = 3e-3) -> tuple:
    """`steps` AdamW steps on `loss_fn()` (a model's loss on a fixed batch) -> the last
    (loss, metrics) it returned, taken before that step's update."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss, metrics = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss, metrics


def make_project(root: Path) -> Path:
    """data/models (tiny) and data/frames/pong.zarr under `root`."""
    save_tiny_models(root / "data" / "models")
    group = zarr.open_group(root / "data" / "frames" / "pong.zarr", mode="w", zarr_format=3)
    group.create_array("frames", data=store_frames())
    group.attrs["fps"] = 15.0
    return root


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium driven by selenium; skipped only when chromium/chromedriver are missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


@pytest.fixture(autouse=True)
def one_thread():
    """In-process torch on one thread for every test: the models in tests are tiny, and on a busy
    2-core machine OpenMP's spinning threads cost seconds per test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
