"""What every adapter method provides to the training runner.

The runner calls these hooks at fixed points; a method overrides only those it needs:

* ``apply``: add the adapter to a freshly loaded base model (freeze the base).
* ``on_stage_start`` / ``on_stage_end``: task boundaries in sequential mode (continual methods
  grow branches, collect statistics, extend bases here). ``mixed`` is a single stage.
* ``extra_loss``: a regulariser added to the cross-entropy (e.g. a balancing loss).
* ``after_backward``: gradients are complete for this optimizer step (e.g. DOG regrouping).
* ``after_optimizer_step``: e.g. projecting an update away from protected subspaces.
* ``state_dict`` / ``load_state_dict``: everything a checkpoint must hold to resume, on top of
  re-applying the method to the base model with the same seed.

The ``optimizer`` the training hooks receive is the stage's engine, seen through the protocol of
:mod:`badit_exp.methods.access` (a method imports nothing from ``training/``): read gradients
with ``optimizer.grad(p)`` and rewrite a parameter with ``optimizer.transform(p, fn, ...)`` /
``optimizer.set_param(p, value)``, never ``p.grad`` / ``p.data`` / ``optimizer.state`` directly,
so the method stays correct under DDP and DeepSpeed ZeRO-2 (where gradients, fp32 master
weights and Adam moments are partitioned).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import MISSING

from badit_exp.config import ConfigError


@dataclass
class MethodConfig:
    """Fields shared by every method."""

    name: str = MISSING  # label used in run names and reports
    kind: str = MISSING  # registered implementation
    target_modules: List[str] = field(default_factory=lambda: ["gate_proj"])
    rank: int = 4
    alpha: float = 32.0
    dropout: float = 0.05

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ConfigError(f"method.rank={self.rank} must be > 0.")
        if self.alpha <= 0:
            raise ConfigError(f"method.alpha={self.alpha} must be > 0.")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"method.dropout={self.dropout} must be in [0, 1).")
        if not self.target_modules:
            raise ConfigError("method.target_modules is empty; name at least one module, "
                              "e.g. [gate_proj].")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class Method:
    """Base class with no-op hooks. Subclasses implement :meth:`apply`."""

    kind: str = "?"
    # true: a training step may leave some trainable parameters without a gradient (sparse
    # expert dispatch); DDP then runs with find_unused_parameters
    skips_parameters: bool = False
    needs_task_id: bool = False  # the forward pass needs the task id at test time

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg
        self.run_dir = None  # set by the runner; where diagnostics go
        self.task_names: List[str] = []  # data.tasks, set by the runner (task_index order)
        self.mode = ""  # training_mode.name, set by the runner
        self.stages: List[str] = []  # the run's stage names, in order, set by the runner

    # -- building ---------------------------------------------------------------------------
    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Add the adapter to a freshly loaded base model and freeze the base.

        Args:
            model: the pre-trained model (all parameters frozen by the loader).

        Returns:
            The adapted model (the same object or a wrapper, e.g. PEFT's).
        """
        raise NotImplementedError

    def mergeable(self) -> bool:
        """Whether the trained adapter can be folded into the base weights (a fixed
        weight update, not one that depends on the input)."""
        return False

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        """Fold the trained adapter into the base weights; returns the plain model.

        Raises:
            ConfigError: the method is not mergeable (its update depends on the input, e.g.
                through routing, so no single W + dW computes the trained function), or no
                merge is implemented for it. Never a silent approximation.
        """
        if not self.mergeable():
            raise ConfigError(
                f"method kind {self.kind!r} is not mergeable: its weight update depends on the "
                "input (routing or gates), so no single W + dW computes the trained function. "
                "Keep the adapter (load_trained(..., merge=False)).")
        raise ConfigError(f"merging is not implemented for method kind {self.kind!r} (a fixed "
                          "update, but no merge was written); keep the adapter.")

    def describe(self) -> Dict[str, Any]:
        """Which variant runs, recorded in metrics.json."""
        return {"kind": self.kind}

    def lr_phases(self, total_steps: int) -> Optional[List[Tuple[int, float]]]:
        """The stage's learning-rate schedule in phases: ``[(first optimizer step, peak-rate
        factor), ...]`` from step 0, each running the trainer's warm-up and schedule anew over
        its own steps (``training.engine.make_scheduler``); None (the default): one phase.
        Called when the stage's engine is built, so it must depend on the config and
        ``total_steps`` only (a resumed stage rebuilds the same schedule)."""
        return None

    # -- training hooks ---------------------------------------------------------------------
    def on_stage_start(self, model, stage_index: int, stage_name: str, train_batches) -> None:
        """A stage (a task in sequential mode, all tasks in mixed) is about to train.

        Args:
            model: the adapted model.
            stage_index: 0-based position of the stage.
            stage_name: the task's name (``mixed`` in mixed mode).
            train_batches: one list of tokenised training examples per task of the stage.
        """

    def on_stage_end(self, model, stage_index: int, stage_name: str, train_batches) -> None:
        """The stage finished training (before its evaluation); arguments as
        :meth:`on_stage_start`."""

    def before_forward(self, model, batch) -> None:
        """Before every training (and target-loss) forward, with the collated batch: a method
        that needs the task id reads ``batch["task_index"]`` here (evaluation names the task
        through :meth:`start_eval`)."""

    def extra_loss(self, model, batch) -> Optional[torch.Tensor]:
        """A term added to the micro-batch's cross-entropy (None: nothing).

        Args:
            model: the adapted model, after its forward on ``batch``.
            batch: the collated micro-batch (``input_ids``, ``attention_mask``, ``labels``,
                ``task_index``).
        """
        return None

    def after_backward(self, model, optimizer, step: int, epoch: int, num_epochs: int,
                       last_of_epoch: bool = False, total_steps: Optional[int] = None) -> None:
        """Gradients of this optimizer step are complete (reduced over ranks), before clipping.

        Args:
            model: the adapted model.
            optimizer: the engine, seen through :mod:`badit_exp.methods.access` (``grad``,
                ``transform``, ``set_param``, ``permute``).
            step: optimizer steps already taken in this stage.
            epoch, num_epochs: the current epoch (0-based) and the stage's epochs.
            last_of_epoch: this step ends an epoch.
            total_steps: optimizer steps of the whole stage.
        """

    def after_optimizer_step(self, model, optimizer) -> None:
        """The optimizer step was taken (e.g. project the update); arguments as
        :meth:`after_backward`."""

    def on_resume(self, stage_name: str, step: int) -> None:
        """A stage resumes after ``step`` optimizer steps: drop diagnostics logged after it."""

    # -- evaluation hooks -------------------------------------------------------------------
    def start_eval(self, task: str) -> None:
        """Before generating for ``task`` (e.g. switch on router statistics)."""

    def end_eval(self, task: str) -> None:
        """After generating for ``task``."""

    def after_evaluate(self, stage_name: str) -> None:
        """After all tasks of a stage are evaluated (e.g. plots)."""

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """Everything a checkpoint holds on top of re-applying the method with the same seed.

        Returns:
            {name: CPU tensor}: the trainable parameters (a method with extra state, e.g.
            frozen buffers that move during training, extends this).
        """
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

    def load_state_dict(self, model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
        params = {**dict(model.named_buffers()), **dict(model.named_parameters())}
        missing = [n for n in state if n not in params]
        if missing:
            raise RuntimeError(f"checkpoint holds parameters the model lacks: {missing[:3]}...")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))
