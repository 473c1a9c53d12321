"""LoRAMoE (Dou et al. 2024) and the shared machinery of every mixture-of-LoRA method.

``method=loramoe`` is the BADIT reference variant (gate_proj, K = 8, r = 4, sequence-level
top-k routing, standard LoRA init, no balancing loss). ``method=loramoe_original`` is the
authors' LoRAMoE: token-level dense routing on gate/up/down projections, each with its own
router, plus the localized balancing constraint (BASELINES.md):

    Q[b,k] = sum_t g[b,t,k];  I[b,k] = 1 + delta if expert k's group matches sample b's type
    else 1 - delta;  Z = I * Q;  loss = Var(Z) / (Mean(Z)^2 + 1e-10)   (per layer, summed)

Experts 0..K/2-1 are the world-knowledge group, the rest the downstream group; a sample's type
is 1 when its task is listed in ``knowledge_tasks``. Reproduced as defined; note that
minimising it pushes the matched group's weight *down* (Q proportional to 1/I).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from badit_exp import dist as D
from badit_exp.config import ConfigError
from badit_exp.io_utils import atomic_write_json
from badit_exp.methods.base import Method, MethodConfig
from badit_exp.methods.moe.layer import (
    FUNCTION_PRESERVING,
    ROUTER_POOLS,
    ROUTER_TYPES,
    MoLoRALinear,
    RoutingContext,
    attach_routing_hook,
    replace_linears,
)
from badit_exp.methods.registry import register
from badit_exp.plotting import router_usage


@dataclass
class MoLoRAConfig(MethodConfig):
    num_experts: int = 8
    top_k: int = 4  # the paper's K = 8, top-4; the reference configs set top_k = K (dense)
    router: str = "sequence"  # sequence (reference) | token | scalar (paper Eq. 7)
    balance_beta: float = 0.0  # LoRAMoE localized balancing loss weight (original: 0.1)
    balance_delta: float = 0.0  # its group-matching margin (original: 0.1)
    knowledge_tasks: List[str] = field(default_factory=list)  # tasks of sample type 1
    router_pool: str = "prompt"  # prompt: masked prompt mean | sequence: every token (released code)
    router_trainable: bool = True  # false: frozen at its random init (released code)
    expert_dropout: bool = True  # false: no dropout on the expert path (released code)
    function_preserving: str = "none"  # none | anchor | scaled_gates (see moe/layer.py)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_experts < 1:
            raise ConfigError(f"method.num_experts={self.num_experts} must be >= 1.")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"method.top_k={self.top_k} must be in [1, method.num_experts="
                              f"{self.num_experts}].")
        if self.router not in ROUTER_TYPES:
            raise ConfigError(f"method.router={self.router!r}; choose one of {list(ROUTER_TYPES)}.")
        if self.balance_beta < 0 or not 0 <= self.balance_delta < 1:
            raise ConfigError("method.balance_beta must be >= 0 and method.balance_delta in [0, 1).")
        if self.router_pool not in ROUTER_POOLS:
            raise ConfigError(f"method.router_pool={self.router_pool!r}; choose one of "
                              f"{list(ROUTER_POOLS)}.")
        if self.function_preserving not in FUNCTION_PRESERVING:
            raise ConfigError(f"method.function_preserving={self.function_preserving!r}; choose "
                              f"one of {list(FUNCTION_PRESERVING)}.")
        if self.function_preserving == "scaled_gates" and (
                self.router == "scalar" or self.top_k != self.num_experts):
            raise ConfigError(
                f"method.function_preserving=scaled_gates gives every expert gate K * softmax = 1 "
                f"at step 0, which needs dense routing: got router={self.router}, top_k="
                f"{self.top_k}, num_experts={self.num_experts}. Set method.top_k="
                f"{self.num_experts} with router=sequence|token, or use function_preserving=anchor.")
        if self.function_preserving != "none" and self.router == "scalar":
            raise ConfigError("method.router=scalar (Eq. 7, alpha_k = 1) is already exact at "
                              "init: set method.function_preserving=none.")
        if self.balance_beta > 0 and self.router != "token":
            raise ConfigError("method.balance_beta > 0 needs token-level gates: set "
                              "method.router=token.")


def balance_loss(gates: torch.Tensor, mask: torch.Tensor, sample_type: torch.Tensor,
                 delta: float) -> torch.Tensor:
    """LoRAMoE's localized balancing loss for one layer.

    Args:
        gates: (batch, tokens, K) router weights. mask: (batch, tokens) 1 on counted tokens.
        sample_type: (batch,) 1 = world-knowledge sample, 0 = other.
    """
    K = gates.shape[-1]
    Q = (gates.float() * mask.unsqueeze(-1).float()).sum(1)  # (b, K)
    group = (torch.arange(K, device=gates.device) < K // 2).long()  # 1 = knowledge group
    match = group[None, :] == sample_type[:, None].long()
    I = torch.where(match, 1.0 + delta, 1.0 - delta)
    Z = (I * Q).flatten()
    return Z.var(unbiased=True) / (Z.mean() ** 2 + 1e-10)


@register("loramoe", MoLoRAConfig)
class MoLoRA(Method):
    """K LoRA experts + a router on each target linear (standard LoRA init)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.layers: Dict[str, MoLoRALinear] = {}
        self.ctx = RoutingContext()
        self.stage_name = ""
        self.router_stats: Dict[str, Dict[str, Dict[str, List[float]]]] = {}

    def apply(self, model):
        c = self.cfg
        self.layers = replace_linears(
            model, c.target_modules,
            lambda name, lin: MoLoRALinear(lin, c.num_experts, c.rank, c.alpha, c.dropout,
                                           c.router, c.top_k, self.ctx,
                                           router_pool=c.router_pool,
                                           router_trainable=c.router_trainable,
                                           expert_dropout=c.expert_dropout,
                                           function_preserving=c.function_preserving))
        if c.function_preserving == "anchor":
            for layer in self.layers.values():
                layer.anchor()
        self.ctx.keep_gates = c.balance_beta > 0
        self._hook = attach_routing_hook(model, self.ctx)
        return model

    def describe(self):
        c = self.cfg
        return {"kind": self.kind, "num_experts": c.num_experts, "top_k": c.top_k,
                "router": c.router, "balance_beta": c.balance_beta,
                "router_pool": c.router_pool, "router_trainable": c.router_trainable,
                "expert_dropout": c.expert_dropout,
                "function_preserving": c.function_preserving,
                "routing_at_generation": ("computed once from the prompt, reused at every "
                                          "KV-cached decoding step" if c.router == "sequence"
                                          else "per token" if c.router == "token" else "static")}

    def on_stage_start(self, model, stage_index, stage_name, train_batches):
        self.stage_name = stage_name

    # -- checkpoints: frozen routers and anchors too (a permuted anchor is not re-derivable) ---
    def state_dict(self, model):
        state = super().state_dict(model)
        for name, layer in self.layers.items():
            prefix = f"{name}."
            if not layer.router_weight.requires_grad:
                state[prefix + "router_weight"] = layer.router_weight.detach().cpu().clone()
            for b in ("lora_A0", "lora_B0"):
                if hasattr(layer, b):
                    state[prefix + b] = getattr(layer, b).detach().cpu().clone()
        return state

    # -- balancing loss -----------------------------------------------------------------------
    def extra_loss(self, model, batch) -> Optional[torch.Tensor]:
        c = self.cfg
        if c.balance_beta <= 0:
            return None
        know = {self.task_names.index(t) for t in c.knowledge_tasks if t in self.task_names}
        ti = batch.get("task_index")
        stype = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long,
                            device=batch["input_ids"].device)
        if ti is not None and know:
            stype = torch.tensor([int(int(i) in know) for i in ti.tolist()], device=stype.device)
        mask = batch["attention_mask"]
        total = sum(balance_loss(l.last_gates, mask, stype, c.balance_delta)
                    for l in self.layers.values() if l.last_gates is not None)
        return c.balance_beta * total

    # -- router statistics at evaluation (the paper's Fig. 13) --------------------------------
    def start_eval(self, task: str) -> None:
        self.ctx.record = True
        for l in self.layers.values():
            l.reset_stats()

    def end_eval(self, task: str) -> None:
        self.ctx.record = False
        # evaluation is sharded over ranks: sum the statistics of every shard
        K = self.cfg.num_experts
        flat = D.all_reduce_sum([x for l in self.layers.values()
                                 for x in [*l.stats_sum.tolist(), float(l.stats_n)]])
        per_layer = {}
        for i, n in enumerate(self.layers):
            row = flat[i * (K + 1): (i + 1) * (K + 1)]
            per_layer[n] = [v / max(row[K], 1) for v in row[:K]]
        self.router_stats.setdefault(self.stage_name, {})[task] = per_layer
        if self.run_dir is not None:
            atomic_write_json(self.run_dir / "router_stats.json",
                              {"top_k": self.cfg.top_k, "num_experts": self.cfg.num_experts,
                               "stages": self.router_stats})

    def on_stage_end(self, model, stage_index, stage_name, train_batches):
        pass

    def after_evaluate(self, stage_name: str) -> None:
        """Plot the last layer's mean router weight per task for this stage."""
        stats = self.router_stats.get(stage_name)
        if not stats or self.run_dir is None:
            return
        last = list(self.layers)[-1]
        tasks = list(stats)
        router_usage(self.run_dir / f"router_usage_{stage_name}.png", tasks,
                     [stats[t][last] for t in tasks], self.cfg.top_k, title=f"{last} ({stage_name})")
