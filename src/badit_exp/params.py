"""Trainable parameters of every method on any model, computed, not guessed:
``python -m badit_exp.params [--models smollm2-135m,qwen3-8b] [--methods lora,badit] [--markdown]``.

Each (model, method) is built exactly as a run builds it (the composed config, the method's own
``apply``) but on PyTorch's meta device: shapes without weights or memory, so an 8B model costs
nothing. The architecture comes from the model's ``config.json``: the converted SmolLM2 in
``paths.cache_dir``, a tiny model's ``model.tiny``, a hub model's config (``model.hub_id``, or a
local copy of it) or, offline, ``model.shape`` (the config.json keys written in its YAML).
Also printed per method: whether it needs the task id at test time and whether its adapter can
be merged into the weights (``Method.needs_task_id`` / ``Method.mergeable()``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from badit_exp.compose import CONF_DIR, load
from badit_exp.config import ConfigError
from badit_exp.methods import registry
from badit_exp.models import smollm2_cached


def architecture(cfg) -> AutoConfig:
    """The transformers config of ``cfg.model`` (see the module docstring for the sources)."""
    m = cfg.model
    if m.source == "tiny":
        return AutoConfig.for_model(m.arch, **dict(m.tiny))
    if m.source == "smollm2_gguf":
        return AutoConfig.from_pretrained(smollm2_cached(Path(cfg.paths.cache_dir).expanduser()))
    if m.shape:
        return AutoConfig.for_model(m.shape["model_type"], **{k: v for k, v in m.shape.items()
                                                              if k != "model_type"})
    try:
        return AutoConfig.from_pretrained(m.hub_id, trust_remote_code=m.trust_remote_code)
    except OSError as e:
        raise ConfigError(f"model.hub_id={m.hub_id!r}: no config.json reachable ({e}); point "
                          "model.hub_id at a local copy, or give model.shape.") from None


def count(model: str, method: str, overrides: List[str] = ()) -> Dict:
    """{trainable, total, needs_task_id, mergeable, adapts} of ``method`` on ``model``."""
    cfg = load([f"model={model}", f"method={method}", *overrides])
    if cfg.method.kind == "peft_lora" and cfg.method.init != "default":
        # PiSSA / OLoRA initialise from the weights (which the meta device does not have) but
        # keep LoRA's shapes: counted with the default init
        cfg = load([f"model={model}", f"method={method}", "method.init=default", *overrides])
    arch = architecture(cfg)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(arch)
    base.requires_grad_(False)
    m = registry.build(cfg.method)
    m.task_names = list(cfg.data.tasks)
    adapted = m.apply(base)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    return {"model": model, "method": method, "trainable": trainable,
            "total": sum(p.numel() for p in adapted.parameters()),
            "needs_task_id": bool(m.needs_task_id), "mergeable": bool(m.mergeable()),
            "adapts": [*cfg.method.target_modules, *getattr(cfg.method, "attention_modules", [])]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m badit_exp.params", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,qwen3-8b")
    p.add_argument("--methods", default="all", help="comma-separated, or all (conf/method/)")
    p.add_argument("--markdown", action="store_true", help="a README table instead of JSON")
    a = p.parse_args(argv)
    methods = (sorted(q.stem for q in (Path(CONF_DIR) / "method").glob("*.yaml"))
               if a.methods == "all" else a.methods.split(","))
    models = a.models.split(",")
    try:
        rows = {(mo, me): count(mo, me) for me in methods for mo in models}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not a.markdown:
        print(json.dumps(list(rows.values()), indent=1))
        return 0
    head = ["method", "adapts", *[f"trainable on {mo}" for mo in models], "task id at test",
            "mergeable"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for me in methods:
        r0 = rows[(models[0], me)]
        cells = [me, ", ".join(r0["adapts"]),
                 *[f"{rows[(mo, me)]['trainable'] / 1e6:.2f} M" for mo in models],
                 "yes" if r0["needs_task_id"] else "no", "yes" if r0["mergeable"] else "no"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
