"""Every benchmark script runs end to end at tiny sizes, so a change that breaks one fails here.

Figures are not checked (timed tests are flaky and figures belong in bench/README.md): only
that each script finishes and writes results JSON with the fields its summary table reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "bench_training.py": ["--preset", "tiny", "--reps", "1", "--warmup", "1"],
    "bench_models.py": ["--preset", "tiny", "--reps", "1", "--frames", "2", "--steps", "2"],
    "bench_threads.py": ["--preset", "tiny", "--reps", "1", "--frames", "2", "--steps", "2", "--busy", "0"],
    "bench_loader.py": ["--preset", "tiny", "--frames", "2400", "--batches", "2", "--reps", "1", "--warmup", "0"],
    "bench_ingest.py": ["--frames", "120", "--reps", "1"],
    # Without TW_REF (run() unsets it) only our side runs: TinyWorlds is never part of CI.
    "bench_tinyworlds.py": ["--preset", "tiny", "--reps", "1", "--threads", "1", "--gemm-size", "256"],
}
CPU_ONLY = ("bench_ingest.py", "bench_threads.py", "bench_tinyworlds.py")  # these take no --device


def run(script: str, *args: str, timeout: int = 240, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TW_REF"}
    result = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, check=False,
                            capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert result.returncode == 0, f"{script} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def test_every_bench_script_has_a_smoke_run():
    scripts = {p.name for p in (REPO / "bench").glob("bench_*.py")}
    assert scripts == set(TINY), "add the new benchmark to TINY"


@pytest.mark.parametrize("script", sorted(TINY))
def test_bench_script_runs_at_tiny_sizes(script, tmp_path):
    out = tmp_path / ("ingest" if script == "bench_ingest.py" else "results.json")
    on_cpu = [] if script in CPU_ONLY else ["--device", "cpu"]
    result = run(script, *TINY[script], *on_cpu, "--out", str(out))
    if script == "bench_tinyworlds.py":  # no TinyWorlds tree: our side alone, and it says so
        assert "TW_REF is not set: timing our side only" in result.stdout
    written = sorted(out.rglob("*.json")) if out.is_dir() else [out]
    assert written, f"{script} wrote no results"
    for path in written:
        assert isinstance(json.loads(path.read_text()), dict)


def test_the_summary_tables_build_from_the_smoke_results(tmp_path):
    """run_all's tables read the fields the scripts write: rebuild them from fresh tiny results."""
    for script, name in (("bench_training.py", "training.json"), ("bench_models.py", "generation.json")):
        run(script, *TINY[script], "--device", "cpu", "--out", str(tmp_path / name))
    run("bench_tinyworlds.py", *TINY["bench_tinyworlds.py"], "--out", str(tmp_path / "tinyworlds.json"))
    result = run("run_all.py", "--summarize", "--results", str(tmp_path))
    summary = (tmp_path / "summary.md").read_text()
    assert "wrote" in result.stdout and summary.strip()
    # The side-by-side table: one row per part at the tiny sizes, our side alone without TW_REF.
    rows = [line for line in summary.splitlines() if line.startswith("| 1 | tiny |")]
    assert {row.split(" | ")[2] for row in rows} == {"tokenizer", "lam", "dynamics", "generation"}
    assert "our own sides alone" in summary


def test_tinyworlds_side_by_side_rejects_a_bad_tree_in_one_line(tmp_path):
    bad = run("bench_tinyworlds.py", "--tw-ref", str(tmp_path / "nowhere"), check=False)
    assert bad.returncode != 0
    expected = (f"error: TW_REF={tmp_path / 'nowhere'}: not a TinyWorlds tree (no models/video_tokenizer.py); "
                "export AlmondGod/tinyworlds there")
    assert bad.stderr.strip().splitlines() == [expected]
