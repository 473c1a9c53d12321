"""HydraLoRA (Tian et al., NeurIPS 2024; released code Clin0212/HydraLoRA @ afb693b).

One shared A (r x in) and N up-projections B_i (out x r) per adapted linear, mixed per token by
a dense softmax router: y = W x + s sum_i softmax(W_route x)_i B_i A x. A and the router are
kaiming-uniform (a = sqrt 5), every B_i = 0, so the adapter is exactly 0 at step 0. No auxiliary
loss in the released LLM code (``switch_coef`` adds the kit's Switch loss, off by default). No
task id at inference; not mergeable (the gates depend on the input).

On the kit: ``layout=shared_a``, ``router=dense``. ``method=hydralora`` is the released recipe
(gate/up/down, r = 4, alpha = 32, N = 4); ``method=hydralora_k8`` is BADIT's budget (gate_proj,
r = 4, K = 8: the same parameters as BADIT but one A instead of eight).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from badit_exp.methods.moe.loramoe import MoLoRA, MoLoRAConfig
from badit_exp.methods.registry import register


@dataclass
class HydraLoRAConfig(MoLoRAConfig):
    target_modules: List[str] = field(default_factory=lambda: ["gate_proj", "up_proj",
                                                               "down_proj"])
    num_experts: int = 4  # N, the released script's
    top_k: int = 4  # dense: every B_i is mixed
    router: str = "dense"
    layout: str = "shared_a"


@register("hydralora", HydraLoRAConfig)
class HydraLoRA(MoLoRA):
    """HydraLoRA on the kit: the LoRAMoE machinery with a shared A and a dense token router."""

    def describe(self):
        return {**super().describe(), "asymmetric": "one A shared by the N experts' B"}
