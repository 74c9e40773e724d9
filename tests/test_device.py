"""Device, precision and CPU-thread choices (training/device.py)."""

from __future__ import annotations

import pytest
import torch

from tinyworlds.core import device as device_module
from tinyworlds.core.device import (
    parse_threads,
    pick_device,
    resolve_precision,
    set_inference_threads,
)
from tinyworlds.core.errors import TinyWorldsError

CPU = torch.device("cpu")


def test_pick_device_names_and_errors():
    assert pick_device("cpu") == CPU
    assert pick_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(TinyWorldsError, match="not a device name"):
        pick_device("gpu9")
    if not torch.cuda.is_available():
        with pytest.raises(TinyWorldsError, match="CUDA is not available"):
            pick_device("cuda:0")


def test_precision():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(TinyWorldsError, match="precision='fp8'"):
        resolve_precision("fp8", CPU)


@pytest.mark.parametrize("setting, expected", [("auto", None), ("3", 3), (2, 2), (" 4 ", 4)])
def test_parse_threads(setting, expected):
    assert parse_threads(setting) == expected


@pytest.mark.parametrize("setting", ["0", "-1", "two", "1.5", "", None])
def test_parse_threads_rejects(setting):
    with pytest.raises(TinyWorldsError, match="must be auto or a whole number >= 1"):
        parse_threads(setting)


@pytest.mark.parametrize("cores, idle, expected", [(2, 2.0, 2), (2, 1.1, 1), (2, 0.2, 1), (8, 5.6, 6), (8, 9.0, 8)])
def test_auto_threads_take_the_idle_cores(monkeypatch, cores, idle, expected):
    monkeypatch.setattr(device_module, "cpu_cores", lambda: cores)
    monkeypatch.setattr(device_module, "idle_cores", lambda sample_seconds: idle)
    note = set_inference_threads("auto", CPU)
    assert torch.get_num_threads() == expected
    assert note.startswith(f"cpu: {expected} thread") and f"of {cores} cores idle" in note


def test_given_threads_are_used_and_a_gpu_is_left_alone(monkeypatch):
    monkeypatch.setattr(device_module, "idle_cores", lambda sample_seconds: pytest.fail("sampled the CPU"))
    assert set_inference_threads(2, CPU) == "cpu: 2 threads (as given; --threads N to choose)"
    assert torch.get_num_threads() == 2
    assert set_inference_threads("auto", torch.device("cuda")) is None
    assert torch.get_num_threads() == 2


def test_idle_cores_counts_other_processes(monkeypatch):
    monkeypatch.setattr(device_module.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(device_module, "cpu_cores", lambda: 4)
    monkeypatch.setattr(device_module.psutil, "cpu_percent", lambda interval: 75.0)  # 3 of 4 cores busy
    assert device_module.idle_cores(0.0) == pytest.approx(1.0)
