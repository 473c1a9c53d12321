"""SMoRA, "Each Rank Could be an Expert" (KDD 2026; released code StyxXuan/smora @ 7e7ada1,
where it is called SRMoLE).

Per token a sigmoid router scores the ranks: s = sigmoid(W_g x) (r / P values, each repeated P
times: ``rank_partition``, default 1, every rank its own expert), s' = s + b, the top-k of s'
are kept with gates k * s'_i / sum_selected s'_j, and y = W x + (alpha / k) B (g * A x).
A kaiming-uniform, B = 0, W_g nn.Linear's init; A, B and W_g train; b is the bias balancer's
(:mod:`.rankwise`), u = 1e-5, and enters the gate values as released (``bias_in_gates=false``:
it only chooses, as in DeepSeek-V3's loss-free balancing).

Against the release: a pure-PyTorch masked dense layer that imports anywhere (the release's
``import peft`` fails as shipped and its sparse path needs TVM kernels built for sm_90); A and
the router in one matmul; b moves once per optimizer step from non-padding counts summed over
ranks, never in evaluation (the release: every training forward, padding counted).

``method=smora`` is the released recipe (all linear projections, r = 64, k = 8, alpha = 16);
``method=smora_k8`` is BADIT's configuration (gate_proj, 32 ranks, 8 active).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from badit_exp.methods.moe.rankwise import Rankwise, RankwiseConfig
from badit_exp.methods.registry import register


@dataclass
class SMoRAConfig(RankwiseConfig):
    target_modules: List[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    rank: int = 64
    alpha: float = 16.0
    router: str = "rank"
    top_k: int = 8
    bias_rate: float = 1e-5
    bias_in_gates: bool = True
    rank_partition: int = 1


@register("smora", SMoRAConfig)
class SMoRA(Rankwise):
    """SMoRA on the kit: trained A, B and sigmoid rank router, bias in the gates."""
