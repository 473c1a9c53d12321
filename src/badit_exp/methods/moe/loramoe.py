"""LoRAMoE (Dou et al. 2024): the base class of every mixture-of-LoRA method of the kit.

``method=loramoe`` is the BADIT reference variant (gate_proj, K = 8, r = 4, sequence-level
top-k routing, standard LoRA init, no balancing loss). ``method=loramoe_original`` is the
authors' LoRAMoE: token-level dense routing on gate/up/down projections, each with its own
router, plus the localized balancing constraint (BASELINES.md):

    Q[b,k] = sum_t g[b,t,k];  I[b,k] = 1 + delta if expert k's group matches sample b's type
    else 1 - delta;  Z = I * Q;  loss = Var(Z) / (Mean(Z)^2 + 1e-10)   (per layer, summed)

Experts 0..K/2-1 are the world-knowledge group, the rest the downstream group; a sample's type
is 1 when its task is listed in ``knowledge_tasks``. Reproduced as defined; note that
minimising it pushes the matched group's weight *down* (Q proportional to 1/I).

A new mixture method subclasses :class:`MoLoRAConfig` (its defaults) and :class:`MoLoRA`
(usually nothing but ``describe``): the kit's keys choose the router (``router``, any of
:data:`.routers.ROUTERS`), the expert layout (``layout``), a per-layer number of experts
(``experts_per_layer`` or ``experts_by_depth``) and the Switch-style balancing loss
(``switch_coef``, per layer and averaged).
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
    LAYOUTS,
    MoLoRALinear,
    RouterSpec,
    layer_index,
    replace_linears,
)
from badit_exp.methods.moe.routers import INITS, POOLS, ROUTERS, switch_balance_loss
from badit_exp.methods.moe.routing import RoutingContext, attach_routing_hook
from badit_exp.methods.registry import register
from badit_exp.plotting import router_usage


@dataclass
class MoLoRAConfig(MethodConfig):
    num_experts: int = 8
    top_k: int = 4  # the paper's K = 8, top-4; the reference configs set top_k = K (dense)
    router: str = "sequence"  # sequence (reference) | token | dense | scalar (paper Eq. 7)
    router_init: str = "kaiming"  # kaiming (nn.Linear's) | normal (N(0, 0.02)) | zeros
    layout: str = "separate"  # separate: one A per expert | shared_a: one A for all (HydraLoRA)
    # a per-layer number of experts (MoLA): one K per decoder layer, or one K per equal part
    # of the depth ([2, 4, 6, 8]: quarters); empty = num_experts everywhere
    experts_per_layer: List[int] = field(default_factory=list)
    experts_by_depth: List[int] = field(default_factory=list)
    balance_beta: float = 0.0  # LoRAMoE localized balancing loss weight (original: 0.1)
    balance_delta: float = 0.0  # its group-matching margin (original: 0.1)
    knowledge_tasks: List[str] = field(default_factory=list)  # tasks of sample type 1
    switch_coef: float = 0.0  # Switch-style loss coef * E * sum_e f_e P_e, per layer, averaged
    router_pool: str = "prompt"  # prompt: masked prompt mean | sequence: every token (released code)
    router_trainable: bool = True  # false: frozen at its random init (released code)
    expert_dropout: bool = True  # false: no dropout on the expert path (released code)
    function_preserving: str = "none"  # none | anchor | scaled_gates (see moe/layer.py)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_experts < 1:
            raise ConfigError(f"method.num_experts={self.num_experts} must be >= 1.")
        if self.router not in ROUTERS:
            raise ConfigError(f"method.router={self.router!r}; choose one of {sorted(ROUTERS)}.")
        if self.router_init not in INITS:
            raise ConfigError(f"method.router_init={self.router_init!r}; choose one of {list(INITS)}.")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"method.layout={self.layout!r}; choose one of {list(LAYOUTS)}.")
        ks = list(self.experts_per_layer) + list(self.experts_by_depth)
        if self.experts_per_layer and self.experts_by_depth:
            raise ConfigError("method.experts_per_layer and method.experts_by_depth are both set; "
                              "keep one.")
        if any(k < 1 for k in ks):
            raise ConfigError(f"method.experts_per_layer / experts_by_depth = {ks}: every K "
                              "must be >= 1.")
        smallest = min(ks) if ks else self.num_experts
        if self.router in ("sequence", "token") and not 1 <= self.top_k <= smallest:
            raise ConfigError(f"method.top_k={self.top_k} must be in [1, {smallest}] (the "
                              "smallest number of experts of a layer).")
        if self.balance_beta < 0 or not 0 <= self.balance_delta < 1:
            raise ConfigError("method.balance_beta must be >= 0 and method.balance_delta in [0, 1).")
        if self.switch_coef < 0:
            raise ConfigError(f"method.switch_coef={self.switch_coef} must be >= 0.")
        if self.router_pool not in POOLS:
            raise ConfigError(f"method.router_pool={self.router_pool!r}; choose one of "
                              f"{list(POOLS)}.")
        if self.function_preserving not in FUNCTION_PRESERVING:
            raise ConfigError(f"method.function_preserving={self.function_preserving!r}; choose "
                              f"one of {list(FUNCTION_PRESERVING)}.")
        if self.function_preserving == "scaled_gates" and (
                self.router not in ("sequence", "token") or self.top_k != self.num_experts):
            raise ConfigError(
                f"method.function_preserving=scaled_gates gives every expert gate K * softmax = 1 "
                f"at step 0, which needs dense routing: got router={self.router}, top_k="
                f"{self.top_k}, num_experts={self.num_experts}. Set method.top_k="
                f"{self.num_experts} with router=sequence|token, or use function_preserving=anchor.")
        if self.function_preserving != "none" and self.router == "scalar":
            raise ConfigError("method.router=scalar (Eq. 7, alpha_k = 1) is already exact at "
                              "init: set method.function_preserving=none.")
        if self.function_preserving == "anchor" and self.layout != "separate":
            raise ConfigError("method.function_preserving=anchor needs method.layout=separate.")
        if self.balance_beta > 0 and self.router not in ("token", "dense"):
            raise ConfigError("method.balance_beta > 0 needs token-level gates: set "
                              "method.router=token.")
        if self.switch_coef > 0 and self.router not in ("token", "dense"):
            raise ConfigError("method.switch_coef > 0 needs a per-token router: set "
                              "method.router=token or dense.")

    def experts_of(self, layer: Optional[int], num_layers: int) -> int:
        """K of decoder layer ``layer`` (of ``num_layers``)."""
        if self.experts_per_layer:
            if len(self.experts_per_layer) != num_layers:
                raise ConfigError(f"method.experts_per_layer has {len(self.experts_per_layer)} "
                                  f"values for a model with {num_layers} layers; give one per "
                                  "layer, or use method.experts_by_depth.")
            return self.experts_per_layer[layer or 0]
        if self.experts_by_depth:
            part = (layer or 0) * len(self.experts_by_depth) // max(num_layers, 1)
            return self.experts_by_depth[part]
        return self.num_experts


def balance_loss(gates: torch.Tensor, mask: torch.Tensor, sample_type: torch.Tensor,
                 delta: float) -> torch.Tensor:
    """LoRAMoE's localized balancing loss for one layer.

    Args:
        gates: (batch, tokens, K) router weights. mask: (batch, tokens) 1 on counted tokens.
        sample_type: (batch,) 1 = world-knowledge sample, 0 = other.
        delta: the group-matching margin.

    Returns:
        Var(Z) / (Mean(Z)^2 + 1e-10), a scalar.
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
        self.layers: Dict[str, torch.nn.Module] = {}
        self.ctx = RoutingContext()
        self.stage_name = ""
        self.router_stats: Dict[str, Dict[str, Dict[str, List[float]]]] = {}

    def router_spec(self) -> RouterSpec:
        c = self.cfg
        return RouterSpec(c.router, c.top_k, {"pool": c.router_pool, "init": c.router_init,
                                             "trainable": c.router_trainable})

    def make_layer(self, name: str, lin, num_experts: int) -> MoLoRALinear:
        """The mixture layer replacing the Linear ``name`` (a subclass may change it)."""
        c = self.cfg
        return MoLoRALinear(lin, num_experts, c.rank, c.alpha, c.dropout, self.router_spec(),
                            self.ctx, layout=c.layout, expert_dropout=c.expert_dropout,
                            function_preserving=c.function_preserving)

    def apply(self, model):
        c = self.cfg
        n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", 1)
        self.layers = replace_linears(
            model, c.target_modules,
            lambda name, lin: self.make_layer(name, lin, c.experts_of(layer_index(name), n_layers)))
        if c.function_preserving == "anchor":
            for layer in self.layers.values():
                layer.anchor()
        self.ctx.keep_gates = c.balance_beta > 0 or c.switch_coef > 0
        self._hook = attach_routing_hook(model, self.ctx)
        return model

    def mergeable(self) -> bool:
        """Only static gates give a fixed update (Eq. 7's scalar router)."""
        return self.cfg.router == "scalar"

    def describe(self):
        c = self.cfg
        return {"kind": self.kind, "num_experts": c.num_experts, "top_k": c.top_k,
                "router": c.router, "layout": c.layout, "balance_beta": c.balance_beta,
                "switch_coef": c.switch_coef,
                "experts_per_layer": {n: l.num_experts for n, l in self.layers.items()},
                "router_pool": c.router_pool, "router_trainable": c.router_trainable,
                "expert_dropout": c.expert_dropout,
                "function_preserving": c.function_preserving,
                "routing_at_generation": ("computed once from the prompt, reused at every "
                                          "KV-cached decoding step" if c.router == "sequence"
                                          else "static" if c.router == "scalar" else "per token")}

    def on_stage_start(self, model, stage_index, stage_name, train_batches):
        self.stage_name = stage_name

    # -- checkpoints: frozen routers and anchors too (a permuted anchor is not re-derivable) ---
    def state_dict(self, model):
        state = super().state_dict(model)
        for name, layer in self.layers.items():
            prefix = f"{name}."
            for pname, p in layer.named_parameters():
                if pname.startswith("router") and not p.requires_grad:
                    state[prefix + pname] = p.detach().cpu().clone()
            for b in ("lora_A0", "lora_B0"):
                if hasattr(layer, b):
                    state[prefix + b] = getattr(layer, b).detach().cpu().clone()
        return state

    # -- balancing losses ---------------------------------------------------------------------
    def extra_loss(self, model, batch) -> Optional[torch.Tensor]:
        c = self.cfg
        total = None
        if c.balance_beta > 0:
            know = {self.task_names.index(t) for t in c.knowledge_tasks if t in self.task_names}
            ti = batch.get("task_index")
            stype = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long,
                                device=batch["input_ids"].device)
            if ti is not None and know:
                stype = torch.tensor([int(int(i) in know) for i in ti.tolist()],
                                     device=stype.device)
            mask = batch["attention_mask"]
            total = c.balance_beta * sum(balance_loss(l.last_gates, mask, stype, c.balance_delta)
                                         for l in self.layers.values()
                                         if l.last_gates is not None)
        if c.switch_coef > 0:
            sw = self.switch_loss(batch["attention_mask"])
            total = sw if total is None else total + sw
        return total

    def switch_loss(self, mask: torch.Tensor) -> torch.Tensor:
        """``switch_coef`` x the Switch loss of every layer's last training forward, averaged
        over layers (each layer balanced on its own)."""
        losses = []
        for l in self.layers.values():
            r = l.router
            if r.last_probs is None:
                continue
            k = r.top_k if r.top_k < r.num_experts else 1
            losses.append(switch_balance_loss(r.last_probs, k, mask))
        return self.cfg.switch_coef * torch.stack(losses).mean()

    # -- router statistics (evaluation) ---------------------------------------------------------
    def start_eval(self, task: str) -> None:
        self.ctx.record = True
        for l in self.layers.values():
            l.reset_stats()

    def end_eval(self, task: str) -> None:
        self.ctx.record = False
        # evaluation is sharded over ranks: sum the statistics of every shard
        sizes = [l.num_experts for l in self.layers.values()]
        flat = D.all_reduce_sum([x for l in self.layers.values()
                                 for x in [*l.stats_sum.tolist(), float(l.stats_n)]])
        per_layer, at = {}, 0
        for n, K in zip(self.layers, sizes):
            row = flat[at: at + K + 1]
            at += K + 1
            # routing shares to 6 decimals: the file (every stage x task x layer) is committed
            # with each study run, and 17 digits made it 1.3 MB of a sequential run's 1.6
            per_layer[n] = [round(v / max(row[K], 1), 6) for v in row[:K]]
        self.router_stats.setdefault(self.stage_name, {})[task] = per_layer
        if self.run_dir is not None:
            atomic_write_json(self.run_dir / "router_stats.json",
                              {"top_k": self.cfg.top_k, "num_experts": self.cfg.num_experts,
                               "num_experts_per_layer": dict(zip(self.layers, sizes)),
                               "stages": self.router_stats}, compact=True)

    def after_evaluate(self, stage_name: str) -> None:
        """Plot the last layer's mean router weight per task for this stage."""
        stats = self.router_stats.get(stage_name)
        if not stats or self.run_dir is None:
            return
        last = list(self.layers)[-1]
        tasks = list(stats)
        router_usage(self.run_dir / f"router_usage_{stage_name}.png", tasks,
                     [stats[t][last] for t in tasks], min(self.cfg.top_k,
                                                          self.layers[last].num_experts),
                     title=f"{last} ({stage_name})")
