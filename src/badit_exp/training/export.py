"""Reloading a finished run's adapter onto its base model (for evaluation and analysis).

A run's ``adapter/`` holds ``adapter.safetensors`` (the method's state) and ``method.json``
(the method and model configs). Reloading re-applies the method to the pristine base model
(so initialisations that rewrite base weights, such as BAD, PiSSA or OLoRA, are reproduced
deterministically) and then loads the trained state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from badit_exp.config import ModelConfig
from badit_exp.methods import registry
from badit_exp.models import load_model_and_tokenizer


def _typed(cls, data: dict):
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), data))


def load_trained(run_dir: str | Path, cache_dir: str | Path, device: str = "cpu",
                 merge: bool = False) -> Tuple[torch.nn.Module, object, object]:
    """(model, tokenizer, method) with the run's final adapter, in eval mode; ``merge`` folds
    the adapter into the base weights (:meth:`Method.merge`: a clear error for a method whose
    update depends on the input)."""
    adir = Path(run_dir) / "adapter"
    meta = json.loads((adir / "method.json").read_text())
    mcfg = _typed(ModelConfig, meta["model"])
    cfg_cls, _ = registry.get(meta["method"]["kind"])
    method = registry.build(_typed(cfg_cls, meta["method"]))
    torch.manual_seed(meta.get("seed", 0))
    base, tok = load_model_and_tokenizer(mcfg, Path(cache_dir), torch.device(device))
    model = method.apply(base)
    method.load_state_dict(model, load_file(str(adir / "adapter.safetensors")))
    if merge:
        model = method.merge(model)
    model.eval()
    return model, tok, method
