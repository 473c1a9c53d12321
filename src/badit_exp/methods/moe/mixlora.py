"""MixLoRA (Li et al. 2024; training code TUDB-Labs/MoE-PEFT ``moe_peft/modules/mix_lora.py``
@ f5860b9).

Each decoder layer's FFN becomes a sparse mixture whose experts are the frozen FFN plus an
expert-specific LoRA on its gate, up and down projections:

    E_e(x) = (W_d + dW_d^e)( act((W_g + dW_g^e) x) * (W_u + dW_u^e) x ),   dW = s B A
    FFN'(x) = sum over the top-2 experts e of x of g_e(x) E_e(x)

The frozen W_g x and W_u x are computed once per token and shared by all experts; since W_d
is linear, sum_e g_e W_d h_e = W_d (sum_e g_e h_e) runs once per token too (the released code
runs it once per routed pair, k times per token). Only the routed pairs are computed
(sparse dispatch: k pairs per token, not E): each pair's LoRAs take every expert's A in one
matmul and keep its own expert's r columns, then every expert's B in one matmul, and one
``index_add`` combines the pairs; no Python loop over experts and no host sync. Tested equal to
the dense computation of every expert on every token, forward and gradients. Router: per token,
Linear(d -> E, no bias) in float32, init N(0, 0.02), softmax, top-2 of 8, renormalised.
Attention q and v get plain LoRA. Every B starts at 0: since the top-2 weights sum to 1, the
model equals the pre-trained one at step 0.

Load balancing: coef * E * sum_e f_e P_e (f_e: the share of top-k slots expert e receives, P_e:
its mean router probability) over the non-padding tokens, coef 0.01. ``balance_scope=layer``
(the default) balances every layer on its own and averages; ``balance_scope=global`` is the
released code, which concatenates the router outputs of all layers first, so one layer's
imbalance can cancel another's (the criticism also raised against the HF Mixtral loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from badit_exp.config import ConfigError
from badit_exp.methods.base import MethodConfig
from badit_exp.methods.moe.layer import LoRALinear, RouterStats, replace_linears, replace_modules
from badit_exp.methods.moe.loramoe import MoLoRA
from badit_exp.methods.moe.routers import TokenRouter, switch_balance_loss
from badit_exp.methods.moe.routing import RoutingContext, attach_routing_hook
from badit_exp.methods.registry import register

BALANCE_SCOPES = ("layer", "global")


@dataclass
class MixLoRAConfig(MethodConfig):
    target_modules: List[str] = field(default_factory=lambda: ["mlp"])  # the FFN blocks
    attention_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    rank: int = 8
    alpha: float = 16.0
    num_experts: int = 8
    top_k: int = 2
    router_init_std: float = 0.02
    balance_coef: float = 0.01
    balance_scope: str = "layer"  # layer: per layer, averaged | global: the released code's

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"method.top_k={self.top_k} must be in [1, method.num_experts="
                              f"{self.num_experts}].")
        if self.balance_scope not in BALANCE_SCOPES:
            raise ConfigError(f"method.balance_scope={self.balance_scope!r}; choose one of "
                              f"{list(BALANCE_SCOPES)}.")
        if self.balance_coef < 0 or self.router_init_std <= 0:
            raise ConfigError("method.balance_coef must be >= 0 and method.router_init_std > 0.")


def _kaiming(*shape, device) -> nn.Parameter:
    """(E, rows, cols) with each expert's (rows x cols) A kaiming-uniform (a = sqrt 5)."""
    t = torch.empty(*shape, device=device, dtype=torch.float32)
    for e in range(shape[0]):
        nn.init.kaiming_uniform_(t[e], a=math.sqrt(5))
    return nn.Parameter(t)


