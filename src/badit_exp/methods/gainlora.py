"""GainLoRA (Liang, Chen, Li; NeurIPS 2025) ported to decoder-only LLMs (BASELINES.md).

One LoRA branch per task on every adapted layer, each scaled by a learned, input-dependent
gate a_t(X) in [0, 0.964] that is kept near zero on old tasks' inputs; no task id at inference::

    y = W x + s * sum_i a_i(X) B_i A_i x

* A_t (InfLoRA): before task t, C = mean(x x^T) of the layer's inputs over the task's training
  data (ALL non-padding tokens, prompt and target), C <- C - M M^T C with M the old tasks'
  input basis; A_t = (top-r left singular vectors)^T / sqrt(3), frozen. B_t starts at 0, trains.
* Gate t (one scalar per sequence, shared by all layers): e = masked mean of the prompt's input
  token embeddings (frozen embedding table, before any model-specific scaling); h = SiLU(W1 e);
  g = SiLU(W2 h); a_t = |tanh(2 cos(g, key_t))|. Computed once from the prompt and reused at
  every KV-cached decoding step.
* Task t >= 2: the new gate copies the previous trained gate; key_t = top left singular vector
  of (C3 - U3 U3^T C3), C3 = mean(g g^T) of the new gate's outputs on task t, scaled to the
  norm of a U(-1, 1) draw.
* After every optimizer step, the gate and key updates are projected away from the old
  tasks' subspaces (U1: embeddings e, U2: hidden h, U3: gate outputs g), then each row's norm
  is restored to its value after the raw step.
* After task t, the bases grow GPM-style until the captured energy (squared singular values of
  the covariance, as the authors' code measures it) reaches eps_t = eps + (1 - eps)(t - 1)/T.

Deviations from the authors' code (T5-large): decoder-only model, the target modules, epochs
and evaluation protocol of the other methods (no best-checkpoint selection on dev = test),
statistics streamed over at most ``stats_max_examples`` training examples per task (one
covariance per layer in memory). In mixed mode it is one task: a single gated InfLoRA branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from badit_exp import dist as D
from badit_exp.config import ConfigError
from badit_exp.data.prompts import collate_train
from badit_exp.io_utils import atomic_write_json
from badit_exp.methods.access import as_access
from badit_exp.methods.base import Method, MethodConfig
from badit_exp.methods.moe.layer import replace_linears
from badit_exp.methods.moe.routing import RoutingContext, attach_routing_hook
from badit_exp.methods.registry import register
from badit_exp.plotting import gate_table


@dataclass
class GainLoraConfig(MethodConfig):
    gate_hidden: int = 100  # width of the gate MLP (authors: 100)
    eps: float = 0.995  # GPM energy threshold of the first task
    stats_max_examples: int = 256  # training examples per task used for the statistics
    stats_batch_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.eps <= 1:
            raise ConfigError(f"method.eps={self.eps} must be in (0, 1].")
        if self.gate_hidden < 1 or self.stats_max_examples < 1 or self.stats_batch_size < 1:
            raise ConfigError("method.gate_hidden, stats_max_examples, stats_batch_size must be >= 1.")


# ---------------------------------------------------------------------------------------------
# pure helpers (tested directly)
# ---------------------------------------------------------------------------------------------

def threshold(eps: float, t: int, T: int) -> float:
    """eps_t = eps + (1 - eps) * (t - 1) / T, t 1-based."""
    return eps + (1 - eps) * (t - 1) / T


def grow_basis(C: torch.Tensor, U: torch.Tensor, eps_t: float) -> torch.Tensor:
    """Extend the orthonormal basis U (d x k) with singular directions of the residual
    (I - U U^T) C until the captured energy fraction of C reaches ``eps_t``."""
    C = C.double()
    U = U.double()
    sv = torch.linalg.svdvals(C)
    total = float((sv ** 2).sum())
    if total <= 0:
        return U.float()
    R = C - U @ (U.t() @ C) if U.shape[1] else C
    Ur, sr, _ = torch.linalg.svd(R)
    captured = total - float((sr ** 2).sum())
    k = 0
    cum = captured
    while cum / total < eps_t and k < len(sr):
        cum += float(sr[k] ** 2)
        k += 1
    if k == 0:
        return U.float()
    new = torch.cat([U, Ur[:, :k]], 1)
    q, _ = torch.linalg.qr(new)  # re-orthonormalise against rounding
    return q.float().contiguous()  # QR gives column-major Q: keep matmuls bit-identical after reload


def project_out(C: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    return C - M @ (M.t() @ C) if M.shape[1] else C


def projected_step(old: torch.Tensor, raw: torch.Tensor, U: torch.Tensor,
                   right: bool = True) -> torch.Tensor:
    """old + projected(raw - old), each row rescaled to the norm of ``raw``'s row.

    right=True: Delta (I - U U^T) (rows live in U's space: W1, W2); False: (I - U U^T) Delta
    for a vector (the key)."""
    if U.shape[1] == 0:
        return raw
    delta = raw - old
    if right:
        delta = delta - (delta @ U) @ U.t()
    else:
        delta = delta - U @ (U.t() @ delta)
    new = old + delta
    if new.dim() == 1:
        return new * (raw.norm() / new.norm().clamp_min(1e-12))
    return new * (raw.norm(dim=1, keepdim=True) / new.norm(dim=1, keepdim=True).clamp_min(1e-12))


# ---------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------

class GateContext:
    """Per-forward gate values (batch, tasks) shared by every layer, plus collection switches."""

    def __init__(self):
        self.gates: Optional[torch.Tensor] = None
        self.attention_mask: Optional[torch.Tensor] = None
        self.collect = False  # accumulate input covariances
        self.record: Optional[List[torch.Tensor]] = None


class GainLoraLinear(nn.Module):
    """A frozen linear layer + one LoRA branch per task, mixed by the tasks' gates."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, ctx: GateContext):
        """Args:
            base: the frozen linear layer to adapt.
            rank, alpha: each branch's rank r and scaling alpha / r.
            dropout: dropout on the branches' input.
            ctx: the gate context shared by all layers (this forward's gates per task).
        """
        super().__init__()
        self.base, self.rank, self.scaling, self.ctx = base, rank, alpha / rank, ctx
        d_in, d_out, dev = base.in_features, base.out_features, base.weight.device
        self.register_buffer("gain_A", torch.zeros(0, d_in, device=dev))  # all tasks' A (frozen)
        self.register_buffer("gain_B_prev", torch.zeros(d_out, 0, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, device=dev))  # current task's B
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.cov_sum = None
        self.cov_n = 0

    def forward(self, x):
        y = self.base(x)
        if self.ctx.collect:
            m = self.ctx.attention_mask
            xf = x.detach().float().reshape(-1, x.shape[-1])
            if m is not None and m.shape[:2] == x.shape[:2]:
                xf = xf[m.reshape(-1).bool()]
            s = xf.t() @ xf
            self.cov_sum = s if self.cov_sum is None else self.cov_sum + s
            self.cov_n += xf.shape[0]
        if self.gain_A.shape[0] == 0 or self.ctx.gates is None:
            return y
        k = self.gain_A.shape[0]  # branches that exist (the current one only while training)
        B = torch.cat([self.gain_B_prev, self.lora_B], 1)[:, :k]
        g = self.ctx.gates.repeat_interleave(self.rank, dim=-1).unsqueeze(1)  # (b, 1, T*r)
        h = F.linear(self.dropout(x).to(B.dtype), self.gain_A) * g
        return y + (self.scaling * F.linear(h, B)).to(y.dtype)

    def covariance(self) -> torch.Tensor:
        C = self.cov_sum / max(self.cov_n, 1)
        self.cov_sum, self.cov_n = None, 0
        return C


class Gates(nn.Module):
    """All tasks' gates: frozen old ones stacked in buffers, the current one trainable."""

    def __init__(self, d: int, hidden: int, device):
        super().__init__()
        self.d, self.hidden = d, hidden
        self.W1 = nn.Parameter(nn.Linear(d, hidden, bias=False, device=device).weight.detach().clone())
        self.W2 = nn.Parameter(nn.Linear(hidden, d, bias=False, device=device).weight.detach().clone())
        self.key = nn.Parameter(torch.empty(d, device=device).uniform_(-1, 1))
        self.register_buffer("W1_prev", torch.zeros(0, hidden, d, device=device))
        self.register_buffer("W2_prev", torch.zeros(0, d, hidden, device=device))
        self.register_buffer("key_prev", torch.zeros(0, d, device=device))

    def parts(self, e: torch.Tensor, W1, W2):
        h = F.silu(e @ W1.t())
        return h, F.silu(h @ W2.t())

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """(batch, tasks) gate values a_i for the old gates and the current one."""
        e = e.float()
        out = []
        for W1, W2, k in zip(self.W1_prev, self.W2_prev, self.key_prev):
            _, g = self.parts(e, W1, W2)
            out.append(torch.abs(torch.tanh(2 * F.cosine_similarity(g, k[None], dim=-1))))
        _, g = self.parts(e, self.W1, self.W2)
        out.append(torch.abs(torch.tanh(2 * F.cosine_similarity(g, self.key[None], dim=-1))))
        return torch.stack(out, -1)

    @torch.no_grad()
    def freeze_current(self) -> None:
        self.W1_prev = torch.cat([self.W1_prev, self.W1.detach()[None]], 0)
        self.W2_prev = torch.cat([self.W2_prev, self.W2.detach()[None]], 0)
        self.key_prev = torch.cat([self.key_prev, self.key.detach()[None]], 0)


@register("gainlora", GainLoraConfig)
class GainLora(Method):
    """Gated InfLoRA branches, one per task (see the module docstring)."""

    def apply(self, model):
        c = self.cfg
        self.ctx = GateContext()
        self.layers: Dict[str, GainLoraLinear] = replace_linears(
            model, c.target_modules, lambda n, lin: GainLoraLinear(lin, c.rank, c.alpha, c.dropout, self.ctx))
        emb = model.get_input_embeddings()
        self.embed = emb
        d = emb.weight.shape[1]
        dev = emb.weight.device
        self.gates = Gates(d, c.gate_hidden, dev)
        model.gainlora_gates = self.gates  # registered as a submodule: moves and saves with it
        self.bases = {"U1": torch.zeros(d, 0, device=dev), "U2": torch.zeros(c.gate_hidden, 0, device=dev),
                      "U3": torch.zeros(d, 0, device=dev)}
        self.M = {n: torch.zeros(l.base.in_features, 0, device=dev) for n, l in self.layers.items()}
        self.tasks_done = 0
        self._snap = None
        self._reuse_cached = None
        self.gate_table: Dict[str, Dict[str, List[float]]] = {}
        self.stage_name = ""
        self._training_task = False  # true between on_stage_start and on_stage_end
        self.routing = RoutingContext()
        self._hook = attach_routing_hook(model, self.routing, on_prefill=self._on_prefill)
        return model

    def describe(self):
        return {"kind": self.kind, "eps": self.cfg.eps, "covariance_tokens": "all non-padding",
                "gates_at_generation": "computed once from the prompt, reused while decoding"}

    # -- gates --------------------------------------------------------------------------------
    def _pooled(self, ids, mask):
        """Mean input embedding over ``mask`` (the prompt tokens; all tokens if None)."""
        m = mask if mask is not None else torch.ones(ids.shape[:2], dtype=torch.long,
                                                     device=ids.device)
        m = m.unsqueeze(-1).float()
        with torch.no_grad():
            e = self.embed(ids).float()
        return (e * m).sum(1) / m.sum(1).clamp_min(1.0)

    def _on_prefill(self, rctx: RoutingContext) -> None:
        """The shared routing hook's callback (not on KV-cached decoding steps, which keep the
        prompt's gates): this forward's gates from the prompt's mean embedding."""
        ids, am = rctx.input_ids, rctx.sequence_mask
        self.ctx.attention_mask = am
        if ids is None or self.tasks_done + (1 if self._training_task else 0) == 0:
            self.ctx.gates = None
            return
        g = self.gates(self._pooled(ids, rctx.prompt_mask))
        if not self._training_task:
            g = g[:, :-1]  # between tasks: only trained branches exist
        self.ctx.gates = g
        if self.ctx.record is not None:
            self.ctx.record.append(g.detach().cpu())

    # -- statistics ---------------------------------------------------------------------------
    def _batches(self, model, examples):
        dev = next(model.parameters()).device
        ex = examples[: self.cfg.stats_max_examples]
        bs = self.cfg.stats_batch_size
        for i in range(0, len(ex), bs):
            b = collate_train(ex[i: i + bs], pad_id=0)
            yield b["input_ids"].to(dev), b["attention_mask"].to(dev), b["labels"].to(dev)

    @torch.no_grad()
    def _layer_covariances(self, model, examples) -> Dict[str, torch.Tensor]:
        was = model.training
        model.eval()
        self.ctx.collect = True
        try:
            for ids, am, _ in self._batches(model, examples):
                model(input_ids=ids, attention_mask=am)
        finally:
            self.ctx.collect = False
        model.train(was)
        return {n: l.covariance() for n, l in self.layers.items()}

    @torch.no_grad()
    def _gate_statistics(self, model, examples):
        """Covariances of e, h and g of the CURRENT gate over a task's prompts."""
        sums = {"e": 0, "h": 0, "g": 0}
        n = 0
        for ids, am, labels in self._batches(model, examples):
            e = self._pooled(ids, am * (labels == -100).to(am.dtype))  # the prompt tokens
            h, g = self.gates.parts(e, self.gates.W1, self.gates.W2)
            for k, v in (("e", e), ("h", h), ("g", g)):
                sums[k] = sums[k] + v.double().t() @ v.double()
            n += e.shape[0]
        return {k: (v / max(n, 1)).float() for k, v in sums.items()}

    # -- task boundaries ----------------------------------------------------------------------
    def on_stage_start(self, model, stage_index, stage_name, train_batches):
        self.stage_name = stage_name
        examples = [ex for task in train_batches for ex in task]
        # InfLoRA design of A_t from the input covariance, old input subspace projected out
        covs = self._layer_covariances(model, examples)
        for n, l in self.layers.items():
            C = project_out(covs[n].to(self.M[n].dtype), self.M[n])
            U, _, _ = torch.linalg.svd(C.double())
            A_t = (U[:, : l.rank].t() / math.sqrt(3)).to(l.gain_A.dtype)
            l.gain_A = torch.cat([l.gain_A, A_t], 0)
            with torch.no_grad():
                l.lora_B.zero_()
        if self.tasks_done > 0:
            # the new gate starts as a copy of the trained one; its key avoids old gate outputs
            st = self._gate_statistics(model, examples)
            R = project_out(st["g"].double(), self.bases["U3"].double())
            U, _, _ = torch.linalg.svd(R)
            init_norm = torch.empty(self.gates.d).uniform_(-1, 1).norm()
            with torch.no_grad():
                self.gates.key.copy_((U[:, 0] * init_norm).to(self.gates.key.dtype))
        self._training_task = True

    def on_stage_end(self, model, stage_index, stage_name, train_batches):
        examples = [ex for task in train_batches for ex in task]
        T = max(len(self.task_names), 1)
        t = self.tasks_done + 1
        eps_t = threshold(self.cfg.eps, t, T)
        covs = self._layer_covariances(model, examples)
        for n in self.layers:
            self.M[n] = grow_basis(covs[n], self.M[n], eps_t).to(self.M[n].device)
        st = self._gate_statistics(model, examples)
        for key, name in (("U1", "e"), ("U2", "h"), ("U3", "g")):
            self.bases[key] = grow_basis(st[name], self.bases[key], eps_t).to(self.bases[key].device)
        # freeze this task's branch and gate; the next task gets a copy of this gate
        for l in self.layers.values():
            l.gain_B_prev = torch.cat([l.gain_B_prev, l.lora_B.detach().clone()], 1)
            with torch.no_grad():
                l.lora_B.zero_()
        self.gates.freeze_current()
        self.tasks_done = t
        self._training_task = False

    # -- gradient projection ------------------------------------------------------------------
    def after_backward(self, model, optimizer, step, epoch, num_epochs, last_of_epoch=False,
                       total_steps=None):
        g = self.gates
        self._snap = (g.W1.detach().clone(), g.W2.detach().clone(), g.key.detach().clone())

    @torch.no_grad()
    def after_optimizer_step(self, model, optimizer):
        if self._snap is None or self.tasks_done == 0:
            return
        g, (W1, W2, key) = self.gates, self._snap
        opt = as_access(optimizer)  # under ZeRO the fp32 master copies are rewritten too
        opt.set_param(g.W1, projected_step(W1, g.W1, self.bases["U1"], right=True))
        opt.set_param(g.W2, projected_step(W2, g.W2, self.bases["U2"], right=True))
        opt.set_param(g.key, projected_step(key, g.key, self.bases["U3"], right=False))

    # -- diagnostics: gate of every branch on every task's test inputs ------------------------
    def start_eval(self, task):
        self.ctx.record = []

    def end_eval(self, task):
        rec, self.ctx.record = self.ctx.record, None
        # evaluation is sharded over ranks: pool every shard's gate sums and counts
        local = (torch.cat(rec).double().sum(0), sum(r.shape[0] for r in rec)) if rec else None
        parts = [x for x in D.all_gather_object(local) if x is not None]
        if parts:
            total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
            self.gate_table.setdefault(self.stage_name, {})[task] = total.float().tolist()

    def after_evaluate(self, stage_name):
        if self.run_dir is None or stage_name not in self.gate_table:
            return
        atomic_write_json(self.run_dir / "gate_table.json",
                          {"rows": "evaluated task", "columns": "branch (task trained at stage i)",
                           "stages": self.gate_table})
        table = self.gate_table[stage_name]
        gate_table(self.run_dir / "gate_table.png", list(table), [table[t] for t in table],
                   title=f"GainLoRA gates after {stage_name}")

    # -- checkpoints: everything that grows between tasks -------------------------------------
    def _growing(self):
        for n, l in self.layers.items():
            yield f"{n}.gain_A", l, "gain_A"
            yield f"{n}.gain_B_prev", l, "gain_B_prev"
        for k in ("W1_prev", "W2_prev", "key_prev"):
            yield f"gates.{k}", self.gates, k

    def state_dict(self, model):
        st = super().state_dict(model)
        for key, mod, attr in self._growing():
            st[key] = getattr(mod, attr).detach().cpu().clone()
        for n, M in self.M.items():
            st[f"basis.M.{n}"] = M.detach().cpu().clone()
        for k, U in self.bases.items():
            st[f"basis.{k}"] = U.detach().cpu().clone()
        st["meta.tasks_done"] = torch.tensor([self.tasks_done, int(self._training_task)])
        return st

    def load_state_dict(self, model, state):
        state = dict(state)
        dev = self.gates.key.device
        for key, mod, attr in self._growing():
            if key in state:
                setattr(mod, attr, state.pop(key).to(dev))
        for n in self.M:
            if f"basis.M.{n}" in state:
                self.M[n] = state.pop(f"basis.M.{n}").to(dev)
        for k in self.bases:
            if f"basis.{k}" in state:
                self.bases[k] = state.pop(f"basis.{k}").to(dev)
        if "meta.tasks_done" in state:
            done, training = state.pop("meta.tasks_done").tolist()
            self.tasks_done, self._training_task = int(done), bool(training)
        super().load_state_dict(model, state)
