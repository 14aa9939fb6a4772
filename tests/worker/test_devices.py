"""One worker process per visible GPU: which GPUs count as visible."""

from __future__ import annotations

import shutil

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


def test_without_the_variable_a_host_without_nvidia_smi_runs_on_the_cpu() -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("this host has nvidia-smi; the CPU fallback cannot be observed")
    assert visible_gpus(None) == []
