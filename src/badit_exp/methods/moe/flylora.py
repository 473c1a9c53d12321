"""FlyLoRA (NeurIPS 2025; released code gfyddha/FlyLoRA @ 91d9e36, its modified PEFT layer).

Each rank an expert, routed implicitly: A is frozen, sparse and random (each row holds
d_in * k / r non-zeros at random positions, values N(0, (1/r)^2)), h = A x, the top-k of h + b
over the r ranks are kept as a binary mask (no gate values, no renormalisation) and only B
trains: y = W x + (alpha / r) B (m * h), B = 0 at step 0. b is the bias balancer's
(:mod:`.rankwise`), u = 0.01.

Fixed here, each an option where the release differs: b moves once per optimizer step, in
training only, from the counts of non-padding tokens summed over data-parallel ranks (the
release: every forward, evaluation and generation included); A comes from a seeded generator
whose seed is checkpointed; the gradient reaches the input through A x (``input_grad=false``:
the release's no_grad h); top-k of the signed h + b as the experiments ran (``implicit_abs``:
|h + b|, the minimal file's); a merge is refused (the release silently merges the dense B A).

``method=flylora`` is the released recipe (q/k/v/o/gate/up/down, r = 32, k = 8, alpha = 64);
``method=flylora_k8`` is BADIT's configuration (gate_proj, 32 ranks, 8 active).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from badit_exp.methods.moe.rankwise import Rankwise, RankwiseConfig
from badit_exp.methods.registry import register


@dataclass
class FlyLoRAConfig(RankwiseConfig):
    target_modules: List[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    rank: int = 32
    alpha: float = 64.0
    router: str = "implicit"
    top_k: int = 8
    bias_rate: float = 0.01
    a_init: str = "sparse_random"
    a_frozen: bool = True


@register("flylora", FlyLoRAConfig)
class FlyLoRA(Rankwise):
    """FlyLoRA on the kit: frozen sparse random A, implicit top-k router, only B trains."""
