"""Which GPUs a worker host has, so the CLI can run one worker process per GPU."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess

logger = logging.getLogger(__name__)

_GPU_LINE = re.compile(r"^GPU (\d+):", re.MULTILINE)


def visible_gpus(cuda_visible_devices: str | None) -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``.

    An empty list means CPU only. ``CUDA_VISIBLE_DEVICES=""`` or ``-1`` hides every GPU.
    """
    if cuda_visible_devices is not None:
        ids = [d.strip() for d in cuda_visible_devices.split(",") if d.strip()]
        return [] if ids[:1] == ["-1"] else ids
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("nvidia-smi -L failed (%s); running on the CPU", exc)
        return []
    return _GPU_LINE.findall(out.stdout)


def pin_device(device: str | None) -> None:
    """Make only ``device`` visible to this process (before any CUDA library loads)."""
    if device is not None:
        # The child's own environment, read by CUDA itself: not a trapline setting.
        os.environ["CUDA_VISIBLE_DEVICES"] = device
