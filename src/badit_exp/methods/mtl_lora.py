"""MTL-LoRA (Yang et al.; released code pUmpKin-Co/MTL-LoRA @ 7848a70).

    y = W x + s * B~_t Lambda_t A x,    B~_t = sum_j softmax(w_t / tau)_j B_j

A (r x in) is shared by every task; each task t has a full r x r ``Lambda_t`` (identity at init)
and mixing logits ``w_t`` over n_B shared up-projections B_j (out x r, zero at init, so the
adapter is exactly 0 at step 0). The routing depends on the task only, so the forward pass needs
the **task id**, at training and at test time: the runner hands every training batch to
:meth:`Method.before_forward` (its ``task_index``) and names the task before evaluating it
(:meth:`Method.start_eval`); every example of a mixed batch uses its own task's Lambda and
mixing. Released: q, k, v, o, r = 8, alpha = 16, n_B = 3, tau = 0.1, lr 3e-4.

Sequential mode: a task's Lambda and mixing logits are reset to their init when its stage
starts (only its own batches train them); ``freeze_past_tasks`` keeps earlier tasks' Lambda and
mixing exactly as their stages left them (their gradient is 0 anyway; this undoes AdamW's
decoupled weight decay), while A and the B_j stay shared. A task never trained (a later task evaluated early) runs with
the initial Lambda = I and uniform mixing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from badit_exp.config import ConfigError
from badit_exp.methods.base import Method, MethodConfig
from badit_exp.methods.moe.layer import replace_linears
from badit_exp.methods.registry import register


@dataclass
class MTLLoRAConfig(MethodConfig):
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj",
                                                               "o_proj"])
    rank: int = 8
    alpha: float = 16.0
    num_up: int = 3  # n_B, the shared up-projections
    temperature: float = 0.1  # tau of the task's softmax over the up-projections
    freeze_past_tasks: bool = False  # sequential: earlier tasks' Lambda and mixing stay fixed

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_up < 1:
            raise ConfigError(f"method.num_up={self.num_up} must be >= 1.")
        if self.temperature <= 0:
            raise ConfigError(f"method.temperature={self.temperature} must be > 0.")


class TaskContext:
    """The task of every example of the current forward (shared by all layers)."""

    def __init__(self):
        self.task_ids: Optional[torch.Tensor] = None  # (batch,) long
        self.eval_task: Optional[int] = None  # evaluation: one task for every batch


class MTLLoRALinear(nn.Module):
    """A frozen linear layer + MTL-LoRA: shared A, per-task Lambda and mixing, shared B_j."""

    def __init__(self, base: nn.Linear, num_tasks: int, rank: int, alpha: float, dropout: float,
                 num_up: int, temperature: float, ctx: TaskContext):
        """Args:
            base: the frozen linear layer. num_tasks: T (one Lambda and mixing per task).
            rank, alpha, dropout: r, scaling alpha / r, dropout on the input.
            num_up, temperature: n_B up-projections, tau of the mixing softmax.
            ctx: the task context filled before each forward.
        """
        super().__init__()
        self.base, self.ctx, self.rank, self.temperature = base, ctx, rank, temperature
        self.scaling = alpha / rank
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)
        self.lora_lambda = nn.Parameter(torch.eye(rank, device=dev).repeat(num_tasks, 1, 1))
        self.lora_mix = nn.Parameter(torch.zeros(num_tasks, num_up, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(num_up, base.out_features, rank, device=dev))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def task_ids(self, batch: int, device) -> torch.Tensor:
        ctx = self.ctx
        if ctx.eval_task is not None:
            return torch.full((batch,), ctx.eval_task, dtype=torch.long, device=device)
        if ctx.task_ids is None or ctx.task_ids.shape[0] != batch:
            raise RuntimeError("MTL-LoRA needs the task id of every example: the runner sets it "
                               "through Method.before_forward / start_eval.")
        return ctx.task_ids.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.task_ids(x.shape[0], x.device)
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (b, s, r)
        h = torch.einsum("bsr,bqr->bsq", h, self.lora_lambda[t])  # Lambda_t h
        mix = torch.softmax(self.lora_mix[t].float() / self.temperature, -1)  # (b, n_B)
        B = torch.einsum("bj,jor->bor", mix.to(self.lora_B.dtype), self.lora_B)  # B~_t
        return self.base(x) + (self.scaling * torch.einsum("bsr,bor->bso", h, B)).to(x.dtype)


@register("mtl_lora", MTLLoRAConfig)
class MTLLoRA(Method):
    """MTL-LoRA: the task id in the forward pass selects Lambda_t and the mixing w_t."""

    needs_task_id = True

    def apply(self, model):
        c = self.cfg
        self.ctx = TaskContext()
        T = max(len(self.task_names), 1)
        self.layers: Dict[str, MTLLoRALinear] = replace_linears(
            model, c.target_modules,
            lambda n, lin: MTLLoRALinear(lin, T, c.rank, c.alpha, c.dropout, c.num_up,
                                         c.temperature, self.ctx))
        self._trained = torch.zeros(T, dtype=torch.bool)  # tasks whose stage has started
        self._past: List[int] = []
        self._snapshot: Dict[str, tuple] = {}
        return model

    def describe(self):
        c = self.cfg
        return {"kind": self.kind, "num_up": c.num_up, "temperature": c.temperature,
                "freeze_past_tasks": c.freeze_past_tasks, "task_id": "train and test"}

    def before_forward(self, model, batch) -> None:
        self.ctx.eval_task = None
        self.ctx.task_ids = batch["task_index"]

    def on_stage_start(self, model, stage_index, stage_name, train_batches):
        """A sequential stage: its task's Lambda and mixing start at their init (whatever an
        earlier stage's weight decay did to them); remember the earlier tasks' rows."""
        if stage_name not in self.task_names:  # mixed: every task at once
            return
        t = self.task_names.index(stage_name)
        with torch.no_grad():
            for layer in self.layers.values():
                layer.lora_lambda[t].copy_(torch.eye(layer.rank, device=layer.lora_lambda.device))
                layer.lora_mix[t].zero_()
        self._past = [i for i in self._trained.nonzero().flatten().tolist() if i != t]
        self._snapshot = {n: (l.lora_lambda.detach().clone(), l.lora_mix.detach().clone())
                          for n, l in self.layers.items()}
        self._trained[t] = True

    def after_optimizer_step(self, model, optimizer) -> None:
        """``freeze_past_tasks``: earlier tasks' rows back to what their stages left (their
        gradient is already 0; AdamW's decoupled weight decay would still shrink them)."""
        if not (self.cfg.freeze_past_tasks and self._past):
            return
        past = torch.tensor(self._past)
        for name, layer in self.layers.items():
            for p, snap in zip((layer.lora_lambda, layer.lora_mix), self._snapshot[name]):
                value = p.detach().clone()
                value[past.to(p.device)] = snap[past.to(snap.device)].to(value.dtype)
                optimizer.set_param(p, value)

    # -- checkpoints: which tasks were trained (a resumed stage must know its past tasks) ------
    def state_dict(self, model):
        return {**super().state_dict(model), "_mtl_trained": self._trained.clone()}

    def load_state_dict(self, model, state):
        state = dict(state)
        if "_mtl_trained" in state:
            self._trained = state.pop("_mtl_trained").bool().clone()
        super().load_state_dict(model, state)

    def start_eval(self, task: str) -> None:
        self.ctx.eval_task = self.task_names.index(task)

    def end_eval(self, task: str) -> None:
        self.ctx.eval_task = None
