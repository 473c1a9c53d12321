"""The fused mixture-of-LoRA-experts linear layer of the kit, its expert layouts and injection.

K experts of rank r. Their up-projections are stored stacked in ``lora_B`` (out x K*r): expert k
owns columns k*r .. (k+1)*r - 1. The down-projection depends on the **layout**:

* ``separate`` (LoRAMoE, BADIT, MoLA): ``lora_A`` (K*r x in), one A per expert; the rank-1
  component i is (row i of A, column i of B).
* ``shared_a`` (HydraLoRA, mtLoRA): ``lora_A`` (r x in), one A shared by every expert.

Either way the forward pass is two matmuls (BASELINES.md, efficient form), no loop over experts::

    h = dropout(x) A^T                       (..., K*r)  [shared_a: (..., r) tiled K times]
    y = W x + s * (h * repeat_interleave(g, r)) B^T

with g the router's gates (see :mod:`.routers`): (batch, K) per sequence or static, (batch,
tokens, K) per token, exact zeros for unselected experts. Equal to the per-expert sum
sum_k g_k B_k A_k x up to float rounding (tested for every layout x router, with gradients).
The number of experts is the layer's own: a method may give each layer another K (MoLA).

``function_preserving`` (how the layer equals the pre-trained one at step 0 whatever the gates,
SPEC 5.2; BADIT moves the top components out of W):

* ``none``: y = W_res x + s sum_k g_k B_k A_k x (the released code; not exact after BAD).
* ``anchor``: the initial experts are kept as frozen buffers A0, B0 and W stays whole:
  y = W x + s sum_k g_k (B_k A_k - B0_k A0_k) x (``separate`` layout only). The buffers move
  with their components when DOG regroups.
* ``scaled_gates``: gates K * softmax of a zero-initialised router, so every g_k = 1 at step 0
  and W_res + s sum_k B_k A_k = W (a dense linear router).

Adapters are float32 whatever the base dtype (stable training, exact DOG); under DeepSpeed bf16
the module is cast to bf16 and ZeRO keeps the float32 masters: routing stays float32 and the
expert path runs in the experts' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from badit_exp.methods.moe.routers import ROUTERS, Router, make_router
from badit_exp.methods.moe.routing import RoutingContext

LAYOUTS = ("separate", "shared_a")
FUNCTION_PRESERVING = ("none", "anchor", "scaled_gates")


@dataclass(frozen=True)
class RouterSpec:
    """A router by name and options, built by the layer after its experts (so the random draws
    come in the same order for every router: experts first)."""

    name: str
    top_k: Optional[int] = None
    options: Dict[str, Any] = field(default_factory=dict)


class RouterStats:
    """Mean routing share per expert over the recorded forwards (evaluation statistics)."""

    def _init_stats(self, num_experts: int) -> None:
        self.stats_sum = torch.zeros(num_experts, dtype=torch.float64)
        self.stats_n = 0

    def _record(self, g: torch.Tensor, level: str, reuse: bool) -> None:
        if reuse and level == "sequence":
            return  # decoding steps reuse the prefill gates: count each sequence once
        g = g.detach().double().cpu()
        g = g / g.sum(-1, keepdim=True).clamp_min(1e-12)  # routing shares (scaled/scalar gates)
        g = g.reshape(-1, g.shape[-1])
        self.stats_sum += g.sum(0)
        self.stats_n += g.shape[0]

    def reset_stats(self) -> None:
        self.stats_sum.zero_()
        self.stats_n = 0


class MoLoRALinear(RouterStats, nn.Module):
    """A frozen linear layer plus K rank-r LoRA experts (a layout) and a router."""

    def __init__(self, base: nn.Linear, num_experts: int, rank: int, alpha: float,
                 dropout: float, router: Union[Router, RouterSpec], ctx: RoutingContext, *,
                 layout: str = "separate", expert_dropout: bool = True,
                 function_preserving: str = "none"):
        """Args:
            base: the frozen linear layer to adapt (kept whole; its output is added to).
            num_experts, rank, alpha: K experts of rank r, scaling alpha / r.
            dropout: dropout on the expert path's input (if ``expert_dropout``).
            router: a :class:`.routers.Router`, or a :class:`RouterSpec` built here after the
                experts' init.
            ctx: the routing context shared by all layers (prompt mask, statistics switches).
            layout: separate | shared_a (see the module docstring).
            expert_dropout: false: no dropout on the expert path (the BADIT released code).
            function_preserving: none | anchor | scaled_gates (see the module docstring).
        """
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r}; choose one of {LAYOUTS}")
        if function_preserving not in FUNCTION_PRESERVING:
            raise ValueError(f"function_preserving={function_preserving!r}; choose one of "
                             f"{FUNCTION_PRESERVING}")
        if function_preserving == "anchor" and layout != "separate":
            raise ValueError("function_preserving=anchor needs layout=separate")
        self.base, self.ctx = base, ctx
        self.layout, self.function_preserving = layout, function_preserving
        self.num_experts, self.rank = num_experts, rank
        self.scaling = alpha / rank
        n, d_in, d_out = num_experts * rank, base.in_features, base.out_features
        dev = base.weight.device
        a_rows = n if layout == "separate" else rank
        self.lora_A = nn.Parameter(torch.empty(a_rows, d_in, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(d_out, n, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)  # PEFT's / LoRAMoE's / HydraLoRA's
        if isinstance(router, RouterSpec):
            opts = dict(router.options, device=dev)
            if function_preserving == "scaled_gates":
                opts["scaled"] = True
            router = make_router(router.name, d_in, num_experts, router.top_k, **opts)
        if router.num_experts != num_experts:
            raise ValueError(f"the router has {router.num_experts} experts, the layer "
                             f"{num_experts}")
        if function_preserving == "scaled_gates" and not getattr(router, "scaled", False):
            raise ValueError("function_preserving=scaled_gates needs a dense linear router "
                             "with scaled gates (K * softmax, zero init)")
        self.router = router
        self.top_k = router.top_k
        self.dropout = nn.Dropout(dropout) if dropout > 0 and expert_dropout else nn.Identity()
        if function_preserving == "anchor":  # the initial experts, frozen (set by anchor())
            self.register_buffer("lora_A0", torch.zeros(n, d_in, device=dev))
            self.register_buffer("lora_B0", torch.zeros(d_out, n, device=dev))
        self.last_gates: Optional[torch.Tensor] = None
        self._init_stats(num_experts)

    @property
    def router_type(self) -> str:
        """The router's name (a key of :data:`.routers.ROUTERS`)."""
        return next(k for k, v in ROUTERS.items() if type(self.router) is v)

    @property
    def router_weight(self) -> torch.nn.Parameter:
        return self.router.weight

    @torch.no_grad()
    def anchor(self) -> None:
        """Freeze the current experts as the anchor A0, B0 (``function_preserving=anchor``)."""
        self.lora_A0.copy_(self.lora_A)
        self.lora_B0.copy_(self.lora_B)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, K) for sequence/static routing, (batch, tokens, K) for token routing."""
        return self.router(x, self.ctx)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """dropout(x) A^T laid out as (..., K*r) whatever the layout."""
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)
        if self.layout == "shared_a":
            h = h.repeat(*([1] * (h.dim() - 1)), self.num_experts)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        g = self.gates(x)
        if self.ctx.record:
            self._record(g, self.router.level, self.ctx.reuse)
        if self.ctx.keep_gates and self.training:
            self.last_gates = g
        gr = g.repeat_interleave(self.rank, dim=-1) if self.layout == "separate" else None
        if gr is not None and gr.dim() == 2:
            gr = gr.unsqueeze(1)
        if self.function_preserving == "anchor":  # [A; A0] and [B, -B0]: one matmul each
            xd = self.dropout(x).to(self.lora_A.dtype)
            h = F.linear(xd, torch.cat([self.lora_A, self.lora_A0.to(xd.dtype)]))
            h = h * gr.repeat(*([1] * (gr.dim() - 1)), 2).to(h.dtype)
            return y + (self.scaling * F.linear(
                h, torch.cat([self.lora_B, -self.lora_B0.to(h.dtype)], 1))).to(y.dtype)
        if self.layout == "shared_a":  # gated copies of the one hidden: g_k h, (..., K*r)
            hs = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)
            gg = g if g.dim() == hs.dim() else g.unsqueeze(1)
            h = (gg.to(hs.dtype).unsqueeze(-1) * hs.unsqueeze(-2)).flatten(-2)
        else:
            h = self.hidden(x) * gr.to(self.lora_A.dtype)  # gates are float32: keep the experts'
        return y + (self.scaling * F.linear(h, self.lora_B)).to(y.dtype)

    # -- components -------------------------------------------------------------------------
    def expert_A(self, k: int) -> torch.Tensor:
        """A_k (r x in): expert k's rows (``separate``) or the shared A."""
        if self.layout == "shared_a":
            return self.lora_A
        return self.lora_A[k * self.rank: (k + 1) * self.rank]

    def expert_delta(self, k: int) -> torch.Tensor:
        """s * B_k A_k, the full-matrix update of expert k (for tests and analysis)."""
        sl = slice(k * self.rank, (k + 1) * self.rank)
        return self.scaling * self.lora_B[:, sl] @ self.expert_A(k)


