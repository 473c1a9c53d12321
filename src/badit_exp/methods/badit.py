"""BADIT = BAD (basic ability decomposition, an SVD initialisation of K LoRA experts) + DOG
(dynamically orthogonal grouping of their rank-1 components), SPEC section 5.

Built on the fused mixture layer of :mod:`badit_exp.methods.moe`. What differs from the
authors' code (SPEC section 8), on purpose:

* DOG permutes the optimizer's Adam moments (and the gradients about to be applied, and the
  EMA gradient buffer) together with the parameters, so a step after a regroup equals the step
  on a model where everything had been permuted before.
* The balanced assignment is exact (Hungarian algorithm on the r-fold repeated expert
  columns): every expert holds exactly r components, none is duplicated or lost.
* The regrouping is a pure function of the (reduced) gradients, so every process of a data-
  parallel run that calls it with the same gradients reaches the same grouping.

Function preservation: with the scalar router and ``dog.preserve_function=true`` a moved
component's B column is rescaled by alpha_old / alpha_new (the paper's Appendix C) so the
layer's output is unchanged; with an input-dependent router the output changes (unavoidable).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from badit_exp.config import ConfigError
from badit_exp.methods.moe import MoLoRA, MoLoRAConfig
from badit_exp.methods.dog_solver import (SOLVERS, objective, objective_gram, paper_assign,
                                          search_assign, unit)
from badit_exp.methods.moe.layer import MoLoRALinear
from badit_exp.methods.registry import register
from badit_exp.training import distributed as D
from badit_exp.training.engine import as_access


# ---------------------------------------------------------------------------------------------
# BAD: SVD initialisation
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def bad_init(layer: MoLoRALinear, name: str = "?", residual: bool = True) -> None:
    """Split the top r*K singular components of the base weight into K contiguous experts
    (expert 0 = largest), set A/B so that s * B_k A_k = U_k diag(S_k) V_k^T, and write the
    residual W - s * sum_k B_k A_k back into the frozen base weight (model dtype). With
    ``residual=False`` (the anchored form) the base weight is left whole."""
    W = layer.base.weight
    n = layer.num_experts * layer.rank
    if n > min(W.shape):
        raise ConfigError(f"BAD needs rank*num_experts <= min(out, in): layer {name} has shape "
                          f"{tuple(W.shape)} but rank={layer.rank} x num_experts="
                          f"{layer.num_experts} = {n}; lower method.rank or method.num_experts.")
    Wf = W.float()
    U, S, Vh = torch.linalg.svd(Wf, full_matrices=False)
    root = torch.sqrt(S[:n] / layer.scaling)
    B = U[:, :n] * root
    A = root[:, None] * Vh[:n]
    layer.lora_A.copy_(A)
    layer.lora_B.copy_(B)
    if residual:
        W.copy_((Wf - layer.scaling * B @ A).to(W.dtype))


# ---------------------------------------------------------------------------------------------
# DOG: the balanced grouping (solvers in dog_solver.py)
# ---------------------------------------------------------------------------------------------

_unit = unit


def dog_objective(u: torch.Tensor, assign: torch.Tensor, K: int) -> torch.Tensor:
    """sum_k || sum_{i in expert k} g_i ||^2 per layer (unit gradients). -> (L,)"""
    return objective(u, assign, K)


def dog_assign(grads: torch.Tensor, num_experts: int, max_iters: int = 10,
               solver: str = "search", return_info: bool = False):
    """The DOG regrouping of SPEC section 5.3 for a batch of layers.

    Args:
        grads: (layers, r*K, D) raw gradients of the rank-1 components (row of A and column of
            B concatenated). Normalised here; zero rows are guarded.
        num_experts: K. r = r*K / K components per expert.
        max_iters: the ``paper`` solver's orthogonalised-centroid rounds (SPEC: at most 10).
        solver: ``search`` (default: multi-start pair-swap local search on the objective, on
            the gradients' device) or ``paper`` (orthogonalised centroids + Hungarian, CPU).
    Returns:
        (layers, r*K) long tensor on the gradients' device: each component's new expert, every
        expert exactly r times per layer; with ``return_info`` also per-layer objectives
        ``current`` (grouping before), ``start`` (best start of the solver) and ``final``.

    The only computation on the D-dimensional gradients is their Gram matrix u u^T (layers x rK
    x rK), one batched matmul on the gradients' device; the solvers work on it alone.
    Deterministic: no global RNG is touched.
    """
    if grads.dim() != 3:
        raise ValueError(f"grads must be (layers, r*K, D), got shape {tuple(grads.shape)}")
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}; choose one of {SOLVERS}")
    L, n, _ = grads.shape
    K = num_experts
    if n % K:
        raise ValueError(f"r*K = {n} components is not divisible by num_experts = {K}")
    u = unit(grads.float())
    G = (u @ u.transpose(1, 2)).double()  # (L, n, n)
    if solver == "paper":
        assign, final, start = paper_assign(G.cpu(), K, max_iters=max_iters)
    else:
        assign, final, start = search_assign(G, K)
    assign = assign.to(grads.device)
    if return_info:
        current = (torch.arange(n, device=G.device) // (n // K)).expand(L, n).contiguous()
        return assign, {"start": start.float().cpu(), "final": final.float().cpu(),
                        "current": objective_gram(G, current, K).float().cpu()}
    return assign


def group_angles(u: torch.Tensor, assign: torch.Tensor, K: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean intra-expert pairwise angle and mean inter-expert angle (between experts' summed
    gradients), degrees, per layer. u: (L, n, D) unit gradients."""
    L, n, _ = u.shape
    cos = (u @ u.transpose(1, 2)).clamp(-1, 1)
    same = assign[:, :, None] == assign[:, None, :]
    off = ~torch.eye(n, dtype=torch.bool, device=u.device)
    intra = torch.rad2deg(torch.acos(cos))
    intra = (intra * (same & off)).sum((1, 2)) / (same & off).sum((1, 2)).clamp_min(1)
    onehot = torch.nn.functional.one_hot(assign, K).to(u.dtype)
    c = _unit(onehot.transpose(1, 2) @ u)
    ccos = (c @ c.transpose(1, 2)).clamp(-1, 1)
    offk = ~torch.eye(K, dtype=torch.bool, device=u.device)
    inter = torch.rad2deg(torch.acos(ccos))[:, offk].mean(-1)
    return intra, inter


def permutation_from_assignment(assign: torch.Tensor, K: int) -> torch.Tensor:
    """perm (L, n) such that new slot j holds old component perm[j]: expert k's components,
    in their old order, occupy slots k*r .. (k+1)*r - 1."""
    L, n = assign.shape
    key = assign * n + torch.arange(n, device=assign.device)
    return key.argsort(dim=-1)


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------

@dataclass
class DOGConfig:
    enabled: bool = True
    every_n_steps: int = 0  # 0 = no step trigger; N = regroup every N optimizer steps
    at_epoch_end: bool = True  # regroup on the last optimizer step of each epoch (reference)
    # regroup only at optimizer steps t (1-based) with t <= fraction * stage steps: with epoch
    # ends and 0.5, the released code's "epoch <= E // 2"; never at a stage's last step
    until_fraction: float = 0.5
    grad_source: str = "last"  # last: the step's gradient (reference); ema: a moving average
    ema_beta: float = 0.9
    solver: str = "search"  # search: local search on the objective | paper: orthogonal centroids
    max_iters: int = 10  # the paper solver's rounds
    preserve_function: bool = True  # scalar router only: rescale moved components (App. C)

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ConfigError(f"method.dog.solver={self.solver!r}; choose one of {list(SOLVERS)}.")
        if self.grad_source not in ("last", "ema"):
            raise ConfigError(f"method.dog.grad_source={self.grad_source!r}; choose last or ema.")
        if not 0 < self.until_fraction <= 1:
            raise ConfigError(f"method.dog.until_fraction={self.until_fraction} must be in (0, 1].")
        if self.every_n_steps < 0:
            raise ConfigError(f"method.dog.every_n_steps={self.every_n_steps} must be >= 0.")
        if not 0 <= self.ema_beta < 1:
            raise ConfigError(f"method.dog.ema_beta={self.ema_beta} must be in [0, 1).")


@dataclass
class BaditConfig(MoLoRAConfig):
    init: str = "bad"  # bad: SVD experts + residual (BADIT); lora: A kaiming, B = 0 (w/o BAD)
    dog: DOGConfig = field(default_factory=DOGConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in ("bad", "lora"):
            raise ConfigError(f"method.init={self.init!r}; choose bad or lora.")


@register("badit", BaditConfig)
class Badit(MoLoRA):
    """K SVD-initialised LoRA experts (BAD) regrouped by gradient direction (DOG)."""

    def apply(self, model):
        model = super().apply(model)
        if self.cfg.init == "bad":
            anchored = self.cfg.function_preserving == "anchor"
            for name, layer in self.layers.items():
                bad_init(layer, name, residual=not anchored)
                if anchored:
                    layer.anchor()
        self._ema: Dict[str, torch.Tensor] = {}
        self.regroups = 0
        return model

    def describe(self):
        d = super().describe()
        dog = self.cfg.dog
        d.update(init=self.cfg.init, dog=dict(dog.__dict__),
                 dog_variant=("function-preserving rescale (scalar router)"
                              if self.cfg.router == "scalar" and dog.preserve_function else
                              "plain permutation (router output changes)"))
        return d

    # -- when ---------------------------------------------------------------------------------
    def _due(self, step: int, total_steps: int, last_of_epoch: bool) -> bool:
        """Regroup at optimizer step ``step`` (0-based) of a stage of ``total_steps``?"""
        dog = self.cfg.dog
        if not dog.enabled or step + 1 >= total_steps:  # never after a stage's last step
            return False
        if step + 1 > dog.until_fraction * total_steps + 1e-9:
            return False
        by_step = dog.every_n_steps > 0 and (step + 1) % dog.every_n_steps == 0
        return by_step or (dog.at_epoch_end and last_of_epoch)

    def component_grads(self, name: str, layer: MoLoRALinear, opt=None) -> Optional[torch.Tensor]:
        """(r*K, in + out): row i of dL/dA next to column i of dL/dB, reduced over all ranks
        (``opt``: the engine, which knows where ZeRO keeps the gradient partitions)."""
        opt = as_access(opt)
        gA, gB = opt.grad(layer.lora_A), opt.grad(layer.lora_B)
        if gA is None or gB is None:
            return None
        return torch.cat([gA, gB.t()], dim=1)

    def after_backward(self, model, optimizer, step, epoch, num_epochs, last_of_epoch=False,
                       total_steps=None):
        dog = self.cfg.dog
        if not dog.enabled:
            return
        if dog.grad_source == "ema":
            for name, layer in self.layers.items():
                g = self.component_grads(name, layer, optimizer)
                if g is None:
                    continue
                prev = self._ema.get(name)
                self._ema[name] = g.detach().clone() if prev is None else \
                    prev.mul_(dog.ema_beta).add_(g.detach(), alpha=1 - dog.ema_beta)
        if self._due(step, total_steps if total_steps is not None else step + 2, last_of_epoch):
            self.regroup(optimizer, step=step, epoch=epoch)

    # -- how ----------------------------------------------------------------------------------
    @torch.no_grad()
    def regroup(self, optimizer, step: int = -1, epoch: int = -1) -> Dict:
        """Regroup every layer (layers of one shape in one batched call); permute parameters,
        gradients, EMA buffers and the optimizer's moments identically. Returns diagnostics.

        ``optimizer``: the training engine (or a torch optimizer, or None). Under data
        parallelism the gradients are the reduced ones, identical on every rank, and rank 0's
        assignment is broadcast anyway so no rank can drift on a floating-point tie.
        """
        optimizer = as_access(optimizer)
        K = self.cfg.num_experts
        by_shape: Dict[Tuple, List[str]] = {}
        grads: Dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            g = self._ema.get(name) if self.cfg.dog.grad_source == "ema" else \
                self.component_grads(name, layer, optimizer)
            if g is None:
                continue
            grads[name] = g
            by_shape.setdefault(tuple(g.shape), []).append(name)
        rows = []
        for names in by_shape.values():
            G = torch.stack([grads[n] for n in names])
            assign, info = dog_assign(G, K, max_iters=self.cfg.dog.max_iters,
                                      solver=self.cfg.dog.solver, return_info=True)
            assign = D.broadcast_tensor(assign, src=0)
            u = _unit(G.float())
            cur = torch.arange(G.shape[1], device=G.device).div(G.shape[1] // K,
                                                                rounding_mode="floor")
            intra0, inter0 = group_angles(u, cur.expand_as(assign), K)
            intra1, inter1 = group_angles(u, assign, K)
            perm = permutation_from_assignment(assign, K)
            for j, n in enumerate(names):
                moved = int((assign[j] != cur).sum())
                self._apply_permutation(n, self.layers[n], perm[j], assign[j], optimizer)
                rows.append({"layer": n, "objective_before": float(info["current"][j]),
                             "objective_kmeans_start": float(info["start"][j]),
                             "objective_after": float(info["final"][j]), "moved": moved,
                             "intra_angle_before": float(intra0[j]),
                             "inter_angle_before": float(inter0[j]),
                             "intra_angle_after": float(intra1[j]),
                             "inter_angle_after": float(inter1[j])})
        self.regroups += 1
        summary = {"regroup": self.regroups, "step": step, "epoch": epoch}
        if rows:
            for k in rows[0]:
                if k != "layer":
                    summary[f"mean_{k}"] = sum(r[k] for r in rows) / len(rows)
        if self.run_dir is not None:
            with open(self.run_dir / "dog_log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({**summary, "stage": self.stage_name, "layers": rows}) + "\n")
        return summary

    def _apply_permutation(self, name: str, layer: MoLoRALinear, perm: torch.Tensor,
                           assign: torch.Tensor, optimizer) -> None:
        r, K = layer.rank, layer.num_experts
        if torch.equal(perm, torch.arange(perm.numel(), device=perm.device)):
            return
        A, B = layer.lora_A, layer.lora_B
        # scale of each new slot's component (function preservation with scalar routing)
        scale = None
        if self.cfg.router == "scalar" and self.cfg.dog.preserve_function:
            alpha = layer.router_weight.detach().float()
            old_exp = perm.div(r, rounding_mode="floor")  # expert each moved component came from
            new_exp = torch.arange(perm.numel(), device=perm.device).div(r, rounding_mode="floor")
            a_new = alpha[new_exp]
            ok = a_new.abs() > 1e-8
            scale = torch.where(ok, alpha[old_exp] / torch.where(ok, a_new, torch.ones_like(a_new)),
                                torch.ones_like(a_new))
        for p, dim in ((A, 0), (B, 1)):  # param, pending grad, fp32 master, Adam moments
            optimizer.transform(p, lambda t, dim=dim: t.index_select(dim, perm))
        if name in self._ema:
            self._ema[name].copy_(self._ema[name].index_select(0, perm))
        if hasattr(layer, "lora_A0"):  # the anchor moves with its components
            layer.lora_A0.copy_(layer.lora_A0.index_select(0, perm))
            layer.lora_B0.copy_(layer.lora_B0.index_select(1, perm))
        if scale is not None:
            # B' = c B  =>  dL/dB' = dL/dB / c, Adam moments m/c and v/c^2: the next step on
            # the rescaled parameter is the rescaled step
            optimizer.transform(B, lambda t: t * scale.to(t.dtype), grad_fn=lambda g: g / scale,
                                moment_fns={"exp_avg": lambda m: m / scale,
                                            "exp_avg_sq": lambda v: v / scale ** 2})

    # -- checkpoints: the EMA gradient buffers resume with the run -------------------------------
    def state_dict(self, model):
        state = super().state_dict(model)
        for name, g in self._ema.items():
            state[f"_dog_ema.{name}"] = g.detach().cpu().clone()
        return state

    def load_state_dict(self, model, state):
        ema = {k[len("_dog_ema."):]: v for k, v in state.items() if k.startswith("_dog_ema.")}
        super().load_state_dict(model, {k: v for k, v in state.items()
                                        if not k.startswith("_dog_ema.")})
        dev = next(iter(self.layers.values())).lora_A.device
        self._ema = {n: g.to(dev, torch.float32).clone() for n, g in ema.items()}

    def on_resume(self, stage_name: str, step: int) -> None:
        if self.run_dir is not None:
            from badit_exp.io_utils import truncate_jsonl

            path = self.run_dir / "dog_log.jsonl"
            truncate_jsonl(path, lambda r: not (r.get("stage") == stage_name and r.get("step", -1) >= step))
            self.regroups = len(path.read_text().splitlines()) if path.exists() else 0

    # -- results ------------------------------------------------------------------------------
    def on_stage_end(self, model, stage_index, stage_name, train_batches):
        super().on_stage_end(model, stage_index, stage_name, train_batches)
        if self.run_dir is not None and (self.run_dir / "dog_log.jsonl").exists():
            from badit_exp.plotting import dog_angles

            dog_angles(self.run_dir / "dog_log.jsonl", self.run_dir / "dog_angles.png")
