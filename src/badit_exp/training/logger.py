"""Metric logging with fixed names (``train/loss``, ``eval/<task>/rougeL``, ``cl/forget_rate``):
always a JSON-lines file in the run directory, optionally wandb (offline by default) or
tensorboard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional


class RunLogger:
    """Rank 0 logs; on other ranks (``enabled=False``) every call is a no-op."""

    def __init__(self, run_dir: Path, backend: str = "none", project: str = "badit_exp",
                 run_name: str = "run", mode: str = "offline", config: Optional[Dict] = None,
                 enabled: bool = True):
        self.path = Path(run_dir) / "train_log.jsonl"
        self.enabled = enabled
        self._wandb = None
        self._tb = None
        if not enabled:
            return
        if backend == "wandb":
            import wandb

            self._wandb = wandb.init(project=project, name=run_name, mode=mode, config=config,
                                     dir=str(run_dir), resume="allow")
        elif backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, values: Dict, step: int) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        numeric = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
