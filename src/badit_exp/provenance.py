"""Where a result came from: git commit and dirty flag, package versions, hardware."""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Dict

import torch

_PACKAGES = ["torch", "transformers", "peft", "datasets", "accelerate", "hydra-core",
             "omegaconf", "rouge-score", "safetensors", "deepspeed", "flash-attn", "badit_exp"]


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parent
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def collect() -> Dict:
    versions = {}
    for p in _PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    status = _git("status", "--porcelain", "--untracked-files=no")
    if torch.cuda.is_available():
        device = {"type": "cuda", "name": torch.cuda.get_device_name(0),
                  "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    else:  # the model and the kernels torch picked (AVX2 / AVX512): floats differ between them
        device = {"type": "cpu", "name": platform.processor() or platform.machine(),
                  "threads": torch.get_num_threads(), "model": _cpu_model(),
                  "isa": torch.backends.cpu.get_cpu_capability()}
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "device": device,
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
