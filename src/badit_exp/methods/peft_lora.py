"""LoRA, PiSSA and OLoRA: one PEFT LoRA adapter, differing only in initialisation.

PEFT does the work (``LoraConfig.init_lora_weights``); nothing is re-implemented here.
PiSSA and OLoRA rewrite the base weights into a residual at initialisation; a checkpoint
therefore holds only the adapter, and resuming re-applies the (deterministic, seeded) init to
the pristine base model before loading it.
"""

from __future__ import annotations

from dataclasses import dataclass

from badit_exp.config import ConfigError
from badit_exp.methods.base import Method, MethodConfig
from badit_exp.methods.registry import register

_INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa",
          "pissa_niter_4": "pissa_niter_4", "olora": "olora"}


@dataclass
class PeftLoraConfig(MethodConfig):
    # default: A kaiming-uniform, B = 0 (plain LoRA); pissa: exact SVD; pissa_niter_4: the
    # randomised SVD the BADIT reference code uses; olora: QR-based (Buyukakyuz 2024).
    init: str = "default"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in _INITS:
            raise ConfigError(f"method.init={self.init!r} is not valid; choose one of "
                              f"{sorted(_INITS)}.")


@register("peft_lora", PeftLoraConfig)
class PeftLora(Method):
    """A single PEFT LoRA adapter on ``target_modules``."""

    def mergeable(self) -> bool:
        return True  # W + s B A

    def merge(self, model):
        return model.merge_and_unload()  # PEFT's own

    def apply(self, model):
        # imported here: peft costs a second or more at import, which every command (a config
        # error, --help, study status) paid through the method registry
        from peft import LoraConfig, get_peft_model

        c = self.cfg
        lcfg = LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout,
                          target_modules=list(c.target_modules), bias="none",
                          init_lora_weights=_INITS[c.init], task_type="CAUSAL_LM")
        return get_peft_model(model, lcfg)

    def describe(self):
        return {"kind": self.kind, "init": self.cfg.init, "library": "peft"}
