"""The optimisation engine of one stage: one process, DDP, or DeepSpeed ZeRO-2.

The loop (:mod:`badit_exp.training.loop`) and the methods talk to an :class:`Engine` only (the
methods through the protocol of :mod:`badit_exp.methods.access`, which the engines implement).
Engines take flat arguments (:class:`Optim` holds the optimisation numbers), never a config:

* ``forward`` / ``backward(loss, boundary)`` / ``step()``: a micro-batch, and the optimizer
  step at an accumulation boundary (clipping, AdamW, the warm-up schedule, zeroing).
* ``grad(p)``: the full gradient of parameter ``p``, reduced over all processes.
* ``transform(p, fn, ...)`` / ``set_param(p, value)``: rewrite a parameter *and everything the
  optimizer holds for it* (pending gradient, fp32 master copy, Adam moments). This is how DOG
  permutes components and GainLoRA projects updates without knowing which engine runs.
* ``state_dict`` / ``load_state_dict``: the optimizer, schedule and step count as full
  per-parameter tensors, so a checkpoint does not depend on the number of processes.

Under ZeRO-2 the gradients, fp32 master weights and moments are partitioned across ranks;
``deepspeed.utils.safe_get_full_* / safe_set_full_*`` read and write them as full tensors (they
are collectives: every rank calls them in the same order, which the methods do since they walk
their layers in a fixed order). The model's own parameter tensors (the low-precision copies the
forward uses) are rewritten too, so they agree with the master weights at once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from transformers import get_scheduler

from badit_exp import dist as D
from badit_exp.methods.access import MOMENTS, OptimizerAccess


@dataclass(frozen=True)
class Optim:
    """AdamW, its schedule and the step's bookkeeping (SPEC section 4's numbers)."""

    lr: float
    weight_decay: float
    lr_scheduler: str  # cosine | linear | constant, each after a linear warm-up
    warmup_ratio: float
    grad_accum_steps: int
    max_grad_norm: Optional[float]
    # the stage's schedule in phases (first optimizer step, peak-rate factor), from the method
    # (:meth:`Method.lr_phases`); empty: one phase
    phases: Tuple[Tuple[int, float], ...] = ()


def make_scheduler(optimizer, name: str, warmup_ratio: float, total_steps: int,
                   phases: Sequence[Tuple[int, float]] = ()):
    """transformers' schedule ``name`` with ``ceil(warmup_ratio * total_steps)`` warm-up steps.

    ``phases`` ((first step, factor), ..., the first at step 0): each phase runs the same
    schedule anew over its own steps (its own warm-up), its peak ``factor`` x the rate, e.g.
    LoRI's masked stage, a run of its own in the released code. A function of the step alone,
    so a resumed stage rebuilds it exactly."""
    name = "constant_with_warmup" if name == "constant" else name
    if not phases:
        warmup = math.ceil(warmup_ratio * total_steps)
        return get_scheduler(name, optimizer, num_warmup_steps=warmup,
                             num_training_steps=total_steps)
    starts = [int(s) for s, _ in phases]
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or \
            starts[-1] >= total_steps:
        raise ValueError(f"schedule phases {list(phases)}: first steps must rise from 0 and stay "
                         f"below the stage's {total_steps} steps")
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    parts = []
    for (start, factor), end in zip(phases, starts[1:] + [total_steps]):
        n = end - start
        f = get_scheduler(name, dummy, num_warmup_steps=math.ceil(warmup_ratio * n),
                          num_training_steps=n).lr_lambdas[0]
        parts.append((start, end, float(factor), f))

    def factor_at(step: int) -> float:
        for start, end, factor, f in parts:
            if step < end:
                return factor * f(step - start)
        start, _, factor, f = parts[-1]
        return factor * f(step - start)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor_at)


def deepspeed_config(*, micro_batch_size: int, grad_accum_steps: int,
                     max_grad_norm: Optional[float], world_size: int, bf16: bool,
                     zero_stage: int = 2, overlap_comm: bool = True,
                     contiguous_gradients: bool = True, reduce_bucket_size: int = 500_000_000,
                     allgather_bucket_size: int = 500_000_000,
                     extra: Optional[Dict] = None) -> Dict:
    """The DeepSpeed JSON for ``distributed=zero2``: micro batch, accumulation and clipping (from
    ``trainer``), the ZeRO knobs (from ``distributed``), then ``extra`` merged on top.

    Returns:
        The dict written to ``<run_dir>/deepspeed_config.json`` and given to
        ``deepspeed.initialize``.
    """
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        "zero_optimization": {
            "stage": zero_stage,
            "overlap_comm": overlap_comm,
            "contiguous_gradients": contiguous_gradients,
            "reduce_scatter": True,
            "reduce_bucket_size": reduce_bucket_size,
            "allgather_bucket_size": allgather_bucket_size,
            "offload_optimizer": {"device": "none"},
        },
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW, wrapped by ZeRO
        "steps_per_print": 10**9,  # the loop logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    return _merge(cfg, dict(extra or {}))


def _merge(base: Dict, extra: Dict) -> Dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Engine(OptimizerAccess):
    """One process (world of one, no wrapper) or torch DDP; the optimizer is a plain AdamW."""

    def __init__(self, model, named_params: List[Tuple[str, torch.nn.Parameter]], optim: Optim,
                 total_steps: int, *, ddp: bool = False, find_unused_parameters: bool = False,
                 device: Optional[torch.device] = None):
        """Args:
            model: the model with its adapter (only ``named_params`` are trained).
            named_params: (name, parameter) of every trainable parameter, in a fixed order.
            optim: the optimisation numbers.
            total_steps: optimizer steps of the stage (the schedule's length).
            ddp: wrap in DistributedDataParallel (when more than one process runs).
            find_unused_parameters: DDP's flag (a parameter may get no gradient).
            device: this process's device (DDP's ``device_ids``).
        """
        self.module = model
        self.named = named_params
        self.params = [p for _, p in named_params]
        self.optim = optim
        self.optimizer = torch.optim.AdamW(self.params, lr=optim.lr, weight_decay=optim.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, optim.lr_scheduler, optim.warmup_ratio,
                                        total_steps, optim.phases)
        self.wrapped = model
        self.ddp = ddp and D.world_size() > 1
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # only the adapter is synchronised: the frozen base is identical on every rank
            trainable = {id(p) for p in self.params}
            ignore = [n for n, p in model.named_parameters() if id(p) not in trainable]
            ignore += [n for n, _ in model.named_buffers()]
            DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
            self.wrapped = DDP(model, device_ids=[device.index] if device is not None and
                               device.type == "cuda" else None, broadcast_buffers=False,
                               find_unused_parameters=find_unused_parameters)

    # -- the step -----------------------------------------------------------------------------
    autocast_ok = True  # the loop may autocast the forward

    def forward(self, **inputs):
        return self.wrapped(**inputs)

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        """``loss`` of one micro-batch; gradients are averaged over accumulation and ranks."""
        scaled = loss / self.optim.grad_accum_steps
        if self.ddp and not boundary:
            with self.wrapped.no_sync():  # reduce once per optimizer step
                scaled.backward()
        else:
            scaled.backward()

    def step(self) -> None:
        if self.optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def last_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def close(self) -> None:
        """End of the stage: drop the wrapper (its hooks) so the next stage can wrap again."""
        self.wrapped = self.module

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {"engine": "torch", "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        if state["engine"] == "torch":
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            _load_full_state(self, state)
        _load_scheduler(self.scheduler, state["scheduler"])


def _load_scheduler(scheduler, state: Dict) -> None:
    """A scheduler's state_dict does not carry the learning rate it last set: put it back into
    the optimizer's groups (a torch optimizer's own state_dict has it, ZeRO's full state not)."""
    scheduler.load_state_dict(state)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


