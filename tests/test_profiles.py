"""Named profiles: params.yaml overrides, checked, run as one DVC experiment."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tinyworlds.core.errors import TinyWorldsError
from tinyworlds.core.params import load_params
from tinyworlds.core.profiles import available_profiles, free_name, load_profile, run_profile, set_param_args

PROJECT = Path(__file__).resolve().parents[1]
PARAMS = {"tokenizer": {"model": {"patch_size": 8, "levels": [8, 8, 8]}, "train": {"steps": 800}},
          "lam": {"train": {"steps": 800}}, "datasets": {"pong": {"fit": "crop"}}}


def write_profile(root: Path, name: str, text: str) -> None:
    (root / "profiles").mkdir(exist_ok=True)
    (root / "profiles" / f"{name}.yaml").write_text(text)


def test_a_profile_flattens_to_the_keys_it_changes(tmp_path):
    write_profile(tmp_path, "big", "tokenizer:\n  model:\n    patch_size: 4\n    levels: [8, 5, 5, 5]\n"
                                   "  train: {steps: 3000}\ndatasets:\n  pong: {fit: pad}\n")
    overrides = load_profile("big", PARAMS, tmp_path)
    assert overrides == {"tokenizer.model.patch_size": 4, "tokenizer.model.levels": [8, 5, 5, 5],
                         "tokenizer.train.steps": 3000, "datasets.pong.fit": "pad"}
    assert set_param_args(overrides) == [
        "-S", "tokenizer.model.patch_size=4", "-S", "tokenizer.model.levels=[8, 5, 5, 5]",
        "-S", "tokenizer.train.steps=3000", "-S", 'datasets.pong.fit="pad"',
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tokenizer:\n  model:\n    patch_sze: 4\n", "tokenizer.model.patch_sze is not in params.yaml"),
        ("tokenizer:\n  model: 4\n", "tokenizer.model is a section in params.yaml"),
        ("tokenizer:\n  model: {}\n", "tokenizer.model is empty"),
        ("- 1\n", "expected a mapping of params.yaml sections"),
        ("tokenizer: [\n", "not valid YAML"),
    ],
)
def test_a_bad_profile_is_a_one_line_error_naming_the_file(tmp_path, text, message):
    write_profile(tmp_path, "bad", text)
    with pytest.raises(TinyWorldsError) as err:
        load_profile("bad", PARAMS, tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'profiles' / 'bad.yaml'}: {message}")
    assert "\n" not in str(err.value)


def test_an_unknown_profile_names_the_ones_there_are(tmp_path):
    write_profile(tmp_path, "large", "lam:\n  train: {steps: 10}\n")
    with pytest.raises(TinyWorldsError, match=r"profile 'huge': no .*huge.yaml \(profiles: large\)"):
        load_profile("huge", PARAMS, tmp_path)


def test_a_taken_experiment_name_gets_the_next_number():
    assert free_name("large", set()) == "large"
    assert free_name("large", {"large", "large-2", "other"}) == "large-3"


def test_every_shipped_profile_fits_params_yaml():
    params = load_params(PROJECT / "params.yaml")
    names = available_profiles(PROJECT)
    assert "large" in names
    for name in names:
        assert load_profile(name, params, PROJECT)  # raises on a key params.yaml lacks


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def test_repro_profile_runs_a_named_dvc_experiment_with_the_overrides(tmp_path):
    """A one-stage DVC project: the profile's value reaches the stage, the experiment is named
    after the profile, and a second run is numbered instead of failing after the work."""
    (tmp_path / "params.yaml").write_text("train:\n  steps: 1\n  name: a\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  echo:\n    cmd: python -c \"import yaml; p = yaml.safe_load(open('params.yaml'));"
        " open('out.txt', 'w').write(str(p['train']['steps']))\"\n"
        "    params: [train.steps]\n    outs: [out.txt]\n"
    )
    write_profile(tmp_path, "large", "train:\n  steps: 3000\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "t@example.com")
    git(tmp_path, "config", "user.name", "t")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".gitignore").write_text("out.txt\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "init")

    said = []
    assert run_profile("large", say=said.append, root=tmp_path) == 0
    assert said == ['dvc exp run -n large -S train.steps=3000']
    assert (tmp_path / "out.txt").read_text() == "3000"
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["train"] == {"steps": 3000, "name": "a"}

    git(tmp_path, "checkout", "params.yaml")
    assert run_profile("large", dry_run=True, say=said.append, root=tmp_path) == 0
    assert said[-1] == 'dvc exp run -n large-2 -S train.steps=3000'
    with pytest.raises(TinyWorldsError, match="--name 'large': a DVC experiment of this commit has that name"):
        run_profile("large", experiment="large", root=tmp_path)


def test_cli_dry_run_prints_the_command_and_a_bad_profile_exits_1(tmp_path):
    cli = [sys.executable, "-m", "tinyworlds.apps.cli", "repro", "--profile"]
    shown = subprocess.run([*cli, "large", "--dry-run"], cwd=PROJECT, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert shown.stderr.startswith("dvc exp run -n large") and " -S " in shown.stderr
    missing = subprocess.run([*cli, "nope"], cwd=PROJECT, capture_output=True, text=True)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: profile 'nope': no profiles/nope.yaml")
