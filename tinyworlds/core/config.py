"""Typed configs from `params.yaml`: a stage reads its sections once, here, and passes dataclasses down."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.core.params import section


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


def resolved_config(**parts: Any) -> dict[str, Any]:
    """A JSON-able dict of dataclass configs and plain values, for MLflow params and fingerprints."""
    out = {}
    for key, value in parts.items():
        out[key] = asdict(value) if hasattr(value, "__dataclass_fields__") else value
    return out
