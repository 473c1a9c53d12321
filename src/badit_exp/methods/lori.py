"""LoRI (Zhang et al.; released code juzhengz/LoRI @ 9183468): LoRA with A frozen at a seeded
random init and a sparse mask on B,

    y = W x + s (M * B) A x.

The released recipe is two runs: LoRI-D trains a dense B (A frozen), the mask keeps the top
(1 - sparsity) of |B| over ALL adapted layers together (global magnitude top-k), and LoRI-S
restarts with B = 0 and trains only the masked entries, at 10x LoRI-D's rate (released scripts:
5e-5 and 5e-4) and with a schedule of its own (it is a run of its own). Here both stages can
run in one:

* ``calibration_steps`` optimizer steps of dense training at the start of a stage (``None``:
  half the stage's steps), then the global top-k mask, B reset to 0 (its Adam moments too) and
  masked training for the rest of the stage. As in the released recipe, the masked part runs the
  trainer's warm-up and schedule anew (``restart_schedule``) at ``masked_lr_scale`` x the rate
  (10): ``trainer.lr`` is LoRI-D's rate. (Before issue 26 it ran in the tail of the stage's
  cosine at the dense rate, about 1/16 of the released masked rate at 8 steps a stage: LoRI
  barely learned in sequential runs. ``restart_schedule=false masked_lr_scale=1`` gives that
  form back.) Or
* ``mask_path``: a mask saved by an earlier run (``<run_dir>/lori_mask.safetensors``), masked
  training from the first step (the released two-run form): the run is LoRI-S alone, one
  schedule at ``trainer.lr`` (released: 5e-4).

Masked entries never change: their gradient is exactly 0 (the forward multiplies by M), so
AdamW's moments and update stay 0 and decoupled weight decay keeps a 0 at 0, bit for bit, under
one process, DDP or ZeRO-2.

Continual learning (``training_mode=sequential``): each task gets a mask disjoint from the
entries earlier tasks use. At a task's start the trained entries are folded into a frozen buffer
``lori_B_prev`` (they never change again), B restarts at 0 and the new mask is chosen among the
free entries. T tasks need a density (1 - sparsity) <= 1 / T: a sparsity that cannot give T
disjoint masks is refused, naming the minimum.

A is drawn from ``torch.Generator().manual_seed(a_seed + i)`` for the i-th adapted layer (the
released code never seeds it); the seed is in the checkpoint (``lori_a_seed``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from badit_exp.config import ConfigError
from badit_exp.methods.base import Method, MethodConfig
from badit_exp.methods.moe.layer import replace_linears
from badit_exp.methods.registry import register


@dataclass
class LoRIConfig(MethodConfig):
    target_modules: List[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    rank: int = 32
    alpha: float = 64.0
    sparsity: float = 0.9  # share of B's entries masked out (released: 0.9)
    calibration_steps: Optional[int] = None  # dense steps before the mask; None = half a stage
    masked_lr_scale: float = 10.0  # the masked part's peak rate / trainer.lr (released: 10)
    restart_schedule: bool = True  # the masked part runs warm-up + schedule anew (released)
    mask_path: Optional[str] = None  # a saved mask: masked training from the first step
    a_seed: int = 0  # A of the i-th adapted layer from Generator().manual_seed(a_seed + i)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.sparsity < 1:
            raise ConfigError(f"method.sparsity={self.sparsity} must be in [0, 1).")
        if not self.masked_lr_scale > 0:
            raise ConfigError(f"method.masked_lr_scale={self.masked_lr_scale} must be > 0 "
                              "(released: 10, LoRI-S at 10x LoRI-D's rate).")
        if not self.restart_schedule and self.masked_lr_scale != 1.0:
            raise ConfigError(f"method.masked_lr_scale={self.masked_lr_scale} needs "
                              "method.restart_schedule=true (a continued schedule with a jump "
                              "in its rate is not offered); or set masked_lr_scale=1.")
        if self.calibration_steps is not None and self.calibration_steps < 1:
            raise ConfigError(f"method.calibration_steps={self.calibration_steps} must be >= 1 "
                              "(or null: half of each stage).")


class LoRILinear(nn.Module):
    """A frozen linear layer + s ((M * B) + B_prev) A x with A a frozen seeded buffer."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, seed: int):
        """Args:
            base: the frozen linear layer. rank, alpha: r, scaling alpha / r.
            dropout: dropout on the input. seed: the generator seed of this layer's A.
        """
        super().__init__()
        self.base, self.rank, self.scaling = base, rank, alpha / rank
        dev = base.weight.device
        A = torch.empty(rank, base.in_features)
        bound = 1 / math.sqrt(base.in_features)  # kaiming-uniform (a = sqrt 5), seeded
        A.uniform_(-bound, bound, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("lori_A", A.to(dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))
        self.register_buffer("lori_mask", torch.ones(base.out_features, rank, device=dev))
        self.register_buffer("lori_B_prev", torch.zeros(base.out_features, rank, device=dev))
        self.register_buffer("lori_used", torch.zeros(base.out_features, rank, device=dev))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = self.lora_B * self.lori_mask + self.lori_B_prev
        h = F.linear(self.dropout(x).to(self.lori_A.dtype), self.lori_A)
        return self.base(x) + (self.scaling * F.linear(h, B)).to(x.dtype)


@register("lori", LoRIConfig)
class LoRI(Method):
    """Frozen seeded A, sparse B: calibration, global magnitude mask, masked training."""

    def apply(self, model):
        c = self.cfg
        counter = iter(range(10 ** 9))
        self.layers: Dict[str, LoRILinear] = replace_linears(
            model, c.target_modules,
            lambda n, lin: LoRILinear(lin, c.rank, c.alpha, c.dropout, c.a_seed + next(counter)))
        self.masked = False  # this stage's mask is set
        self.free: Dict[str, torch.Tensor] = {}
        n_tasks = len(self.stages) if self.mode == "sequential" else 1
        if n_tasks > 1 and (1 - c.sparsity) * n_tasks > 1 + 1e-9:
            raise ConfigError(f"method.sparsity={c.sparsity} leaves a density of "
                              f"{1 - c.sparsity:.3f}: {n_tasks} sequential tasks need disjoint "
                              f"masks, so sparsity >= {1 - 1 / n_tasks:.4f} (1 - 1/T).")
        return model

    def describe(self):
        c = self.cfg
        return {"kind": self.kind, "sparsity": c.sparsity, "a_seed": c.a_seed,
                "calibration_steps": c.calibration_steps, "mask_path": c.mask_path,
                "masked_lr_scale": c.masked_lr_scale, "restart_schedule": c.restart_schedule,
                "A": "frozen, seeded"}

    def _n_cal(self, total_steps: Optional[int]) -> int:
        return self.cfg.calibration_steps or max((total_steps or 2) // 2, 1)

    def lr_phases(self, total_steps):
        """Dense calibration at the rate, then the masked part at ``masked_lr_scale`` x it, its
        schedule restarted (``restart_schedule``) or continued; one phase with ``mask_path``
        (masked from the first step) or when the mask would come after the stage's end."""
        c = self.cfg
        n_cal = self._n_cal(total_steps)
        if c.mask_path or n_cal >= total_steps:
            return None
        return [(0, 1.0), (n_cal, c.masked_lr_scale)] if c.restart_schedule else None

    def mergeable(self) -> bool:
        return True  # W + s (M * B + B_prev) A

    # -- stages -------------------------------------------------------------------------------
    def on_stage_start(self, model, stage_index, stage_name, train_batches):
        with torch.no_grad():
            if stage_index > 0 and self.mode == "sequential":
                # the finished task's entries become frozen; B restarts at 0 on free entries
                for l in self.layers.values():
                    l.lori_B_prev.add_(l.lora_B * l.lori_mask)
                    l.lori_used.copy_(torch.maximum(l.lori_used, l.lori_mask))
                    l.lora_B.zero_()
            free = {n: 1 - l.lori_used for n, l in self.layers.items()}
            self.free = free
            for n, l in self.layers.items():
                l.lori_mask.copy_(free[n])  # dense calibration on the free entries
        self.masked = False
        if self.cfg.mask_path:
            self._set_mask(load_file(self.cfg.mask_path), None)

    def after_backward(self, model, optimizer, step, epoch, num_epochs, last_of_epoch=False,
                       total_steps=None):
        if self.masked:
            return
        n_cal = self._n_cal(total_steps)
        if step == n_cal:  # calibration done: the mask, B back to 0 with its moments
            self._set_mask(self._global_topk(), optimizer)

    def _global_topk(self) -> Dict[str, torch.Tensor]:
        """The top (1 - sparsity) of |B| over every layer together (free entries only; the
        count is of all entries, so each task gets the same density)."""
        mags = {n: (l.lora_B.detach().abs() * self.free[n]).float()
                for n, l in self.layers.items()}
        flat = torch.cat([m.flatten() for m in mags.values()])
        k = max(int(round((1 - self.cfg.sparsity) * flat.numel())), 1)
        thresh = flat.topk(k).values[-1]
        return {n: ((m >= thresh) & (self.free[n] > 0)).float() for n, m in mags.items()}

    @torch.no_grad()
    def _set_mask(self, masks: Dict[str, torch.Tensor], optimizer) -> None:
        for n, l in self.layers.items():
            m = masks[n].to(l.lori_mask.device, l.lori_mask.dtype) * self.free[n]
            l.lori_mask.copy_(m)
            if optimizer is None:
                l.lora_B.zero_()
            else:  # B, its moments and the pending gradient: 0 outside the mask, B 0 inside
                optimizer.transform(l.lora_B, lambda t: t * 0,
                                    grad_fn=lambda g, m=m: g * m.to(g.dtype),
                                    moment_fns={"exp_avg": lambda t: t * 0,
                                                "exp_avg_sq": lambda t: t * 0})
        self.masked = True
        if self.run_dir is not None:
            save_file({n: l.lori_mask.detach().cpu().contiguous() for n, l in self.layers.items()},
                      str(self.run_dir / "lori_mask.safetensors"))

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self, model):
        state = super().state_dict(model)
        for n, l in self.layers.items():
            for b in ("lori_mask", "lori_B_prev", "lori_used"):
                state[f"{n}.{b}"] = getattr(l, b).detach().cpu().clone()
        state["lori_a_seed"] = torch.tensor(self.cfg.a_seed)
        state["lori_masked"] = torch.tensor(int(self.masked))
        return state

    def load_state_dict(self, model, state):
        state = dict(state)
        seed = int(state.pop("lori_a_seed", self.cfg.a_seed))
        if seed != self.cfg.a_seed:
            raise ConfigError(f"the checkpoint's A was drawn with a_seed={seed}, the config "
                              f"says method.a_seed={self.cfg.a_seed}; set it back.")
        self.masked = bool(int(state.pop("lori_masked", 0)))
        super().load_state_dict(model, state)