class MixLoRAMLP(RouterStats, nn.Module):
    """A decoder layer's frozen FFN (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``) as a
    sparse mixture of E LoRA-adapted copies of itself."""

    def __init__(self, mlp: nn.Module, num_experts: int, top_k: int, rank: int, alpha: float,
                 dropout: float, ctx: RoutingContext, router_init_std: float = 0.02):
        """Args:
            mlp: the frozen FFN block (kept whole; its projections are shared by the experts).
            num_experts, top_k: E experts, k of them per token.
            rank, alpha, dropout: each expert LoRA's rank r, scaling alpha / r, input dropout.
            ctx: the routing context (statistics switches, the attention mask for the loss).
            router_init_std: the router's N(0, std) init.
        """
        super().__init__()
        for part in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            if not hasattr(mlp, part):
                raise ValueError(f"MixLoRA needs a gated FFN with {part}; {type(mlp).__name__} "
                                 "has none.")
        self.mlp, self.ctx = mlp, ctx
        self.num_experts, self.top_k, self.rank = num_experts, top_k, rank
        self.scaling = alpha / rank
        d, f = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        dev = mlp.gate_proj.weight.device
        self.router = TokenRouter(d, num_experts, top_k, init="normal", device=dev)
        with torch.no_grad():
            self.router.weight.normal_(0.0, router_init_std)
        E = num_experts
        self.gate_lora_A = _kaiming(E, rank, d, device=dev)
        self.gate_lora_B = nn.Parameter(torch.zeros(E, f, rank, device=dev))
        self.up_lora_A = _kaiming(E, rank, d, device=dev)
        self.up_lora_B = nn.Parameter(torch.zeros(E, f, rank, device=dev))
        self.down_lora_A = _kaiming(E, rank, f, device=dev)
        self.down_lora_B = nn.Parameter(torch.zeros(E, d, rank, device=dev))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.last_mask: Optional[torch.Tensor] = None
        self._init_stats(num_experts)

    def _lora(self, x: torch.Tensor, which: str, e: int) -> torch.Tensor:
        A, B = getattr(self, f"{which}_lora_A")[e], getattr(self, f"{which}_lora_B")[e]
        return self.scaling * F.linear(F.linear(self.dropout(x).to(A.dtype), A), B)

    def expert(self, e: int, x: torch.Tensor, g0: torch.Tensor, u0: torch.Tensor) -> torch.Tensor:
        """E_e on tokens ``x`` given their frozen W_g x (``g0``) and W_u x (``u0``)."""
        g = g0 + self._lora(x, "gate", e).to(g0.dtype)
        u = u0 + self._lora(x, "up", e).to(u0.dtype)
        h = self.mlp.act_fn(g) * u
        return self.mlp.down_proj(h) + self._lora(h, "down", e).to(h.dtype)

    def route(self, xf: torch.Tensor) -> torch.Tensor:
        """(tokens, E) gates: the renormalised top-k probabilities, zeros elsewhere."""
        gates = self.router(xf, self.ctx)
        if self.ctx.record:
            self._record(gates, "token", self.ctx.reuse)
        if self.ctx.keep_gates and self.training:
            m = self.ctx.sequence_mask
            self.last_mask = (m.reshape(-1) if m is not None and m.numel() == xf.shape[0]
                              else None)
        return gates

    def _pair_lora(self, x: torch.Tensor, which: str, onehot: torch.Tensor,
                   tok: torch.Tensor = None) -> torch.Tensor:
        """s B_e A_e dropout(x) for the routed pairs, all experts at once: x times every
        expert's A (one matmul to E*r columns), the columns of the pair's own expert kept
        (``onehot``: (pairs, E*r) 0/1), times every expert's B (one matmul). With ``tok`` the
        rows of ``x`` are tokens and the A side runs once per token (one dropout mask per token
        and projection, as in the kit's fused layer), then is copied to the token's pairs.
        No loop over experts, no host sync; the extra work is E x a rank-r product, small next
        to the frozen FFN, which runs once per token."""
        A, B = getattr(self, f"{which}_lora_A"), getattr(self, f"{which}_lora_B")
        E, r = A.shape[:2]
        h = F.linear(self.dropout(x).to(A.dtype), A.reshape(E * r, -1))
        if tok is not None:
            h = h[tok]
        return self.scaling * F.linear(h * onehot, B.permute(1, 0, 2).reshape(B.shape[1], E * r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        gates = self.route(xf)
        w, idx = gates.topk(self.top_k, dim=-1)  # (tokens, k): weights renormalised by the router
        # the routed (token, expert) pairs, k per token
        tok = torch.arange(xf.shape[0], device=x.device).repeat_interleave(self.top_k)
        onehot = F.one_hot(idx.reshape(-1), self.num_experts).repeat_interleave(self.rank, dim=1)
        onehot = onehot.to(self.gate_lora_A.dtype)
        g0, u0 = self.mlp.gate_proj(xf), self.mlp.up_proj(xf)  # frozen, once for all experts
        g = g0[tok] + self._pair_lora(xf, "gate", onehot, tok).to(g0.dtype)
        u = u0[tok] + self._pair_lora(xf, "up", onehot, tok).to(u0.dtype)
        h = self.mlp.act_fn(g) * u  # (pairs, ffn)
        wt = w.reshape(-1, 1).to(h.dtype)
        # W_d is linear and shared: sum_e w_e W_d h_e = W_d (sum_e w_e h_e), one down projection
        # per token (not per routed pair); only the experts' own LoRAs see each h_e
        hsum = torch.zeros(xf.shape[0], h.shape[-1], dtype=h.dtype, device=x.device)
        y = self.mlp.down_proj(hsum.index_add(0, tok, h * wt))
        d = self._pair_lora(h, "down", onehot).to(y.dtype) * wt.to(y.dtype)
        return y.index_add(0, tok, d).to(x.dtype).reshape(*shape[:-1], -1)

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, weighted by the gates (the reference computation)."""
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        gates = self.router(xf, self.ctx)
        g0, u0 = self.mlp.gate_proj(xf), self.mlp.up_proj(xf)
        out = sum(gates[:, e:e + 1].to(x.dtype) * self.expert(e, xf, g0, u0)
                  for e in range(self.num_experts))
        return out.reshape(*shape[:-1], -1)


@register("mixlora", MixLoRAConfig)
class MixLoRA(MoLoRA):
    """MixLoRA: sparse mixtures of LoRA-adapted FFNs, plain LoRA on attention q and v."""

    skips_parameters = True  # an expert that no token of the step chose gets no gradient

    def mergeable(self) -> bool:
        return False  # the experts depend on the input

    def apply(self, model):
        c = self.cfg
        self.layers: Dict[str, nn.Module] = replace_modules(
            model, c.target_modules,
            lambda name, mlp: MixLoRAMLP(mlp, c.num_experts, c.top_k, c.rank, c.alpha,
                                         c.dropout, self.ctx, c.router_init_std))
        self.attention = (replace_linears(model, c.attention_modules,
                                          lambda name, lin: LoRALinear(lin, c.rank, c.alpha,
                                                                       c.dropout))
                          if c.attention_modules else {})
        self.ctx.keep_gates = c.balance_coef > 0
        self._hook = attach_routing_hook(model, self.ctx)
        return model

    def describe(self):
        c = self.cfg
        return {"kind": self.kind, "num_experts": c.num_experts, "top_k": c.top_k,
                "router": "token (fp32, N(0, 0.02))", "balance_coef": c.balance_coef,
                "balance_scope": c.balance_scope, "dispatch": "sparse (routed tokens only)",
                "attention_lora": list(c.attention_modules),
                "routing_at_generation": "per token"}

    def extra_loss(self, model, batch) -> Optional[torch.Tensor]:
        c = self.cfg
        if c.balance_coef <= 0:
            return None
        parts = [(l.router.last_probs, l.last_mask) for l in self.layers.values()
                 if l.router.last_probs is not None]
        if not parts:
            return None
        if c.balance_scope == "global":  # the released code: all layers' tokens together
            probs = torch.cat([p for p, _ in parts])
            masks = [m for _, m in parts]
            mask = torch.cat(masks) if all(m is not None for m in masks) else None
            return c.balance_coef * switch_balance_loss(probs, c.top_k, mask)
        return c.balance_coef * torch.stack([switch_balance_loss(p, c.top_k, m)
                                             for p, m in parts]).mean()