class LoRALinear(nn.Module):
    """A plain LoRA layer (y = W x + s B A dropout(x), A kaiming-uniform, B = 0): what a
    mixture method puts on the modules that get no experts (MixLoRA's q and v)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        """Args: base (frozen), rank r, alpha (scaling alpha / r), dropout on the input."""
        super().__init__()
        self.base, self.rank, self.scaling = base, rank, alpha / rank
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)
        return self.base(x) + (self.scaling * F.linear(h, self.lora_B)).to(x.dtype)


def replace_modules(model: nn.Module, names, make: Callable[[str, nn.Module], nn.Module],
                    kind: type = nn.Module) -> Dict[str, nn.Module]:
    """Replace every module of type ``kind`` whose name ends in one of ``names`` (a Linear like
    ``gate_proj``, or a whole block like a decoder layer's ``mlp``) by ``make(name, module)``.

    Returns:
        {name: new module}, in model order.

    Raises:
        ValueError: nothing matched (the message names the suffixes).
    """
    found: Dict[str, nn.Module] = {}
    targets = tuple(names)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, kind) and name.split(".")[-1] in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            new = make(name, mod)
            setattr(parent, child, new)
            found[name] = new
    if not found:
        raise ValueError(f"method.target_modules={list(targets)} matches no {kind.__name__} in "
                         f"{type(model).__name__}; check the module names (e.g. gate_proj, mlp).")
    return found


def replace_linears(model: nn.Module, target_modules, make) -> Dict[str, nn.Module]:
    """:func:`replace_modules` for ``nn.Linear`` layers."""
    return replace_modules(model, target_modules, make, kind=nn.Linear)


def layer_index(name: str) -> Optional[int]:
    """The decoder layer a module belongs to (``model.layers.<i>.mlp.gate_proj`` -> i)."""
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None
