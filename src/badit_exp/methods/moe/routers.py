"""Routers of the mixture kit: one small class each, behind one interface, chosen by name.

A router maps a layer's input ``x`` (batch, tokens, in) to float32 gates: (batch, K) when it
decides once per sequence (``level = "sequence"``) or once per model (``"static"``), or
(batch, tokens, K) per token (``"token"``). Unselected experts get exact zeros, built with a
scatter so the router receives the right gradient. Every router keeps, on request
(``ctx.keep_gates``), the probabilities of its last training forward (``last_probs``) for a
balancing loss.

==========  =====================================================================  =========
name        gates                                                                  used by
==========  =====================================================================  =========
sequence    softmax(W pool(x)) over K, top-k renormalised; pool = masked mean of   LoRAMoE,
            the prompt (``pool=prompt``) or of every token (``pool=sequence``);    BADIT
            computed at prefill, reused at every KV-cached decoding step
token       softmax(W x_t) per token, top-k renormalised                           MoLA,
                                                                                   MixLoRA
dense       softmax(W x_t) per token over all K (no top-k)                         HydraLoRA
scalar      learnable alpha_k, initialised to 1 (the BADIT paper's Eq. 7)          badit_paper
==========  =====================================================================  =========

Options of the linear routers: ``scaled`` (gates K * softmax, every gate 1 when the router is
zero-initialised: BADIT's ``function_preserving=scaled_gates``), ``init`` (``kaiming``: nn.Linear's
default, kaiming-uniform a = sqrt 5; ``normal``: N(0, 0.02), MixLoRA's; ``zeros``) and
``trainable`` (false: frozen at its init, the BADIT reference code).
"""

from __future__ import annotations

from typing import Dict, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

INITS = ("kaiming", "normal", "zeros")
POOLS = ("prompt", "sequence")


class Router(nn.Module):
    """The interface. Subclasses set ``level`` and implement :meth:`forward`."""

    level = "token"

    def __init__(self, d_in: int, num_experts: int, top_k: Optional[int] = None):
        super().__init__()
        self.d_in, self.num_experts = d_in, num_experts
        self.top_k = num_experts if top_k is None else top_k
        if not 1 <= self.top_k <= num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={num_experts}]")
        self.last_probs: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:  # pragma: no cover - interface
        """Gates for input ``x`` (see the module docstring), given the routing context."""
        raise NotImplementedError

    def reset_cache(self) -> None:
        """Forget gates cached for decoding (sequence routers)."""


