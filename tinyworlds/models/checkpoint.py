"""Model checkpoints: a directory holding `model.safetensors` and `config.json`.

config.json says what to build ({"kind", "config", "parameters", "tinyworlds_version"}), so
load_model needs nothing but the directory, and no pickle is ever read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import tinyworlds
from tinyworlds.core.atomic import atomic_output
from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.models.dynamics import DynamicsConfig, DynamicsModel
from tinyworlds.models.lam import LatentActionConfig, LatentActionModel
from tinyworlds.models.tokenizer import TokenizerConfig, VideoTokenizer

MODEL_KINDS: dict[str, tuple[type, type[nn.Module]]] = {
    "tokenizer": (TokenizerConfig, VideoTokenizer),
    "lam": (LatentActionConfig, LatentActionModel),
    "dynamics": (DynamicsConfig, DynamicsModel),
}
# Kinds written by earlier releases, read as their current name (0.1 wrote "latent_actions").
RENAMED_KINDS = {"latent_actions": "lam"}
# Config fields added since, with the value that reproduces what a checkpoint without them
# was trained as (its defaults may have changed since).
ADDED_FIELDS = {"lam": {"pair_encoding": "sequence"}}  # 0.2 encoded each pair as a 2-frame clip
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (torch.compile wrappers share their module's parameters)."""
    return sum(p.numel() for p in model.parameters())


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile returns an OptimizedModule whose state_dict keys carry `_orig_mod.`.
    return getattr(model, "_orig_mod", model)


def save_model(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model's weights and config to `directory`, replacing it atomically."""
    model = _unwrap(model)
    kind = next((k for k, (_, cls) in MODEL_KINDS.items() if isinstance(model, cls)), None)
    if kind is None:
        raise TinyWorldsError(f"save_model: cannot save a {type(model).__name__}; expected a tinyworlds model")
    state = {
        name.replace("_orig_mod.", ""): tensor.detach().contiguous().cpu()
        for name, tensor in model.state_dict().items()
    }
    meta = {
        "kind": kind,
        "config": dataclasses.asdict(model.config),
        "parameters": count_parameters(model),
        "tinyworlds_version": tinyworlds.__version__,
    }
    directory = Path(directory)
    with atomic_output(directory) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / WEIGHTS), metadata={"kind": kind})
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from a directory written by save_model; returned in eval mode on `device`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TinyWorldsError(f"{directory}: no such checkpoint directory")
    config_path = directory / CONFIG
    if not config_path.is_file():
        raise TinyWorldsError(f"{directory}: missing {CONFIG}")
    try:
        meta = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TinyWorldsError(f"{config_path}: unreadable JSON ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise TinyWorldsError(f"{config_path}: expected an object with a \"kind\" and a \"config\" object")
    kind = RENAMED_KINDS.get(meta.get("kind"), meta.get("kind"))
    if kind not in MODEL_KINDS:
        raise TinyWorldsError(f"{config_path}: unknown kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}")
    config_cls, model_cls = MODEL_KINDS[kind]
    try:
        config = config_cls(**{**ADDED_FIELDS.get(kind, {}), **meta["config"]})
    except TypeError as err:
        raise TinyWorldsError(f"{config_path}: config does not fit {config_cls.__name__} ({err})") from None
    except TinyWorldsError as err:
        raise TinyWorldsError(f"{config_path}: {err}") from None

    weights_path = directory / WEIGHTS
    if not weights_path.is_file():
        raise TinyWorldsError(f"{directory}: missing {WEIGHTS}")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise TinyWorldsError(f"{weights_path}: unreadable safetensors file ({err})") from None

    model = model_cls(config)
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise TinyWorldsError(f"{directory}: weights do not match the config: tensor {name!r} is missing")
        if state[name].shape != tensor.shape:
            raise TinyWorldsError(
                f"{directory}: weights do not match the config: tensor {name!r} has shape "
                f"{tuple(state[name].shape)}, expected {tuple(tensor.shape)}"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise TinyWorldsError(f"{directory}: weights do not match the config: unexpected tensor {extra[0]!r}")
    model.load_state_dict(state)
    return model.to(device).eval()