def _load_full_state(eng: Engine, state: Dict) -> None:
    """Load a ZeRO checkpoint's full per-parameter state into a torch AdamW."""
    step = state["step"]
    for n, p in eng.named:
        st = state["params"][n]
        p.data.copy_(st["fp32"].to(p.device, p.dtype))
        if step and "exp_avg" in st:
            eng.optimizer.state[p] = {"step": torch.tensor(float(step)),
                                      **{k: st[k].to(p.device) for k in MOMENTS}}


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO (stage 2 by default) around the same AdamW and schedule."""

    autocast_ok = False  # DeepSpeed's bf16 mode casts the module; fp32 runs need no autocast

    def __init__(self, model, named_params, optim: Optim, total_steps: int, *, ds_config: Dict,
                 config_path: Optional[Path] = None):
        """Args: as :class:`Engine`, plus ``ds_config`` (:func:`deepspeed_config`), written to
        ``config_path`` by rank 0."""
        import deepspeed

        super().__init__(model, named_params, optim, total_steps)  # AdamW + schedule, no wrapper
        self.ds_config = ds_config
        if config_path is not None and D.rank() == 0:
            config_path.write_text(json.dumps(self.ds_config, indent=2))
        # ZeRO takes over the AdamW (its param_groups, which the schedule drives, are kept)
        self.wrapped, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=self.ds_config)

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        self.wrapped.set_gradient_accumulation_boundary(boundary)
        self.wrapped.backward(loss)  # scales by 1 / gradient_accumulation_steps itself

    def step(self) -> None:
        self.wrapped.step()  # clipping, AdamW on the fp32 partitions, all-gather, zero grads
        self.scheduler.step()

    def close(self) -> None:
        """Remove ZeRO's gradient hooks from the parameters: the next stage wraps the same
        module in a new engine, and stale hooks would reduce into this one's buffers."""
        self.wrapped.destroy()
        self.wrapped = self.module

    # -- full tensors of partitioned state ----------------------------------------------------
    def _moments_exist(self) -> bool:
        """ZeRO-1/2 link the partitioned Adam moments to the parameters lazily, at the first
        step; before it there are no moments to rewrite."""
        linked = getattr(self.optimizer, "_hp_optimizer_states_linked", None)
        if linked is None:  # an optimizer wrapper that links eagerly
            return bool(self.optimizer.optimizer.state)
        return bool(linked)

    def grad(self, p):
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(p)

    @torch.no_grad()
    def transform(self, p, fn, grad_fn=None, moment_fns=None) -> None:
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_full_grad,
            safe_get_full_optimizer_state,
            safe_set_full_fp32_param,
            safe_set_full_grad,
            safe_set_full_optimizer_state,
        )

        grad_fn = grad_fn or fn
        moment_fns = {k: (moment_fns or {}).get(k, fn) for k in MOMENTS}
        master = fn(safe_get_full_fp32_param(p))
        safe_set_full_fp32_param(p, master)
        p.data.copy_(master.to(p.dtype))  # the forward's copy follows the master at once
        g = safe_get_full_grad(p)
        if g is not None:
            safe_set_full_grad(p, grad_fn(g))
        if self._moments_exist():
            for k in MOMENTS:
                safe_set_full_optimizer_state(
                    p, moment_fns[k](safe_get_full_optimizer_state(p, k)), k)

    def permute(self, items) -> None:
        """ZeRO partitions the masters and moments: one full-tensor rewrite per parameter."""
        for p, dim, idx in items:
            self.transform(p, lambda t, dim=dim, idx=idx: t.index_select(dim, idx.to(t.device)))

    @torch.no_grad()
    def set_param(self, p, value) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(p, value.float())
        p.data.copy_(value.to(p.dtype))

    # -- checkpoints: full tensors, independent of the number of ranks ------------------------
    def full_state(self) -> Dict:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        out = {}
        for n, p in self.named:
            out[n] = {"fp32": safe_get_full_fp32_param(p).cpu().clone()}
            if self._moments_exist():
                for k in MOMENTS:
                    out[n][k] = safe_get_full_optimizer_state(p, k).cpu().clone()
        return out

    def _step_count(self) -> int:
        for st in self.optimizer.optimizer.state.values():
            if "step" in st:
                return int(st["step"])
        return 0

    def state_dict(self) -> Dict:
        return {"engine": "deepspeed", "params": self.full_state(), "step": self._step_count(),
                "scheduler": self.scheduler.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: Dict) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if state.get("engine") != "deepspeed":  # a one-process / DDP checkpoint
            state = {"params": _torch_full_state(self.named, state["optimizer"]),
                     "step": _torch_step(state["optimizer"]), "scheduler": state["scheduler"]}
        step = state["step"]
        if step and not self._moments_exist():
            self._create_moments()
        for n, p in self.named:
            st = state["params"][n]
            safe_set_full_fp32_param(p, st["fp32"].to(p.device))
            p.data.copy_(st["fp32"].to(p.device, p.dtype))
            if step and "exp_avg" in st:
                for k in MOMENTS:
                    safe_set_full_optimizer_state(p, st[k].to(p.device), k)
        for st in self.optimizer.optimizer.state.values() if step else []:
            if torch.is_tensor(st.get("step")):
                st["step"].fill_(step)
            elif "step" in st:
                st["step"] = step
        _load_scheduler(self.scheduler, state["scheduler"])

    def _create_moments(self) -> None:
        """AdamW creates its state lazily at the first step: take a zero step at lr 0 on the fp32
        partitions so the moments exist (then overwritten from the checkpoint)."""
        opt = self.optimizer
        inner = opt.optimizer
        lrs = [g["lr"] for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"] = 0.0
            for q in g["params"]:
                q.grad = torch.zeros_like(q)
        inner.step()
        for g, lr in zip(inner.param_groups, lrs):
            g["lr"] = lr
            for q in g["params"]:
                q.grad = None
        opt._lazy_init_hp_params_optimizer_state()


def _torch_full_state(named, opt_state: Dict) -> Dict:
    """A torch AdamW state_dict (params indexed in ``named`` order) as per-name full tensors.
    The weights are the parameters' current values: the runner has just loaded them from the
    same checkpoint (a torch checkpoint has no separate fp32 master copy)."""
    out = {}
    for i, (n, p) in enumerate(named):
        st = opt_state["state"].get(i, {})
        out[n] = {"fp32": p.detach().float().cpu(),
                  **{k: st[k] for k in MOMENTS if k in st}}
    return out


def _torch_step(opt_state: Dict) -> int:
    for st in opt_state["state"].values():
        return int(st["step"])
    return 0


def build_engine(model, name: str, optim: Optim, total_steps: int, *, device: torch.device,
                 find_unused_parameters: bool = False, ds_config: Optional[Dict] = None,
                 config_path: Optional[Path] = None) -> Engine:
    """The engine ``name`` (none | ddp | zero2) over the model's trainable parameters."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if name == "zero2":
        return DeepSpeedEngine(model, named, optim, total_steps, ds_config=ds_config,
                               config_path=config_path)
    return Engine(model, named, optim, total_steps, ddp=name == "ddp",
                  find_unused_parameters=find_unused_parameters, device=device)
