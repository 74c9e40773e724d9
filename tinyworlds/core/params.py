"""`params.yaml` and where every stage reads and writes.

`Layout` is the single place that knows the on-disk layout of a project; `dvc.yaml` declares
the same paths (a test checks that they agree).

    data/raw/NAME.mp4 (+ NAME.true_actions.json)  recordings and user videos
    data/frames/NAME.zarr                         ingested uint8 frames        (stage ingest@NAME)
    data/training_set.json                        the stores of data.train_on  (stage training_set)
    data/models/{tokenizer,lam,dynamics}/         safetensors + config.json    (train_* stages)
    data/tokens/NAME.zarr                         cached patch tokens          (stage tokenize)
    data/latent_actions/NAME.zarr                 cached latent action ids     (stage train_lam)
    data/train_state/STAGE/                       resumable training state     (persist: true)
    data/metrics/STAGE.json, STAGE_history.csv    final metrics, loss curves
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tinyworlds.core.errors import TinyWorldsError


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TinyWorldsError(f"{path}: params file not found (run from the project root)")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TinyWorldsError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(params, dict):
        raise TinyWorldsError(f"{path}: expected a mapping of sections at the top level")
    return params


def section(params: dict[str, Any], *keys: str) -> Any:
    """params[k1][k2]..., or a one-line error naming the missing key."""
    node: Any = params
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise TinyWorldsError(f"params.yaml: missing {'.'.join(keys[: depth + 1])}")
        node = node[key]
    return node


def dataset_names(params: dict[str, Any], names: list[str] | None = None) -> list[str]:
    """The datasets a model trains on (`data.train_on`), checked against `datasets`."""
    known = section(params, "datasets")
    names = list(names if names is not None else section(params, "data", "train_on"))
    if not names:
        raise TinyWorldsError("params.yaml: data.train_on is empty; name at least one dataset")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise TinyWorldsError(f"params.yaml: data.train_on names {unknown}, not in datasets ({', '.join(known)})")
    return names


@dataclass(frozen=True)
class Layout:
    root: Path = field(default_factory=Path)

    def raw_video(self, name: str) -> Path:
        return self.root / "data" / "raw" / f"{name}.mp4"

    def frames(self, name: str) -> Path:
        return self.root / "data" / "frames" / f"{name}.zarr"

    def tokens(self, name: str) -> Path:
        return self.root / "data" / "tokens" / f"{name}.zarr"

    def latent_actions(self, name: str) -> Path:
        return self.root / "data" / "latent_actions" / f"{name}.zarr"

    def training_set(self) -> Path:
        return self.root / "data" / "training_set.json"

    def model(self, kind: str) -> Path:
        return self.root / "data" / "models" / kind

    def train_state(self, stage: str) -> Path:
        return self.root / "data" / "train_state" / stage

    def metrics(self, stage: str) -> Path:
        return self.root / "data" / "metrics" / f"{stage}.json"

    def metrics_table(self, stage: str, name: str) -> Path:
        """A stage's CSV beside its metrics JSON, e.g. the evaluate stage's per-horizon curves."""
        return self.root / "data" / "metrics" / f"{stage}_{name}.csv"

    def history(self, stage: str) -> Path:
        return self.root / "data" / "metrics" / f"{stage}_history.csv"
