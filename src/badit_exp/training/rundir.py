"""The run directory and its rules: one config per directory, progress, checkpoints, clean-up.

Layout of ``<run_dir>``: ``config.yaml`` (the resolved config, written once), ``progress.json``
(finished stages, their results and timings; atomic), ``checkpoints/`` (see
:mod:`badit_exp.training.checkpoint`: ``stage_<i>/``, ``in_stage/``, ``eval_stage_<i>.json``),
``adapter/`` (the final adapter), and the results (:mod:`badit_exp.training.results`).

Resume rule: a directory that holds a run is continued only with ``resume=true`` and a config
equal to the recorded one up to :data:`badit_exp.config.RESULT_NEUTRAL_KEYS`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from omegaconf import OmegaConf
from safetensors.torch import save_file

from badit_exp.config import ConfigError, is_result_neutral
from badit_exp.io_utils import atomic_write_json, atomic_write_text, flatten
from badit_exp.training import checkpoint as ckpt


def config_diff(old: Dict, new: Dict) -> List[str]:
    """Dotted keys whose values differ between two resolved configs, result-neutral keys aside."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if not is_result_neutral(k) and a.get(k) != b.get(k))


class RunDir:
    """Paths and rules of one run directory. Only rank 0 writes (``writer=False`` elsewhere)."""

    def __init__(self, path: Path, writer: bool = True):
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"
        self.progress_path = self.path / "progress.json"
        self.writer = writer

    # -- the config ---------------------------------------------------------------------------
    def claim(self, resolved: Dict, resume: bool) -> None:
        """Write ``config.yaml`` into a new directory, or check that an existing run may be
        continued with ``resolved`` (ConfigError with the differing keys otherwise)."""
        cfg_path = self.path / "config.yaml"
        if cfg_path.exists():
            if not resume:
                raise ConfigError(f"{self.path} already holds a run and resume=false; choose "
                                  "another hydra.run.dir (or run_name), or resume=true.")
            old = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)
            diff = config_diff(old, resolved)
            if diff:
                raise ConfigError(f"{self.path} holds a run with a different config "
                                  f"({', '.join(diff[:8])}); resuming it would mix results. "
                                  "Use another hydra.run.dir / run_name, or restore the settings.")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cfg_path, OmegaConf.to_yaml(resolved))

    # -- progress -----------------------------------------------------------------------------
    def load_progress(self) -> Dict:
        if not self.progress_path.exists():
            return {"completed": [], "results": {}, "timing": {}, "global_step": 0}
        try:
            return json.loads(self.progress_path.read_text())
        except json.JSONDecodeError as e:
            raise ckpt.CheckpointError(f"{self.progress_path} is corrupted ({e}); delete the run "
                                       "directory to start over.") from None

    def save_progress(self, progress: Dict) -> None:
        if self.writer:
            atomic_write_json(self.progress_path, progress)

    # -- checkpoints --------------------------------------------------------------------------
    @property
    def in_stage(self) -> Path:
        return self.ckpt_dir / "in_stage"

    def stage_checkpoint(self, i: int) -> Path:
        return self.ckpt_dir / f"stage_{i}"

    def eval_partial(self, i: int) -> Path:
        return self.ckpt_dir / f"eval_stage_{i}.json"

    def load_in_stage(self, stage_index: int) -> Optional[Tuple[Dict, Dict]]:
        """(adapter tensors, trainer state) of an in-stage checkpoint of ``stage_index``."""
        if not self.in_stage.exists():
            return None
        tensors, meta, tstate = ckpt.load(self.in_stage)
        return (tensors, tstate) if meta["stage"] == stage_index else None

    def save_in_stage(self, stage_index: int, stage_name: str, tensors, tstate: Dict) -> None:
        if self.writer:
            ckpt.save(self.in_stage, tensors, {"stage": stage_index, "stage_name": stage_name},
                      tstate)

    def load_stage(self, i: int):
        """(tensors, meta, trainer state) of the checkpoint after stage ``i``."""
        return ckpt.load(self.stage_checkpoint(i))

    def save_stage(self, i: int, tensors) -> None:
        if self.writer:
            ckpt.save(self.stage_checkpoint(i), tensors, {"stage": i})

    def drop_stale(self, i: int) -> None:
        """Stage ``i`` is recorded in progress.json: drop what only its resumption needed."""
        if not self.writer:
            return
        for old in (self.in_stage, self.stage_checkpoint(i - 1)):
            if old.is_dir():
                shutil.rmtree(old)
        if self.eval_partial(i).exists():
            self.eval_partial(i).unlink()

    # -- the trained adapter ------------------------------------------------------------------
    def export_adapter(self, tensors, info: Dict) -> None:
        """``adapter/adapter.safetensors`` and ``adapter/method.json`` (see training.export)."""
        if not self.writer:
            return
        out = self.path / "adapter"
        out.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter.safetensors"))
        atomic_write_json(out / "method.json", info)