class LinearRouter(Router):
    """Linear(in -> K, no bias) in float32, softmax, then top-k (or all, or scaled)."""

    def __init__(self, d_in: int, num_experts: int, top_k: Optional[int] = None, *,
                 scaled: bool = False, init: str = "kaiming", trainable: bool = True,
                 device=None):
        """Args:
            d_in: the layer's input size. num_experts: K.
            top_k: experts kept per decision (None = all, dense).
            scaled: gates K * softmax over all experts (needs top_k = K).
            init: kaiming | normal | zeros (see the module docstring).
            trainable: false freezes the router at its init.
            device: where the weight lives.
        """
        super().__init__(d_in, num_experts, top_k)
        if init not in INITS:
            raise ValueError(f"router init={init!r}; choose one of {INITS}")
        if scaled and self.top_k != num_experts:
            raise ValueError("scaled gates (K * softmax) need top_k = num_experts")
        # nn.Linear's own init (kaiming-uniform, a = sqrt 5) draws the same numbers as before
        self.weight = nn.Linear(d_in, num_experts, bias=False, device=device,
                                dtype=torch.float32).weight
        if init == "normal":
            nn.init.normal_(self.weight, std=0.02)
        elif init == "zeros" or scaled:
            nn.init.zeros_(self.weight)
        self.weight.requires_grad_(trainable)
        self.scaled = scaled

    def select(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        """softmax (float32) -> scaled, dense or top-k renormalised gates (zeros elsewhere)."""
        probs = torch.softmax(logits.float(), dim=-1)
        if ctx is not None and ctx.keep_gates and self.training:
            self.last_probs = probs
        if self.scaled:
            return probs * self.num_experts
        if self.top_k == self.num_experts:
            return probs
        val, idx = probs.topk(self.top_k, dim=-1)
        val = val / val.sum(-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, idx, val)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class TokenRouter(LinearRouter):
    level = "token"

    def forward(self, x, ctx):
        return self.select(self.logits(x), ctx)


class DenseRouter(TokenRouter):
    """Per-token softmax over every expert (top_k is K whatever is asked)."""

    def __init__(self, d_in: int, num_experts: int, top_k: Optional[int] = None, **kw):
        super().__init__(d_in, num_experts, num_experts, **kw)


class SequenceRouter(LinearRouter):
    level = "sequence"

    def __init__(self, d_in: int, num_experts: int, top_k: Optional[int] = None, *,
                 pool: str = "prompt", **kw):
        """Args: as :class:`LinearRouter`, plus ``pool``: prompt | sequence (what is averaged)."""
        super().__init__(d_in, num_experts, top_k, **kw)
        if pool not in POOLS:
            raise ValueError(f"router pool={pool!r}; choose one of {POOLS}")
        self.pool = pool
        self._cached: Optional[torch.Tensor] = None

    def forward(self, x, ctx):
        if ctx.reuse and self._cached is not None:
            return self._cached
        m = ctx.prompt_mask if self.pool == "prompt" else ctx.sequence_mask
        if m is None or m.shape[:2] != x.shape[:2]:
            pooled = x.float().mean(dim=1)
        else:
            m = m.to(x.device, torch.float32).unsqueeze(-1)
            pooled = (x.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
        g = self.select(self.logits(pooled), ctx)
        self._cached = g.detach()
        return g

    def reset_cache(self) -> None:
        self._cached = None


class ScalarRouter(Router):
    """Learnable alpha_k, initialised to 1, every expert active (Eq. 7)."""

    level = "static"

    def __init__(self, d_in: int, num_experts: int, top_k: Optional[int] = None, *,
                 trainable: bool = True, device=None, **_):
        super().__init__(d_in, num_experts, num_experts)
        self.weight = nn.Parameter(torch.ones(num_experts, device=device))
        self.weight.requires_grad_(trainable)

    def forward(self, x, ctx):
        return self.weight.float().unsqueeze(0).expand(x.shape[0], -1)


ROUTERS: Dict[str, Type[Router]] = {"sequence": SequenceRouter, "token": TokenRouter,
                                    "dense": DenseRouter, "scalar": ScalarRouter}


def make_router(name: str, d_in: int, num_experts: int, top_k: Optional[int] = None,
                **kw) -> Router:
    """The router called ``name`` (a key of :data:`ROUTERS`).

    Args:
        name: sequence | token | dense | scalar.
        d_in, num_experts, top_k: the layer's input size, K, experts kept per decision.
        **kw: the router's options (``scaled``, ``init``, ``trainable``, ``pool``, ``device``);
            options a router does not read are an error, except for ``scalar`` (no options).

    Returns:
        The router module (its parameter, if any, is ``weight``).
    """
    if name not in ROUTERS:
        raise ValueError(f"router={name!r}; choose one of {sorted(ROUTERS)}")
    if name != "sequence":
        kw.pop("pool", None)
    return ROUTERS[name](d_in, num_experts, top_k, **kw)


def switch_balance_loss(probs: torch.Tensor, top_k: int,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """E * sum_e f_e P_e (Switch / Mixtral / MixLoRA): f_e the share of top-k slots given to
    expert e, P_e its mean router probability, over the counted tokens.

    Args:
        probs: (..., E) router probabilities (before top-k).
        top_k: slots per token (a dense router counts its top-1).
        mask: (...) 1 on the tokens to count (None: all).

    Returns:
        A scalar; 1 for a perfectly balanced router, up to E for one that sends every token to
        one expert.
    """
    E = probs.shape[-1]
    p = probs.reshape(-1, E).float()
    m = torch.ones(p.shape[0], device=p.device) if mask is None else mask.reshape(-1).float()
    sel = torch.zeros_like(p).scatter(-1, p.topk(top_k, dim=-1).indices, 1.0)
    n = m.sum().clamp_min(1.0)
    f = (sel * m[:, None]).sum(0) / (n * top_k)
    P = (p * m[:, None]).sum(0) / n
    return E * (f * P).sum()


# ---------------------------------------------------------------------------- rank routers
# The rank-wise methods (FlyLoRA, SMoRA) gate each of the r ranks of ONE LoRA per token. Their
# routers read the layout's hidden h = A x (and, for `rank`, its own logits computed in the same
# matmul as h) plus a per-rank balancing bias b, and return float32 gates (..., r) that are zero
# off the selected ranks, with the selection's indices (..., k) for the bias balancer.
class RankRouter(nn.Module):
    """The interface of a rank router (no ``level``: always per token)."""

    def __init__(self, rank: int, top_k: int, alpha: float):
        super().__init__()
        if not 1 <= top_k <= rank:
            raise ValueError(f"top_k={top_k} must be in [1, rank={rank}]")
        self.rank, self.top_k = rank, top_k
        self.scaling = alpha / rank
        self.logit_dim = 0  # rows the router adds to the layout's A matmul

    def forward(self, h: torch.Tensor, logits: Optional[torch.Tensor],
                bias: torch.Tensor):  # pragma: no cover - interface
        raise NotImplementedError


class ImplicitRankRouter(RankRouter):
    """FlyLoRA: no parameters; binary top-k of h + b (``abs``: of |h + b|, the minimal release's
    variant); scale alpha / r. The bias only chooses, it never enters the gate."""

    def __init__(self, rank: int, top_k: int, alpha: float, *, abs_scores: bool = False, **_):
        super().__init__(rank, top_k, alpha)
        self.abs_scores = abs_scores

    def forward(self, h, logits, bias):
        s = h.detach().float() + bias
        if self.abs_scores:
            s = s.abs()
        idx = s.topk(self.top_k, dim=-1).indices
        return torch.zeros_like(s).scatter(-1, idx, 1.0), idx


class SigmoidRankRouter(RankRouter):
    """SMoRA: s = sigmoid(W_g x) (r / P values, each repeated P times), s' = s + b, top-k of s',
    gates k * s'_i / sum_selected s'_j (``bias_in_gates``, the release) or the same with s
    (the bias only chooses, DeepSeek-V3's loss-free balancing); scale alpha / k."""

    def __init__(self, rank: int, top_k: int, alpha: float, *, partition: int = 1,
                 bias_in_gates: bool = True, **_):
        super().__init__(rank, top_k, alpha)
        if partition < 1 or rank % partition:
            raise ValueError(f"rank_partition={partition} must divide rank={rank}")
        self.partition, self.bias_in_gates = partition, bias_in_gates
        self.scaling = alpha / top_k
        self.logit_dim = rank // partition

    def forward(self, h, logits, bias):
        s = torch.sigmoid(logits.float())
        if self.partition > 1:
            s = s.repeat_interleave(self.partition, dim=-1)
        sb = s + bias
        idx = sb.detach().topk(self.top_k, dim=-1).indices
        val = (sb if self.bias_in_gates else s).gather(-1, idx)
        val = self.top_k * val / val.sum(-1, keepdim=True)
        return torch.zeros_like(s).scatter(-1, idx, val), idx


RANK_ROUTERS: Dict[str, Type[RankRouter]] = {"implicit": ImplicitRankRouter,
                                             "rank": SigmoidRankRouter}
