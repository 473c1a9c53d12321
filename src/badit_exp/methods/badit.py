"""BADIT = BAD (basic ability decomposition, an SVD initialisation of K LoRA experts) + DOG
(dynamically orthogonal grouping of their rank-1 components), SPEC section 5.

Built on the fused mixture layer of :mod:`badit_exp.methods.moe`. What differs from the
authors' code (SPEC section 8), on purpose:

* DOG permutes the optimizer's Adam moments (and the gradients about to be applied, and the
  EMA gradient buffer) together with the parameters, so a step after a regroup equals the step
  on a model where everything had been permuted before.
* The grouping is balanced by construction: every expert holds exactly r components, none is
  duplicated or lost. The default solver (``dog.solver=search``) is a multi-start pair-swap
  local search on the DOG objective; ``dog.solver=paper`` is the paper's orthogonalised
  centroids with an exact Hungarian assignment on the r-fold repeated expert columns
  (:mod:`.dog_solver`).
* The regrouping is a pure function of the (reduced) gradients, so every process of a data-
  parallel run that calls it with the same gradients reaches the same grouping.

Function preservation: with the scalar router and ``dog.preserve_function=true`` a moved
component's B column is rescaled by alpha_old / alpha_new (the paper's Appendix C) so the
layer's output is unchanged; with an input-dependent router the output changes (unavoidable).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from badit_exp import dist as D
from badit_exp.config import ConfigError
from badit_exp.methods.access import as_access, copy_all
from badit_exp.methods.dog_solver import SOLVERS, objective, objective_gram, onehot, solve, unit
from badit_exp.methods.moe import MoLoRA, MoLoRAConfig
from badit_exp.methods.moe.layer import MoLoRALinear
from badit_exp.methods.registry import register

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
    L, n, _ = grads.shape
    K = num_experts
    if n % K:
        raise ValueError(f"r*K = {n} components is not divisible by num_experts = {K}")
    u = unit(grads.float())
    G = (u @ u.transpose(1, 2)).double()  # (L, n, n)
    assign, final, start = solve(G, K, solver, max_iters)
    assign = assign.to(grads.device)
    if return_info:
        current = (torch.arange(n, device=G.device) // (n // K)).expand(L, n).contiguous()
        return assign, {"start": start.float().cpu(), "final": final.float().cpu(),
                        "current": objective_gram(G, current, K).float().cpu()}
    return assign


def gram_angles(G: torch.Tensor, assign: torch.Tensor, K: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`group_angles` from the Gram matrices G = u u^T (L, n, n) alone."""
    n = G.shape[1]
    same = assign[:, :, None] == assign[:, None, :]
    off = ~torch.eye(n, dtype=torch.bool, device=G.device)
    mask = same & off
    ang = torch.rad2deg(torch.acos(G.clamp(-1, 1)))
    intra = (ang * mask).sum((1, 2)) / mask.sum((1, 2)).clamp_min(1)
    P = onehot(assign, K, G.dtype)
    C = P.transpose(1, 2) @ G @ P  # c_a . c_b
    d = C.diagonal(dim1=1, dim2=2).clamp_min(1e-24).sqrt()
    ccos = (C / (d[:, :, None] * d[:, None, :])).clamp(-1, 1)
    offk = ~torch.eye(K, dtype=torch.bool, device=G.device)
    inter = torch.rad2deg(torch.acos(ccos))[:, offk].mean(-1)
    return intra, inter


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
    c = unit(onehot.transpose(1, 2) @ u)
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
    # off: regroup before this step's update (Algorithm 1); on: solve in a worker thread while
    # the next step runs and apply before that step's update (one step late, off the critical
    # path); auto: on when the adapters live on a GPU
    overlap: str = "auto"

    def __post_init__(self) -> None:
        if self.overlap not in ("auto", "on", "off"):
            raise ConfigError(f"method.dog.overlap={self.overlap!r}; choose auto, on or off.")
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
        if self.layout != "separate" or self.experts_per_layer or self.experts_by_depth:
            raise ConfigError("BADIT regroups rank-1 components between experts of one shape: "
                              "it needs method.layout=separate and the same method.num_experts "
                              "in every layer (no experts_per_layer / experts_by_depth).")
        if self.router == "dense" or self.switch_coef > 0:
            raise ConfigError("BADIT routes with router=sequence|token|scalar and has no "
                              "Switch loss (method.switch_coef=0).")


