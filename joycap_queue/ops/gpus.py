"""The GPUs this machine offers, found without torch or CUDA: `up` and `worker --gpus` ask here.

Asking CUDA would initialise it in a process that only supervises; its children, the workers,
must start with no CUDA state inherited.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path


def visible_gpus(
    environ: Mapping[str, str] | None = None,
    *,
    nvidia_smi: str | None = "nvidia-smi",
    proc_dir: Path = Path("/proc/driver/nvidia/gpus"),
) -> list[str]:
    """The GPUs this process may use, without touching CUDA: ``CUDA_VISIBLE_DEVICES``, else
    ``nvidia-smi``, else the driver's ``/proc`` entries; empty when there is none."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [
            gpu for gpu in environ["CUDA_VISIBLE_DEVICES"].replace(" ", "").split(",") if gpu and gpu != "-1"
        ]
    found = shutil.which(nvidia_smi) if nvidia_smi else None
    if found:
        try:
            listed = subprocess.run(
                [found, "--query-gpu=index", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            listed = ""
        indices = [line.strip() for line in listed.splitlines() if line.strip().isdigit()]
        if indices:
            return indices
    try:
        return [str(i) for i in range(sum(1 for _ in proc_dir.iterdir()))]
    except OSError:
        return []
