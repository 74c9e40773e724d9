"""Named profiles: a set of params.yaml overrides run as one DVC experiment.

`params.yaml` is the default pipeline, sized to run end to end within 20 minutes on 2 CPU
cores. A profile (`profiles/NAME.yaml`) holds only the values it changes, nested exactly as in
params.yaml, so a reader sees the whole difference at a glance:

    tokenizer:
      model:
        patch_size: 4

`tinyworlds repro --profile NAME` runs `dvc exp run -n NAME -S key=value ...`: DVC reruns the
stages those values reach, records the experiment under the profile's name (which MLflow run
names carry, see tracking/naming.py), and leaves params.yaml and the outputs in the workspace
as the experiment made them (`git checkout params.yaml && dvc repro` brings the default back).
Overrides, not a second params file: a profile cannot drift from params.yaml, because every key
it sets must already be there.
"""

from __future__ import annotations

import copy
import json
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.core.params import load_params

PROFILES_DIR = Path("profiles")


def available_profiles(root: Path = Path(".")) -> list[str]:
    return sorted(path.stem for path in (root / PROFILES_DIR).glob("*.yaml"))


def load_profile(name: str, params: dict[str, Any], root: Path = Path(".")) -> dict[str, Any]:
    """profiles/NAME.yaml -> its overrides as {"dotted.key": value}, each checked against
    `params` (params.yaml): the key must exist there, and a mapping may only replace a mapping."""
    path = root / PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(available_profiles(root)) or "none"
        raise TinyWorldsError(f"profile {name!r}: no {path} (profiles: {known})")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TinyWorldsError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(tree, dict) or not tree:
        raise TinyWorldsError(f"{path}: expected a mapping of params.yaml sections to override")
    overrides = flatten(tree)
    for key, value in overrides.items():
        default = lookup(params, key)
        if default is MISSING:
            raise TinyWorldsError(f"{path}: {key} is not in params.yaml (a profile only changes existing values)")
        if isinstance(value, dict):  # flatten leaves only empty mappings; `-S key={}` would wipe the section
            raise TinyWorldsError(f"{path}: {key} is empty; name the values to change, or remove it")
        if isinstance(default, dict):
            raise TinyWorldsError(f"{path}: {key} is a section in params.yaml; set the values inside it")
    return overrides


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}. Lists and empty mappings are values, not sections."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


MISSING = object()


def lookup(params: dict[str, Any], dotted: str) -> Any:
    node: Any = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return MISSING
        node = node[key]
    return node


def apply_profile(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `params` with the profile's overrides set: the params.yaml its run will see."""
    result = copy.deepcopy(params)
    for key, value in overrides.items():
        *sections, leaf = key.split(".")
        node = result
        for name in sections:
            node = node[name]
        node[leaf] = copy.deepcopy(value)
    return result


def set_param_args(overrides: dict[str, Any]) -> list[str]:
    """Overrides -> `dvc exp run` arguments: -S key=value, each value written as JSON, which
    DVC's override grammar reads back as the same number, string, boolean, list or null."""
    args: list[str] = []
    for key, value in overrides.items():
        args += ["-S", f"{key}={json.dumps(value)}"]
    return args


def run_profile(
    name: str, *, experiment: str | None = None, dry_run: bool = False,
    say: Callable[[str], None] = print, root: Path = Path("."),
) -> int:
    """Run profile `name` as the DVC experiment `experiment` (default: the profile's name, or
    name-2, name-3... if taken) and return dvc's exit status; `dry_run` only prints the command."""
    overrides = load_profile(name, load_params(root / "params.yaml"), root)
    taken = existing_experiments(root)
    if experiment is not None and experiment in taken:
        raise TinyWorldsError(f"--name {experiment!r}: a DVC experiment of this commit has that name; choose another")
    command = ["dvc", "exp", "run", "-n", experiment or free_name(name, taken), *set_param_args(overrides)]
    say(shlex.join(command))
    if dry_run:
        return 0
    # dvc as a module of this interpreter: the one tinyworlds is installed in, whatever PATH says.
    return subprocess.run([sys.executable, "-m", *command], cwd=root).returncode


def existing_experiments(root: Path) -> set[str]:
    """Names of the DVC experiments based on the current commit (none if dvc cannot list them)."""
    listing = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "list", "--name-only"], cwd=root, capture_output=True, text=True
    )
    return set(listing.stdout.split()) if listing.returncode == 0 else set()


def free_name(name: str, taken: set[str]) -> str:
    """`name`, or name-2, name-3, ... : the first not already an experiment. DVC refuses a
    taken name only after the whole run has finished."""
    if name not in taken:
        return name
    number = 2
    while f"{name}-{number}" in taken:
        number += 1
    return f"{name}-{number}"
