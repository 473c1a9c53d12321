"""mtLoRA (Tian, Ledent, Sun; ICLR 2026; released code doem97/ICLR26_mtLoRA @ 61dea0d).

A block-level adapter in parallel with each decoder layer's whole MLP:

    mlp_out = MLP(x) + D(x),   D(x) = s * sum_i g_i(x) (B_i A x)

x is the MLP's input (after the post-attention norm); D maps d -> d with one shared A (r x d) and
K up-projections B_i (d x r). Where D sits: it wraps the decoder layer's ``mlp`` module, so D(x)
is added to the MLP's output *inside* the block; on Gemma-2, which normalises after the MLP
(``post_feedforward_layernorm``), that norm therefore sees MLP(x) + D(x), as it would see a
fine-tuned MLP.

Router: Linear(d -> K*G, no bias) per token, softmax over the K experts in float32, dense, with
**fine-grained routing**: the output dimension is cut into G groups (``group_size`` columns each;
released: 2048 at d = 4096, G = 2) and each group has its own K gates. Fused: the gated hidden
(tokens, G, K*r) meets B laid out per group in one batched matmul over the G groups, with no
(tokens, K, d) intermediate. Init: A and the router kaiming-uniform, every B_i = 0 (exact at
step 0).

Losses (added to the cross-entropy):

* balance: cv^2 = Var(mean gate) / Mean(mean gate)^2 over the K experts (gates averaged over
  the non-padding tokens and the groups), per adapter, averaged over adapters, x ``balance_coef``
  (0.01).
* the spectral-aware regulariser on each expert's B: S = svdvals(B), w = exp(-S / mean(S)),
  c = ||B||_F / sqrt(r) (w and c detached), averaged over a random sample of ``spectral.sample``
  (64) of all B's, x ``spectral.coef``. Two forms:

  - ``as_described`` (the default): every step, the weights in B's singular-vector basis,
    sum_i w_i^2 w_i^2 (S_i^2 - c^2)^2 (B^T B - c^2 I = V (S^2 - c^2 I) V^T);
  - ``as_released``: ||(B^T B - c^2 I) * (w w^T)||_F^2 with w applied to the *column indices*
    of B^T B, added only on the micro-batch where its trigger fires (optimizer step % ``every``
    == 0: every 500 steps, else once per epoch at step 0). With the README's settings it fires
    at step 0 only, where every B is 0 and the term is exactly 0: the released recipe trains
    with no spectral regularisation at all (the defect, kept here to reproduce it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from badit_exp.config import ConfigError
from badit_exp.methods.base import MethodConfig
from badit_exp.methods.moe.layer import RouterStats, replace_modules
from badit_exp.methods.moe.loramoe import MoLoRA
from badit_exp.methods.moe.routing import RoutingContext, attach_routing_hook
from badit_exp.methods.registry import register

SPECTRAL_MODES = ("as_described", "as_released", "off")


@dataclass
class SpectralConfig:
    mode: str = "as_described"  # as_described | as_released | off
    coef: float = 1.0  # released: 1.0 (BBH), 0.5 (MMLU)
    sample: int = 64  # B matrices sampled per evaluation of the term
    every: int = 500  # as_released: the trigger (optimizer step % every == 0)


@dataclass
class MtLoRAConfig(MethodConfig):
    target_modules: List[str] = field(default_factory=lambda: ["mlp"])  # the FFN blocks
    rank: int = 16
    alpha: float = 64.0
    num_experts: int = 16
    group_size: int = 2048  # output columns per routing group (released: 2048 at d = 4096)
    balance_coef: float = 0.01
    spectral: SpectralConfig = field(default_factory=SpectralConfig)

    @property
    def top_k(self) -> int:
        """Dense routing: every expert (what the kit's statistics and plots read)."""
        return self.num_experts

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_experts < 1 or self.group_size < 1:
            raise ConfigError("method.num_experts and method.group_size must be >= 1.")
        if self.spectral.mode not in SPECTRAL_MODES:
            raise ConfigError(f"method.spectral.mode={self.spectral.mode!r}; choose one of "
                              f"{list(SPECTRAL_MODES)}.")
        if self.spectral.sample < 1 or self.spectral.every < 1 or self.spectral.coef < 0:
            raise ConfigError("method.spectral.sample and .every must be >= 1, .coef >= 0.")


class MtLoRABlock(RouterStats, nn.Module):
    """The decoder layer's MLP plus D(x), with a fine-grained dense router (see the module)."""

    def __init__(self, mlp: nn.Module, d: int, num_experts: int, rank: int, alpha: float,
                 dropout: float, group_size: int, ctx: RoutingContext):
        """Args:
            mlp: the frozen MLP block (its input is D's input, its output D's addend).
            d: the hidden size. num_experts, rank, alpha: K, r, scaling alpha / r.
            dropout: dropout on D's input. group_size: output columns per routing group
                (d must be a multiple). ctx: the routing context.
        """
        super().__init__()
        if d % group_size:
            raise ConfigError(f"method.group_size={group_size} does not divide the hidden size "
                              f"{d}; choose a divisor (released: 2048 at 4096).")
        self.mlp, self.ctx = mlp, ctx
        self.num_experts, self.rank, self.groups = num_experts, rank, d // group_size
        self.scaling = alpha / rank
        dev = next(mlp.parameters()).device
        self.lora_A = nn.Parameter(torch.empty(rank, d, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)
        self.router = nn.Linear(d, num_experts * self.groups, bias=False, device=dev,
                                dtype=torch.float32)
        self.lora_B = nn.Parameter(torch.zeros(num_experts, d, rank, device=dev))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.last_gates: Optional[torch.Tensor] = None
        self._init_stats(num_experts)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """(..., G, K): a softmax over the K experts for each output group, float32."""
        logits = self.router(x.float()).view(*x.shape[:-1], self.groups, self.num_experts)
        return torch.softmax(logits, dim=-1)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """D(x) = s sum_i g_i(x) B_i A x, group by group."""
        K, G, r = self.num_experts, self.groups, self.rank
        g = self.gates(x)  # (..., G, K)
        if self.ctx.record:
            self._record(g.mean(-2), "token", False)
        if self.training:
            self.last_gates = g
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        hg = (g.to(h.dtype).unsqueeze(-1) * h[..., None, None, :]).flatten(-2)  # (..., G, K*r)
        lead = hg.shape[:-2]
        # B per group: (G, K*r, d/G); one batched matmul over the groups
        Bg = self.lora_B.view(K, G, -1, r).permute(1, 0, 3, 2).reshape(G, K * r, -1)
        y = torch.bmm(hg.reshape(-1, G, K * r).transpose(0, 1), Bg)  # (G, tokens, d/G)
        return self.scaling * y.transpose(0, 1).reshape(*lead, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.delta(x).to(x.dtype)


def spectral_term(B: torch.Tensor, mode: str) -> torch.Tensor:
    """The spectral-aware regulariser of one B (d x r), see the module docstring."""
    r = B.shape[-1]
    S = torch.linalg.svdvals(B.float())
    w = torch.exp(-S / S.mean().clamp_min(1e-12)).detach()
    c2 = (B.detach().float().pow(2).sum() / r)
    if mode == "as_described":  # in B's singular basis: sum_i w_i^4 (S_i^2 - c^2)^2
        return ((S.pow(2) - c2).pow(2) * w.pow(4)).sum()
    G = B.float().t() @ B.float() - c2 * torch.eye(r, device=B.device)  # as_released
    return (G * (w[:, None] * w[None, :])).pow(2).sum()


@register("mtlora", MtLoRAConfig)
class MtLoRA(MoLoRA):
    """mtLoRA: D(x) beside every MLP, fine-grained dense routing, cv^2 and spectral losses."""

    def apply(self, model):
        c = self.cfg
        d = model.config.hidden_size
        self.layers: Dict[str, MtLoRABlock] = replace_modules(
            model, c.target_modules,
            lambda n, mlp: MtLoRABlock(mlp, d, c.num_experts, c.rank, c.alpha, c.dropout,
                                       min(c.group_size, d), self.ctx))
        self._hook = attach_routing_hook(model, self.ctx)
        self._step = 0
        return model

    def describe(self):
        c = self.cfg
        return {"kind": self.kind, "num_experts": c.num_experts, "group_size": c.group_size,
                "router": "dense, one softmax over K per output group",
                "balance_coef": c.balance_coef, "spectral": dict(c.spectral.__dict__),
                "where": "parallel to each decoder layer's MLP, added to its output (Gemma-2: "
                         "before the post-feed-forward norm)"}

    def mergeable(self) -> bool:
        return False

    def on_resume(self, stage_name: str, step: int) -> None:
        self._step = step

    def on_stage_start(self, model, stage_index, stage_name, train_batches):
        super().on_stage_start(model, stage_index, stage_name, train_batches)
        self._step = 0

    def after_optimizer_step(self, model, optimizer) -> None:
        self._step += 1

    def spectral_active(self) -> bool:
        s = self.cfg.spectral
        return s.mode == "as_described" or (s.mode == "as_released" and self._step % s.every == 0)

    def spectral_loss(self) -> torch.Tensor:
        """The mean term over a seeded sample of the B's (the same sample on every rank)."""
        s = self.cfg.spectral
        Bs = [l.lora_B[i] for l in self.layers.values() for i in range(l.num_experts)]
        g = torch.Generator().manual_seed(self._step)
        pick = torch.randperm(len(Bs), generator=g)[: s.sample].tolist()
        return torch.stack([spectral_term(Bs[i], s.mode) for i in pick]).mean()

    def extra_loss(self, model, batch) -> Optional[torch.Tensor]:
        c = self.cfg
        total = None
        if c.balance_coef > 0:
            m = batch["attention_mask"].float()[..., None, None]
            cvs = []
            for l in self.layers.values():
                if l.last_gates is None:
                    continue
                mean = (l.last_gates * m).sum((0, 1)) / m.sum().clamp_min(1)  # (G, K)
                mean = mean.mean(0)  # per expert
                cvs.append(mean.var(unbiased=False) / mean.mean().pow(2).clamp_min(1e-12))
            if cvs:
                total = c.balance_coef * torch.stack(cvs).mean()
        if c.spectral.coef > 0 and c.spectral.mode != "off" and self.spectral_active():
            sp = c.spectral.coef * self.spectral_loss()
            total = sp if total is None else total + sp
        return total
