"""O-LoRA (Wang et al., Findings of EMNLP 2023): one LoRA per task in mutually orthogonal
input subspaces (BASELINES.md), config name ``o_lora``.

Per adapted layer: frozen previous pairs (A_prev = earlier tasks' A stacked by rows, B_prev
their B stacked by columns) plus a trainable pair (A kaiming-uniform, B = 0)::

    y = W x + s B_prev A_prev x + s B_t A_t dropout(x)

Loss: CE + lambda_1 * sum_layers sum_jk |(A_prev A_t^T)_jk| (``orth_penalty=l1``, the authors'
code; ``squared`` is the paper's formula) + lambda_2 * sum (||A_t||_F + ||B_t||_F).
After each task (``on_stage_end``) the trained pair is appended to the previous pair and a
fresh pair starts; nothing is merged and no task id is used at inference. In mixed mode there
is one stage: a plain LoRA. Deviations from the authors' setting, for comparability with the
other methods: gate_proj instead of q/v, r = 4 and dropout 0.05 by default (configurable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from badit_exp.config import ConfigError
from badit_exp.methods.base import Method, MethodConfig
from badit_exp.methods.moe.layer import replace_linears
from badit_exp.methods.registry import register


@dataclass
class OLoraConfig(MethodConfig):
    lambda_1: float = 0.5  # weight of the orthogonality loss
    lambda_2: float = 0.0  # weight of the L2 (unsquared Frobenius) term on the new pair
    orth_penalty: str = "l1"  # l1 (authors' code) | squared (paper)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.orth_penalty not in ("l1", "squared"):
            raise ConfigError(f"method.orth_penalty={self.orth_penalty!r}; choose l1 or squared.")
        if self.lambda_1 < 0 or self.lambda_2 < 0:
            raise ConfigError("method.lambda_1 and method.lambda_2 must be >= 0.")


class OLoraLinear(nn.Module):
    """A frozen linear layer + the current task's LoRA pair + earlier tasks' frozen pairs."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        """Args:
            base: the frozen linear layer to adapt.
            rank, alpha: the LoRA pair's rank r and scaling alpha / r.
            dropout: dropout on the LoRA path's input.
        """
        super().__init__()
        self.base, self.rank, self.scaling = base, rank, alpha / rank
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.register_buffer("olora_prev_A", torch.zeros(0, base.in_features, device=dev))
        self.register_buffer("olora_prev_B", torch.zeros(base.out_features, 0, device=dev))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        y = self.base(x)
        xf = x.to(self.lora_A.dtype)
        if self.olora_prev_A.shape[0]:
            y = y + (self.scaling * F.linear(F.linear(xf, self.olora_prev_A), self.olora_prev_B)).to(y.dtype)
        return y + (self.scaling * F.linear(F.linear(self.dropout(xf), self.lora_A), self.lora_B)).to(y.dtype)

    def overlap(self, squared: bool) -> torch.Tensor:
        if not self.olora_prev_A.shape[0]:
            return self.lora_A.new_zeros(())
        M = self.olora_prev_A @ self.lora_A.t()
        return M.pow(2).sum() if squared else M.abs().sum()

    @torch.no_grad()
    def append_and_reset(self) -> None:
        self.olora_prev_A = torch.cat([self.olora_prev_A, self.lora_A.detach()], 0)
        self.olora_prev_B = torch.cat([self.olora_prev_B, self.lora_B.detach()], 1)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B.zero_()


@register("o_lora", OLoraConfig)
class OLora(Method):
    def mergeable(self) -> bool:
        return True  # the sum of every task's B A

    def apply(self, model):
        c = self.cfg
        self.layers: Dict[str, OLoraLinear] = replace_linears(
            model, c.target_modules, lambda n, lin: OLoraLinear(lin, c.rank, c.alpha, c.dropout))
        self.overlaps: Dict[str, float] = {}
        return model

    def describe(self):
        c = self.cfg
        return {"kind": self.kind, "lambda_1": c.lambda_1, "lambda_2": c.lambda_2,
                "orth_penalty": c.orth_penalty}

    def loss_terms(self):
        sq = self.cfg.orth_penalty == "squared"
        orth = sum(l.overlap(sq) for l in self.layers.values())
        l2 = sum(l.lora_A.norm() + l.lora_B.norm() for l in self.layers.values())
        return orth, l2

    def extra_loss(self, model, batch) -> Optional[torch.Tensor]:
        c = self.cfg
        if c.lambda_1 == 0 and c.lambda_2 == 0:
            return None
        orth, l2 = self.loss_terms()
        return c.lambda_1 * orth + c.lambda_2 * l2

    def on_stage_end(self, model, stage_index, stage_name, train_batches):
        orth, _ = self.loss_terms()
        self.overlaps[stage_name] = float(orth)
        if self.run_dir is not None:
            from badit_exp.io_utils import atomic_write_json

            atomic_write_json(self.run_dir / "o_lora_overlap.json",
                              {"penalty": self.cfg.orth_penalty, "overlap_at_stage_end": self.overlaps})
        for l in self.layers.values():
            l.append_and_reset()

    # the previous pairs grow per task: checkpoints carry them and reloading resizes them
    def state_dict(self, model):
        st = super().state_dict(model)
        for n, l in self.layers.items():
            st[f"{n}.olora_prev_A"] = l.olora_prev_A.detach().cpu().clone()
            st[f"{n}.olora_prev_B"] = l.olora_prev_B.detach().cpu().clone()
        return st

    def load_state_dict(self, model, state):
        state = dict(state)
        for n, l in self.layers.items():
            for key in ("olora_prev_A", "olora_prev_B"):
                t = state.pop(f"{n}.{key}", None)
                if t is not None:
                    setattr(l, key, t.to(l.lora_A.device, l.lora_A.dtype))
        super().load_state_dict(model, state)
