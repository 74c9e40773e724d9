"""Nested configs and metrics as the flat dotted keys MLflow params and `dvc metrics` use."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

# MLflow 3 accepts 6000-character param values, older servers 500. The full config is also
# logged as resolved_config.json, so a cut value loses nothing.
PARAM_VALUE_LIMIT = 500
KEY_LIMIT = 250


def clean_key(key: str) -> str:
    """A name MLflow accepts: letters, digits, `_ - . / : space`, at most 250 characters."""
    return re.sub(r"[^\w\-./: ]", "_", key)[:KEY_LIMIT]


def plain(config: Any) -> Any:
    """A dataclass config as a dict; anything else unchanged."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return config


def flatten(nested: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, Any]:
    """{"pong": {"tokenizer": {"psnr": 30}}} -> {"pong.tokenizer.psnr": 30}: the keys `dvc metrics`
    shows. Dataclasses count as mappings; an empty mapping stays a value."""
    flat: dict[str, Any] = {}
    for key, value in plain(nested).items():
        value = plain(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def flatten_config(config: Mapping[str, Any] | Any) -> dict[str, str]:
    """Nested config -> MLflow params {"model.lr": "0.001", ...}: values as text, cut to the limit."""
    params: dict[str, str] = {}
    for name, value in flatten(config).items():
        if isinstance(value, (list, tuple, dict)):
            text = json.dumps(value, default=str, separators=(",", ":"))
        else:
            text = str(value)
        if len(text) > PARAM_VALUE_LIMIT:
            text = text[: PARAM_VALUE_LIMIT - 3] + "..."
        params[clean_key(name)] = text
    return params


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