@register("badit", BaditConfig)
class Badit(MoLoRA):
    """K SVD-initialised LoRA experts (BAD) regrouped by gradient direction (DOG)."""

    # per-layer numbers of a regroup, in dog_log.jsonl and in a checkpointed pending regroup
    # ("objective_kmeans_start": the solver's best start, a name kept for existing logs)
    _ROW_KEYS = ["objective_before", "objective_kmeans_start", "objective_after", "moved",
                 "intra_angle_before", "inter_angle_before", "intra_angle_after",
                 "inter_angle_after"]

    def __init__(self, cfg):
        super().__init__(cfg)
        self._ema: Dict[str, torch.Tensor] = {}  # dog.grad_source=ema buffers, per layer
        self.regroups = 0
        self._pending: Optional[Dict] = None  # an overlapped regroup waiting for its step
        self._pool = None  # the worker thread and, on a GPU, its side stream (made on first use)
        self._side_stream = None

    def apply(self, model):
        model = super().apply(model)
        if self.cfg.init == "bad":
            anchored = self.cfg.function_preserving == "anchor"
            for name, layer in self.layers.items():
                bad_init(layer, name, residual=not anchored)
                if anchored:
                    layer.anchor()
        return model

    def describe(self):
        d = super().describe()
        dog = self.cfg.dog
        d.update(init=self.cfg.init, dog=dict(dog.__dict__),
                 dog_variant=("function-preserving rescale (scalar router)"
                              if self.cfg.router == "scalar" and dog.preserve_function else
                              "plain permutation (router output changes)"),
                 dog_timing={"on": "overlapped: solved during the next step, applied before its update",
                             "off": "synchronous: before this step's update",
                             "auto": "overlapped on a GPU, synchronous on a CPU"}[dog.overlap])
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
        self._apply_pending(optimizer, step, epoch)  # an overlapped regroup from the last step
        if self._due(step, total_steps if total_steps is not None else step + 2, last_of_epoch):
            if self._overlap():
                self._submit(optimizer, step, epoch)
            else:
                self.regroup(optimizer, step=step, epoch=epoch)

    # -- how ----------------------------------------------------------------------------------
    # A regroup is three steps: plan (the only work on the D-dimensional gradients: their Gram
    # matrices, batched per layer shape, on the gradients' device), solve (the grouping and the
    # diagnostics, from the Gram matrices alone) and apply (permute parameters, gradients,
    # moments, EMA buffers, anchors). Synchronous (dog.overlap off): all three before this
    # step's update, as Algorithm 1. Overlapped (on; auto = on a GPU): solve runs in a worker
    # thread (on a side CUDA stream) while training goes on, and apply happens at the next
    # optimizer step, before its update: the regroup is one step late, and the critical path
    # holds only plan and apply.
    def _overlap(self) -> bool:
        o = self.cfg.dog.overlap
        if o == "auto":
            return next(iter(self.layers.values())).lora_A.device.type == "cuda"
        return o == "on"

    @torch.no_grad()
    def _plan(self, optimizer) -> List[Tuple[List[str], torch.Tensor]]:
        optimizer = as_access(optimizer)
        by_shape: Dict[Tuple, List[str]] = {}
        grads: Dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            g = self._ema.get(name) if self.cfg.dog.grad_source == "ema" else \
                self.component_grads(name, layer, optimizer)
            if g is None:
                continue
            grads[name] = g
            by_shape.setdefault(tuple(g.shape), []).append(name)
        plan = []
        for names in by_shape.values():
            u = unit(torch.stack([grads[n] for n in names]).float())
            plan.append((names, (u @ u.transpose(1, 2)).double()))
        return plan

    @torch.no_grad()
    def _solve(self, plan) -> List[Dict]:
        """Per layer group: the assignment (on the plan's device), its permutation, and the
        diagnostic rows (CPU numbers, so applying needs no host synchronisation)."""
        K = self.cfg.num_experts
        out = []
        for names, G in plan:
            L, n, _ = G.shape
            cur = (torch.arange(n, device=G.device) // (n // K)).expand(L, n).contiguous()
            assign, final, start = solve(G, K, self.cfg.dog.solver, self.cfg.dog.max_iters)
            perm = permutation_from_assignment(assign, K)
            intra0, inter0 = gram_angles(G, cur, K)
            intra1, inter1 = gram_angles(G, assign, K)
            stats = torch.stack([objective_gram(G, cur, K), start, final,
                                 (assign != cur).sum(-1).to(G.dtype), intra0, inter0, intra1,
                                 inter1], 1).cpu().tolist()
            rows = [{"layer": nm, **dict(zip(self._ROW_KEYS, st))} for nm, st in zip(names, stats)]
            for r in rows:
                r["moved"] = int(r["moved"])
            out.append({"names": names, "assign": assign, "perm": perm, "rows": rows})
        return out

    @torch.no_grad()
    def _apply(self, solved: List[Dict], optimizer, step: int, epoch: int,
               gradient_step: Optional[int] = None) -> Dict:
        optimizer = as_access(optimizer)
        rows = []
        for grp in solved:
            # every rank reached the same grouping from the same reduced gradients; rank 0's
            # is broadcast anyway so no rank can drift on a floating-point tie
            assign = D.broadcast_tensor(grp["assign"], src=0)
            perm = grp["perm"] if assign is grp["assign"] else permutation_from_assignment(
                assign, self.cfg.num_experts)
            self._permute_layers([(n, perm[j]) for j, (n, row) in
                                  enumerate(zip(grp["names"], grp["rows"]))
                                  if row["moved"] or D.world_size() > 1], optimizer)
            rows += grp["rows"]
        self.regroups += 1
        # step: the optimizer step whose update first sees the new grouping (resume truncates
        # the log by it); gradient_step: the step whose gradients chose it (overlap: one before)
        summary = {"regroup": self.regroups, "step": step, "epoch": epoch,
                   "gradient_step": step if gradient_step is None else gradient_step}
        if rows:
            for k in rows[0]:
                if k != "layer":
                    summary[f"mean_{k}"] = sum(r[k] for r in rows) / len(rows)
        if self.run_dir is not None:
            with open(self.run_dir / "dog_log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({**summary, "stage": self.stage_name, "layers": rows}) + "\n")
        return summary

    def regroup(self, optimizer, step: int = -1, epoch: int = -1) -> Dict:
        """Regroup every layer now (plan, solve, apply; see above). Returns diagnostics.

        ``optimizer``: the training engine (or a torch optimizer, or None). Under data
        parallelism the gradients are the reduced ones, identical on every rank.
        """
        return self._apply(self._solve(self._plan(optimizer)), optimizer, step, epoch)

    def _submit(self, optimizer, step: int, epoch: int) -> None:
        """Overlapped regroup: plan now, solve in the worker, apply at the next step."""

        plan = self._plan(optimizer)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dog")
        dev = plan[0][1].device if plan else torch.device("cpu")
        if dev.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()  # the Gram matrices are computed on the current stream

            def work():
                if self._side_stream is None:
                    self._side_stream = torch.cuda.Stream(device=dev)
                side = self._side_stream
                with torch.cuda.stream(side):
                    side.wait_event(ready)
                    solved = self._solve(plan)  # syncs only this stream (diagnostic numbers)
                    done = torch.cuda.Event()
                    done.record(side)
                return solved, done
        else:
            def work():
                return self._solve(plan), None
        self._pending = {"future": self._pool.submit(work), "step": step, "epoch": epoch}

    def _take_pending(self) -> Optional[Dict]:
        """Wait for the worker; the solved regroup (or None)."""
        p = self._pending
        if p is None:
            return None
        if "future" in p:
            solved, done = p.pop("future").result()
            if done is not None:
                torch.cuda.current_stream().wait_event(done)  # no host synchronisation
            p["solved"] = solved
        return p

    def _apply_pending(self, optimizer, step: int, epoch: int) -> None:
        p = self._take_pending()
        if p is not None:
            self._pending = None
            self._apply(p["solved"], optimizer, step, epoch, gradient_step=p["step"])

    def _permute_layers(self, moves: List[Tuple[str, torch.Tensor]], optimizer) -> None:
        """Move every listed layer's components to their new slots (perm[j] = old component of
        slot j): parameters with their pending gradients and Adam moments (through the engine,
        batched), the EMA gradient buffers and the anchors; then, with the scalar router and
        dog.preserve_function, rescale moved components by alpha_old / alpha_new (App. C)."""
        params, dst, src = [], [], []
        for name, perm in moves:
            layer = self.layers[name]
            params += [(layer.lora_A, 0, perm), (layer.lora_B, 1, perm)]
            plain = [(layer.lora_A0, 0), (layer.lora_B0, 1)] if hasattr(layer, "lora_A0") else []
            if name in self._ema:
                plain.append((self._ema[name], 0))
            for t, dim in plain:
                dst.append(t)
                src.append(t.index_select(dim, perm))
        optimizer.permute(params)
        copy_all(dst, src)
        if self.cfg.router == "scalar" and self.cfg.dog.preserve_function:
            for name, perm in moves:
                self._rescale(self.layers[name], perm, optimizer)

    def _rescale(self, layer: MoLoRALinear, perm: torch.Tensor, optimizer) -> None:
        r = layer.rank
        alpha = layer.router_weight.detach().float()
        old_exp = perm.div(r, rounding_mode="floor")  # expert each moved component came from
        new_exp = torch.arange(perm.numel(), device=perm.device).div(r, rounding_mode="floor")
        a_new = alpha[new_exp]
        ok = a_new.abs() > 1e-8
        scale = torch.where(ok, alpha[old_exp] / torch.where(ok, a_new, torch.ones_like(a_new)),
                            torch.ones_like(a_new))
        # B' = c B  =>  dL/dB' = dL/dB / c, Adam moments m/c and v/c^2: the next step on the
        # rescaled parameter is the rescaled step
        optimizer.transform(layer.lora_B, lambda t: t * scale.to(t.dtype),
                            grad_fn=lambda g: g / scale,
                            moment_fns={"exp_avg": lambda m: m / scale,
                                        "exp_avg_sq": lambda v: v / scale ** 2})

    # -- checkpoints: EMA gradient buffers and a solved-but-not-applied regroup -----------------
    def state_dict(self, model):
        state = super().state_dict(model)
        for name, g in self._ema.items():
            state[f"_dog_ema.{name}"] = g.detach().cpu().clone()
        p = self._take_pending()  # an overlapped regroup solved but not yet applied
        if p is not None:
            state["_dog_pending.when"] = torch.tensor([p["step"], p["epoch"]])
            for gi, grp in enumerate(p["solved"]):
                for j, (n, row) in enumerate(zip(grp["names"], grp["rows"])):
                    state[f"_dog_pending.assign.{gi}.{n}"] = grp["assign"][j].cpu().clone()
                    state[f"_dog_pending.rows.{gi}.{n}"] = torch.tensor(
                        [row[k] for k in self._ROW_KEYS], dtype=torch.float64)
        return state

    def load_state_dict(self, model, state):
        own = ("_dog_ema.", "_dog_pending.")
        super().load_state_dict(model, {k: v for k, v in state.items() if not k.startswith(own)})
        dev = next(iter(self.layers.values())).lora_A.device
        self._ema = {k[len("_dog_ema."):]: g.to(dev, torch.float32).clone()
                     for k, g in state.items() if k.startswith("_dog_ema.")}
        self._pending = None
        if "_dog_pending.when" in state:
            step, epoch = state["_dog_pending.when"].tolist()
            groups: Dict[int, Dict] = {}
            for k, v in state.items():
                if k.startswith("_dog_pending.assign."):
                    gi, name = k[len("_dog_pending.assign."):].split(".", 1)
                    grp = groups.setdefault(int(gi), {"names": [], "assign": [], "rows": []})
                    row = dict(zip(self._ROW_KEYS, state[f"_dog_pending.rows.{gi}.{name}"].tolist()))
                    row["moved"] = int(row["moved"])
                    grp["names"].append(name)
                    grp["assign"].append(v.to(dev))
                    grp["rows"].append({"layer": name, **row})
            order = list(self.layers)
            solved = []
            for gi in sorted(groups):
                grp = groups[gi]
                idx = sorted(range(len(grp["names"])), key=lambda i: order.index(grp["names"][i]))
                assign = torch.stack([grp["assign"][i] for i in idx])
                solved.append({"names": [grp["names"][i] for i in idx], "assign": assign,
                               "perm": permutation_from_assignment(assign, self.cfg.num_experts),
                               "rows": [grp["rows"][i] for i in idx]})
            self._pending = {"solved": solved, "step": step, "epoch": epoch}

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
