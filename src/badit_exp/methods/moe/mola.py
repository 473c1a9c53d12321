"""MoLA (Gao et al., "Higher Layers Need More LoRA Experts"; released code GCYZSL/MoLA @ 01785c8).

LoRA experts (one A and one B each) with per-token top-2 routing (softmax in float32, top-k,
renormalised), and a different number of experts per decoder layer, growing with depth: the
released scripts give 2/4/6/8 experts to the four quarters of LLaMA-2-7B's 32 layers
(``experts_by_depth``; an explicit list per layer is ``experts_per_layer``). r = 8, alpha = 16,
dropout 0.05 on the seven linear projections of each block; router and A kaiming-uniform, B = 0
(the adapter is 0 at step 0). The balancing loss is off by default (``obalance``; here
``switch_coef``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from badit_exp.methods.moe.loramoe import MoLoRA, MoLoRAConfig
from badit_exp.methods.registry import register


@dataclass
class MolaConfig(MoLoRAConfig):
    target_modules: List[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    rank: int = 8
    alpha: float = 16.0
    num_experts: int = 8  # the largest K (the last quarter's)
    top_k: int = 2
    router: str = "token"
    experts_by_depth: List[int] = field(default_factory=lambda: [2, 4, 6, 8])


@register("mola", MolaConfig)
class Mola(MoLoRA):
    """MoLA on the kit: separate experts, token top-2 router, K growing with depth."""
