"""Checkpoints: written to a temporary folder and renamed, so a crash leaves the previous one.

Layout under ``<run_dir>/checkpoints/``:

* ``stage_<i>/``   state after finishing stage i: ``adapter.safetensors`` (method state).
* ``in_stage/``    latest point inside the running stage: ``adapter.safetensors``,
                   ``trainer.pt`` (optimizer, scheduler, RNG, position), ``meta.json``.

Every file carries a SHA-256 in ``meta.json``; a mismatch or unreadable file raises
:class:`CheckpointError` instead of being silently ignored.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    pass


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(folder: Path, tensors: Dict[str, torch.Tensor], meta: Dict,
         trainer_state: Optional[Dict] = None) -> None:
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "adapter.safetensors"))
    files = ["adapter.safetensors"]
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer.pt")
        files.append("trainer.pt")
    meta = dict(meta, sha256={f: _sha(tmp / f) for f in files})
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


def load(folder: Path) -> Tuple[Dict[str, torch.Tensor], Dict, Optional[Dict]]:
    """(tensors, meta, trainer_state or None); CheckpointError when anything is off."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        for f, digest in meta.get("sha256", {}).items():
            if _sha(folder / f) != digest:
                raise CheckpointError(f"checkpoint file {folder / f} is corrupted (checksum "
                                      "mismatch); delete the folder to restart that stage.")
        tensors = load_file(str(folder / "adapter.safetensors"))
        ts = folder / "trainer.pt"
        trainer_state = torch.load(ts, weights_only=False) if ts.exists() else None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
        raise CheckpointError(f"checkpoint {folder} cannot be read ({type(e).__name__}: {e}); "
                              "delete it to restart from the previous one.") from e
    return tensors, meta, trainer_state
