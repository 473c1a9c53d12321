"""Each rank an expert: the rank-gated layout, the bias balancer, and the base of FlyLoRA and
SMoRA (``../shared/docs/METHODS_NEXT.md``, "The rank-wise wave").

One LoRA (A: r x in, B: out x r) whose r rank-1 components are gated per token::

    [h; z] = dropout(x) [A; W_g]^T     one matmul (W_g: the `rank` router's r / P rows)
    g, idx = router(h, z, b)           top-k of the r ranks, zeros elsewhere (float32)
    y      = W x + s * (g * h) B^T     one matmul

No loop over ranks: with r <= 64 the masked dense form costs two thin matmuls, cheaper on CPU and
GPU than gathering k columns per token. Equal to the per-rank sum s sum_{i in top-k} g_i b_i a_i x
(tested with gradients).

**The bias balancer** (auxiliary-loss-free balancing, one for both methods): each layer keeps a
per-rank bias b (a buffer, no gradient) and counts c_i, the non-padding tokens whose top-k holds
rank i. Once per optimizer step, from the counts of all its micro-batches summed over every
data-parallel rank, b += u * sign(mean(c) - c); the counts then restart. Counting happens only
in training mode and once per model forward (a gradient-checkpointing recomputation of the
layer sees the same forward id and is not counted again), so evaluation, generation and
recomputation never move b, and DDP / ZeRO-2 replicas stay identical. The releases update b in
every forward, evaluation and generation included, from counts with padding.

The bias is checkpointed and exported with the adapter. Neither method is mergeable: the update
depends on the input through the top-k (FlyLoRA's released merge adds the dense all-rank B A, a
different function).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from badit_exp import dist as D
from badit_exp.config import ConfigError
from badit_exp.methods.base import Method, MethodConfig
from badit_exp.methods.moe.layer import replace_linears
from badit_exp.methods.moe.routers import RANK_ROUTERS, RankRouter
from badit_exp.methods.moe.routing import RoutingContext, attach_routing_hook

A_INITS = ("kaiming", "sparse_random")


def sparse_random_A(rank: int, d_in: int, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """FlyLoRA's frozen A: each row has round(d_in * k / r) non-zeros at random positions,
    values N(0, (1/r)^2), drawn from ``generator`` (seeded by the method)."""
    nnz = max(1, round(d_in * top_k / rank))
    A = torch.zeros(rank, d_in)
    pos = torch.rand(rank, d_in, generator=generator).argsort(dim=1)[:, :nnz]
    A.scatter_(1, pos, torch.randn(rank, nnz, generator=generator) / rank)
    return A


class RankGatedLinear(nn.Module):
    """A frozen linear layer plus one rank-r LoRA whose ranks are gated per token."""

    def __init__(self, base: nn.Linear, rank: int, dropout: float, router: RankRouter,
                 ctx: RoutingContext, *, a_init: str = "kaiming", a_frozen: bool = False,
                 a_generator: Optional[torch.Generator] = None, input_grad: bool = True):
        """Args:
            base: the frozen linear layer. rank: r. dropout: on the adapter's input.
            router: a :class:`.routers.RankRouter` (its scaling is the layer's).
            ctx: the routing context (masks, forward id).
            a_init: kaiming (nn.Linear's) | sparse_random (FlyLoRA; needs ``a_generator``).
            a_frozen: A is a buffer, not trained (FlyLoRA).
            input_grad: false: h = A x carries no gradient to x (FlyLoRA's release computes
                it under no_grad, cutting the gradient to earlier layers through the adapter).
        """
        super().__init__()
        if a_init not in A_INITS:
            raise ValueError(f"a_init={a_init!r}; choose one of {A_INITS}")
        self.base, self.ctx, self.router, self.rank = base, ctx, router, rank
        self.top_k, self.scaling, self.input_grad = router.top_k, router.scaling, input_grad
        dev, d_in = base.weight.device, base.in_features
        if a_init == "sparse_random":
            A = sparse_random_A(rank, d_in, router.top_k, a_generator or torch.Generator())
        else:
            A = torch.empty(rank, d_in)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if a_frozen:
            self.register_buffer("lora_A", A.to(dev))
        else:
            self.lora_A = nn.Parameter(A.to(dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))
        if router.logit_dim:  # nn.Linear's init, drawn after A (as the release's order)
            self.router_weight = nn.Parameter(
                nn.Linear(d_in, router.logit_dim, bias=False).weight.detach().to(dev))
        else:
            self.router_weight = None
        self.register_buffer("rank_bias", torch.zeros(rank, device=dev))
        self.register_buffer("rank_counts", torch.zeros(rank, dtype=torch.float64, device=dev),
                             persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._counted = -1
        self.last_gates: Optional[torch.Tensor] = None

    def _apply(self, fn, recurse=True):
        """Moves follow the module; casts do not touch the bias and counts: a bf16 bias (DeepSpeed
        casts the whole module) would lose SMoRA's u = 1e-5 steps, bf16 counts would round."""
        keep = {k: self._buffers[k] for k in ("rank_bias", "rank_counts")}
        out = super()._apply(fn, recurse)
        for k, t in keep.items():
            self._buffers[k] = t.to(self._buffers[k].device)
        return out

    def hidden_and_logits(self, x: torch.Tensor):
        """h = dropout(x) A^T and the router's logits, from one matmul."""
        xd = self.dropout(x).to(self.lora_B.dtype)
        if self.router_weight is None:
            if not self.input_grad:
                xd = xd.detach()
            return F.linear(xd, self.lora_A), None
        W = torch.cat([self.lora_A, self.router_weight.to(self.lora_A.dtype)])
        hz = F.linear(xd.detach() if not self.input_grad else xd, W)
        return hz[..., : self.rank], hz[..., self.rank:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h, z = self.hidden_and_logits(x)
        g, idx = self.router(h, z, self.rank_bias)
        if self.training and self.ctx.forward_id != self._counted:
            self._count(idx)
        if self.ctx.keep_gates:
            self.last_gates = g
        return y + (self.scaling * F.linear(h * g.to(h.dtype), self.lora_B)).to(y.dtype)

    @torch.no_grad()
    def _count(self, idx: torch.Tensor) -> None:
        """Add this forward's selections of the non-padding tokens to ``rank_counts``."""
        self._counted = self.ctx.forward_id
        m = self.ctx.sequence_mask
        if m is not None and m.shape == idx.shape[:-1]:
            idx = idx[m.to(idx.device).bool()]
        self.rank_counts += torch.bincount(idx.reshape(-1), minlength=self.rank).to(
            self.rank_counts)


def balance_step(layers: Dict[str, RankGatedLinear], rate: float) -> None:
    """One update of every layer's bias from its counts summed over ranks, then reset them:
    b += rate * sign(mean(c) - c). Nothing happens when no token was counted."""
    if not layers:
        return
    counts = torch.stack([l.rank_counts for l in layers.values()]).cpu()
    if D.world_size() > 1:  # one collective for every layer; identical sums on every rank
        counts = torch.tensor(D.all_reduce_sum(counts.flatten().tolist()),
                              dtype=torch.float64).view_as(counts)
    for l, c in zip(layers.values(), counts):
        l.rank_counts.zero_()
        if c.sum() == 0:
            continue
        step = rate * torch.sign(c.mean() - c)
        l.rank_bias += step.to(l.rank_bias)


@dataclass
class RankwiseConfig(MethodConfig):
    """The keys of a rank-gated method (defaults: the FlyLoRA-like base; subclasses set theirs)."""

    router: str = "implicit"  # implicit (FlyLoRA) | rank (SMoRA)
    top_k: int = 8  # ranks active per token
    bias_rate: float = 0.01  # u of b += u * sign(mean(c) - c); 0: no balancing
    bias_in_gates: bool = False  # rank router: the bias enters the gate values too (SMoRA)
    implicit_abs: bool = False  # implicit router: top-k of |h + b| (FlyLoRA's minimal file)
    rank_partition: int = 1  # rank router: P ranks share one router output (SMoRA's P)
    a_init: str = "kaiming"  # kaiming | sparse_random (FlyLoRA: frozen, d_in * k / r per row)
    a_frozen: bool = False
    a_seed: int = 0  # sparse_random: A of the i-th adapted layer from manual_seed(a_seed + i)
    input_grad: bool = True  # false: h = A x carries no gradient to the input (FlyLoRA release)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.router not in RANK_ROUTERS:
            raise ConfigError(f"method.router={self.router!r}; a rank-gated method takes one of "
                              f"{sorted(RANK_ROUTERS)}.")
        if not 1 <= self.top_k <= self.rank:
            raise ConfigError(f"method.top_k={self.top_k} must be in [1, method.rank="
                              f"{self.rank}].")
        if self.bias_rate < 0:
            raise ConfigError(f"method.bias_rate={self.bias_rate} must be >= 0.")
        if self.a_init not in A_INITS:
            raise ConfigError(f"method.a_init={self.a_init!r}; choose one of {list(A_INITS)}.")
        if self.rank_partition < 1 or self.rank % self.rank_partition:
            raise ConfigError(f"method.rank_partition={self.rank_partition} must divide "
                              f"method.rank={self.rank}.")
        if self.router == "implicit" and not self.a_frozen:
            raise ConfigError("method.router=implicit routes on h = A x, which must stay fixed: "
                              "set method.a_frozen=true (FlyLoRA).")


class Rankwise(Method):
    """A rank-gated LoRA on every target linear, with the bias balancer."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.layers: Dict[str, RankGatedLinear] = {}
        self.ctx = RoutingContext()

    def make_router(self) -> RankRouter:
        c = self.cfg
        return RANK_ROUTERS[c.router](c.rank, c.top_k, c.alpha, abs_scores=c.implicit_abs,
                                      partition=c.rank_partition, bias_in_gates=c.bias_in_gates)

    def apply(self, model):
        c = self.cfg
        counter = iter(range(10 ** 9))

        def make(name, lin):
            gen = torch.Generator().manual_seed(c.a_seed + next(counter))
            return RankGatedLinear(lin, c.rank, c.dropout, self.make_router(), self.ctx,
                                   a_init=c.a_init, a_frozen=c.a_frozen, a_generator=gen,
                                   input_grad=c.input_grad)

        self.layers = replace_linears(model, c.target_modules, make)
        self._hook = attach_routing_hook(model, self.ctx)
        return model

    def describe(self):
        c = self.cfg
        return {"kind": self.kind, "router": c.router, "rank": c.rank, "top_k": c.top_k,
                "bias_rate": c.bias_rate, "bias_in_gates": c.bias_in_gates,
                "A": ("frozen sparse random, seeded" if c.a_frozen else "trained, kaiming"),
                "input_grad": c.input_grad, "scaling": self.make_router().scaling,
                "bias_update": "once per optimizer step, training only, counts summed over "
                               "ranks"}

    # -- the balancer ---------------------------------------------------------------------------
    def on_stage_start(self, model, stage_index, stage_name, train_batches):
        for l in self.layers.values():
            l.rank_counts.zero_()

    def after_backward(self, model, optimizer, step, epoch, num_epochs, last_of_epoch=False,
                       total_steps=None):
        if self.cfg.bias_rate > 0:
            balance_step(self.layers, self.cfg.bias_rate)
        else:
            for l in self.layers.values():
                l.rank_counts.zero_()

    # -- checkpoints: the bias (and the seed of a frozen A) -------------------------------------
    def state_dict(self, model):
        state = super().state_dict(model)
        for n, l in self.layers.items():
            state[f"{n}.rank_bias"] = l.rank_bias.detach().cpu().clone()
        if self.cfg.a_frozen:
            state["rankwise_a_seed"] = torch.tensor(self.cfg.a_seed)
        return state

    def load_state_dict(self, model, state):
        state = dict(state)
        seed = state.pop("rankwise_a_seed", None)
        if seed is not None and int(seed) != self.cfg.a_seed:
            raise ConfigError(f"the checkpoint's frozen A was drawn with a_seed={int(seed)}, the "
                              f"config says method.a_seed={self.cfg.a_seed}; set it back.")
        super().load_state_dict(model, state)
        for l in self.layers.values():
            l.rank_counts.zero_()
