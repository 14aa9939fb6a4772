"""One worker process per visible GPU: which GPUs count as visible."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from trapline.worker.devices import visible_gpus


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0,1,3", ["0", "1", "3"]),
        (" 2 ", ["2"]),
        ("", []),
        ("-1", []),
        ("GPU-8f2e,GPU-11aa", ["GPU-8f2e", "GPU-11aa"]),
    ],
)
def test_cuda_visible_devices_decides_when_set(value: str, expected: list[str]) -> None:
    assert visible_gpus(value) == expected


def _fake_nvidia_smi(bin_dir: Path, script: str) -> None:
    """``nvidia-smi`` is outside our control: a stand-in on PATH with a scripted answer."""
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + script)
    smi.chmod(0o755)


def test_without_the_variable_a_host_without_nvidia_smi_runs_on_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert visible_gpus(None) == []


def test_without_the_variable_every_gpu_nvidia_smi_lists_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_nvidia_smi(
        tmp_path,
        'echo "GPU 0: NVIDIA H200 (UUID: GPU-8f2e)"\n'
        'echo "  MIG 1g.18gb Device 0: (UUID: MIG-1)"\n'
        'echo "GPU 1: NVIDIA H200 (UUID: GPU-11aa)"\n',
    )
    monkeypatch.setenv("PATH", str(tmp_path))
    assert visible_gpus(None) == ["0", "1"]


def test_a_failing_nvidia_smi_is_a_warning_and_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _fake_nvidia_smi(tmp_path, 'echo "NVIDIA-SMI has failed" >&2\nexit 9\n')
    monkeypatch.setenv("PATH", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="trapline.worker.devices"):
        assert visible_gpus(None) == []
    assert "nvidia-smi -L failed" in caplog.text
