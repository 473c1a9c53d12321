"""The fused mixture-of-LoRA-experts linear layer and its routers.

K experts of rank r are stored stacked: ``lora_A`` (K*r x in) and ``lora_B`` (out x K*r), so
the rank-1 component i is (row i of A, column i of B) and expert k owns components
k*r .. (k+1)*r - 1. The forward pass is two matmuls of rank K*r (BASELINES.md, efficient form)::

    y = W x + s * ((dropout(x) A^T) * repeat_interleave(g, r)) B^T

with g (batch x K) for sequence-level routing or (batch x tokens x K) for token-level routing,
holding exact zeros for unselected experts (built with a scatter so the router gets the right
gradient). Identical to the per-expert sum up to float rounding.

Routers (``router_type``):

* ``sequence``: the reference code's. Linear(in -> K, no bias) on the input averaged over the
  *prompt* tokens (masked mean), softmax (float32), top-k, renormalised. During KV-cached
  generation the routing is computed once from the prompt (prefill) and reused at every
  decoding step (the reference disables the cache and recomputes from a growing sequence).
* ``token``: the same per token (top_k = K gives the original LoRAMoE's dense routing).
* ``scalar``: the paper's Eq. (7): learnable alpha_k initialised to 1, all experts active.

Options (SPEC 5.2; each a ``method.*`` key):

* ``router_pool``: what the sequence router averages. ``prompt``: the prompt tokens (masked
  mean). ``sequence``: every non-padding token, target included during training (the released
  code's unmasked mean; with batch 1, as it runs, padding never occurs so the two agree). At
  generation both see only the prompt at prefill and reuse those gates while decoding.
* ``router_trainable``: false freezes the router at its random init (the released code: PEFT
  trains only ``lora_`` parameters).
* ``expert_dropout``: false skips dropout on the expert path (the released code builds the
  dropout module but never applies it).
* ``function_preserving``: how the layer equals the pre-trained layer at step 0 whatever the
  router (BAD moves the top components out of W, and gates that sum to 1 bring back only part):

  - ``none``: y = W_res x + s sum_k g_k B_k A_k x (the released code; not exact at init).
  - ``anchor``: the initial experts are kept as frozen buffers A0, B0 and the base weight is
    left whole: y = W x + s sum_k g_k (B_k A_k - B0_k A0_k) x, exact at step 0 for any gates.
    The buffers move with their components when DOG regroups.
  - ``scaled_gates``: dense gates g = K * softmax(router logits) with a zero-initialised router,
    so every g_k = 1 at step 0 and W_res + s sum_k B_k A_k = W (needs top_k = K).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTER_TYPES = ("sequence", "token", "scalar")
ROUTER_POOLS = ("prompt", "sequence")
FUNCTION_PRESERVING = ("none", "anchor", "scaled_gates")


@dataclass
class RoutingContext:
    """Per-forward information shared by every mixture layer of a model.

    ``prompt_mask`` (batch x seq, 1 on prompt tokens) is set by a forward pre-hook on the model;
    ``reuse`` is true on KV-cached decoding steps, where sequence-level layers reuse the gates
    cached at prefill. ``record`` switches on router statistics (evaluation).
    """

    prompt_mask: Optional[torch.Tensor] = None
    sequence_mask: Optional[torch.Tensor] = None  # the attention mask (non-padding tokens)
    reuse: bool = False
    record: bool = False
    keep_gates: bool = False  # training: keep token gates for a balancing loss


class MoLoRALinear(nn.Module):
    """A frozen linear layer plus K rank-r LoRA experts and a router."""

    def __init__(self, base: nn.Linear, num_experts: int, rank: int, alpha: float,
                 dropout: float, router_type: str, top_k: int, ctx: RoutingContext,
                 router_pool: str = "prompt", router_trainable: bool = True,
                 expert_dropout: bool = True, function_preserving: str = "none"):
        """Args:
            base: the frozen linear layer to adapt (kept whole; its output is added to).
            num_experts, rank, alpha: K experts of rank r, scaling alpha / r.
            dropout: dropout on the expert path's input (if ``expert_dropout``).
            router_type: sequence | token | scalar (see the module docstring).
            top_k: experts kept per routing decision (renormalised softmax over them).
            ctx: the routing context shared by all layers (prompt mask, statistics switches).
            router_pool: what a sequence router reads: prompt (masked prompt mean) | sequence.
            router_trainable: false freezes the router at its random init (released code).
            expert_dropout: false: no dropout on the expert path (released code).
            function_preserving: none | anchor | scaled_gates (exact pre-trained function at
                step 0; see the module docstring).
        """
        super().__init__()
        if router_type not in ROUTER_TYPES:
            raise ValueError(f"router_type={router_type!r}; choose one of {ROUTER_TYPES}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        if router_pool not in ROUTER_POOLS:
            raise ValueError(f"router_pool={router_pool!r}; choose one of {ROUTER_POOLS}")
        if function_preserving not in FUNCTION_PRESERVING:
            raise ValueError(f"function_preserving={function_preserving!r}; choose one of "
                             f"{FUNCTION_PRESERVING}")
        if function_preserving == "scaled_gates" and (router_type == "scalar" or top_k != num_experts):
            raise ValueError("function_preserving=scaled_gates needs a sequence/token router "
                             "with top_k = num_experts")
        self.router_pool = router_pool
        self.function_preserving = function_preserving
        self.base = base
        self.num_experts, self.rank, self.top_k = num_experts, rank, top_k
        self.scaling = alpha / rank
        self.router_type = router_type
        self.ctx = ctx
        n, d_in, d_out = num_experts * rank, base.in_features, base.out_features
        dev = base.weight.device
        # adapters are kept in float32 whatever the base dtype (stable training, exact DOG);
        # under DeepSpeed bf16 the module is cast to bf16 and ZeRO keeps the float32 masters
        self.lora_A = nn.Parameter(torch.empty(n, d_in, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(d_out, n, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)  # PEFT's / LoRAMoE's init
        if router_type == "scalar":
            self.router_weight = nn.Parameter(torch.ones(num_experts, device=dev))
        else:
            lin = nn.Linear(d_in, num_experts, bias=False, device=dev, dtype=torch.float32)
            self.router_weight = lin.weight  # default nn.Linear init
            if function_preserving == "scaled_gates":
                nn.init.zeros_(self.router_weight)  # K * softmax(0) = 1 for every expert
        self.router_weight.requires_grad_(router_trainable)
        self.dropout = nn.Dropout(dropout) if dropout > 0 and expert_dropout else nn.Identity()
        if function_preserving == "anchor":  # the initial experts, frozen (set by anchor())
            self.register_buffer("lora_A0", torch.zeros(n, d_in, device=dev))
            self.register_buffer("lora_B0", torch.zeros(d_out, n, device=dev))
        self._cached_gates: Optional[torch.Tensor] = None
        self.last_gates: Optional[torch.Tensor] = None
        self.stats_sum = torch.zeros(num_experts, dtype=torch.float64)
        self.stats_n = 0

    # -- routing ----------------------------------------------------------------------------
    @torch.no_grad()
    def anchor(self) -> None:
        """Freeze the current experts as the anchor A0, B0 (``function_preserving=anchor``)."""
        self.lora_A0.copy_(self.lora_A)
        self.lora_B0.copy_(self.lora_B)

    def _topk(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=-1)
        if self.function_preserving == "scaled_gates":
            return probs * self.num_experts
        if self.top_k == self.num_experts:
            return probs
        val, idx = probs.topk(self.top_k, dim=-1)
        val = val / val.sum(-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, idx, val)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, K) for sequence/scalar routing, (batch, tokens, K) for token routing."""
        if self.router_type == "scalar":
            return self.router_weight.float().unsqueeze(0).expand(x.shape[0], -1)
        if self.router_type == "token":
            return self._topk(F.linear(x.float(), self.router_weight.float()))
        if self.ctx.reuse and self._cached_gates is not None:
            return self._cached_gates
        m = self.ctx.prompt_mask if self.router_pool == "prompt" else self.ctx.sequence_mask
        if m is None or m.shape[:2] != x.shape[:2]:
            pooled = x.float().mean(dim=1)
        else:
            m = m.to(x.device, torch.float32).unsqueeze(-1)
            pooled = (x.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
        g = self._topk(F.linear(pooled, self.router_weight.float()))
        self._cached_gates = g.detach()
        return g

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        g = self.gates(x)
        if self.ctx.record:
            self._record(g)
        if self.ctx.keep_gates and self.training:
            self.last_gates = g
        gr = g.repeat_interleave(self.rank, dim=-1)
        if gr.dim() == 2:
            gr = gr.unsqueeze(1)
        xd = self.dropout(x).to(self.lora_A.dtype)
        if self.function_preserving == "anchor":  # [A; A0] and [B, -B0]: one matmul each
            h = F.linear(xd, torch.cat([self.lora_A, self.lora_A0.to(xd.dtype)]))
            h = h * gr.repeat(*([1] * (gr.dim() - 1)), 2).to(h.dtype)
            return y + (self.scaling * F.linear(
                h, torch.cat([self.lora_B, -self.lora_B0.to(h.dtype)], 1))).to(y.dtype)
        # gates are float32; under DeepSpeed bf16 the experts are bf16: keep h in their dtype
        h = F.linear(xd, self.lora_A)
        h = h * gr.to(h.dtype)
        return y + (self.scaling * F.linear(h, self.lora_B)).to(y.dtype)

    def _record(self, g: torch.Tensor) -> None:
        if self.ctx.reuse and self.router_type == "sequence":
            return  # decoding steps reuse the prefill gates: count each sequence once
        g = g.detach().double().cpu()
        g = g / g.sum(-1, keepdim=True).clamp_min(1e-12)  # routing shares (scaled/scalar gates)
        if g.dim() == 3:
            g = g.reshape(-1, g.shape[-1])
        self.stats_sum += g.sum(0)
        self.stats_n += g.shape[0]

    def reset_stats(self) -> None:
        self.stats_sum.zero_()
        self.stats_n = 0

    # -- components -------------------------------------------------------------------------
    def expert_delta(self, k: int) -> torch.Tensor:
        """s * B_k A_k, the full-matrix update of expert k (for tests and analysis)."""
        sl = slice(k * self.rank, (k + 1) * self.rank)
        return self.scaling * self.lora_B[:, sl] @ self.lora_A[sl]


def attach_routing_hook(model: nn.Module, ctx: RoutingContext):
    """Fill ``ctx`` before every forward of ``model``: the prompt mask (attention mask minus
    the supervised target when labels are given) and whether this is a cached decoding step."""

    def hook(module, args, kwargs):
        am = kwargs.get("attention_mask")
        labels = kwargs.get("labels")
        # the KV cache is `cache` in recent transformers, `past_key_values` in older ones
        pkv = kwargs.get("cache", kwargs.get("past_key_values"))
        ids = kwargs.get("input_ids", args[0] if args else None)
        past = 0
        if pkv is not None and hasattr(pkv, "get_seq_length"):
            past = int(pkv.get_seq_length())
        ctx.reuse = past > 0
        if ctx.reuse:
            return None
        if am is None and ids is not None:
            am = torch.ones(ids.shape[:2], dtype=torch.long, device=ids.device)
        ctx.sequence_mask = am
        if am is not None and labels is not None:
            ctx.prompt_mask = am * (labels == -100).to(am.dtype)
        else:
            ctx.prompt_mask = am
        return None

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def replace_linears(model: nn.Module, target_modules, make) -> Dict[str, MoLoRALinear]:
    """Replace every ``nn.Linear`` whose name ends in one of ``target_modules`` by
    ``make(name, linear)``; return {name: new layer} in model order."""
    found: Dict[str, MoLoRALinear] = {}
    targets = tuple(target_modules)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name.split(".")[-1] in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            new = make(name, mod)
            setattr(parent, child, new)
            found[name] = new
    if not found:
        raise ValueError(f"method.target_modules={list(targets)} matches no nn.Linear in "
                         f"{type(model).__name__}; check the module names (e.g. gate_proj).")
    return found
