"""What a method may do to the parameters it trains, whatever engine runs the optimisation.

The training engines (:mod:`badit_exp.training.engine`: one process, DDP, DeepSpeed ZeRO-2)
implement this protocol; a method's training hooks receive one and use only it:

* ``grad(p)``: the full gradient of parameter ``p``, reduced over all processes.
* ``transform(p, fn, grad_fn=None, moment_fns=None)`` / ``set_param(p, value)``: rewrite a
  parameter *and everything the optimizer holds for it* (pending gradient, fp32 master copy,
  the Adam moments named in :data:`MOMENTS`).
* ``permute([(p, dim, index), ...])``: the batched form of ``transform`` for index selections.

It lives here, beside the methods, so that a method imports nothing from ``training/``: the
engines depend on this protocol, never the reverse. :class:`OptimizerAccess` is the protocol
over a plain torch optimizer (or none, in tests); :func:`as_access` wraps one.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]
MOMENTS = ("exp_avg", "exp_avg_sq")  # the AdamW state a rewrite must follow


class OptimizerAccess:
    """``grad`` / ``transform`` / ``set_param`` over a plain torch optimizer (or none): what a
    method needs to rewrite a parameter together with its optimizer state."""

    def __init__(self, optimizer: Optional[torch.optim.Optimizer] = None):
        self.optimizer = optimizer

    def grad(self, p: torch.nn.Parameter) -> Optional[torch.Tensor]:
        return p.grad

    @torch.no_grad()
    def transform(self, p: torch.nn.Parameter, fn: Fn, grad_fn: Optional[Fn] = None,
                  moment_fns: Optional[Dict[str, Fn]] = None) -> None:
        """p <- fn(p); pending grad <- grad_fn(grad); Adam moment k <- moment_fns[k](moment).
        ``grad_fn`` and every missing moment function default to ``fn`` (a permutation)."""
        grad_fn = grad_fn or fn
        moment_fns = {k: (moment_fns or {}).get(k, fn) for k in MOMENTS}
        p.data.copy_(fn(p.data))
        if p.grad is not None:
            p.grad.copy_(grad_fn(p.grad))
        state = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
        for k in MOMENTS:
            if k in state:
                state[k].copy_(moment_fns[k](state[k]))

    @torch.no_grad()
    def permute(self, items: List[Tuple[torch.nn.Parameter, int, torch.Tensor]]) -> None:
        """For each (p, dim, index): p, its pending grad and Adam moments <- index_select(dim,
        index), all in one batched copy (a DOG regroup moves 2 tensors x 4 states per layer;
        one launch per tensor would dominate its cost on a GPU)."""
        dst, src = [], []
        for p, dim, idx in items:
            state = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
            for t in (p.data, p.grad, *[state.get(k) for k in MOMENTS]):
                if t is not None:
                    dst.append(t)
                    src.append(t.index_select(dim, idx))
        copy_all(dst, src)

    @torch.no_grad()
    def set_param(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        p.data.copy_(value)


def copy_all(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
    """dst[i] <- src[i] for all i, in one batched (multi-tensor) copy."""
    if dst:
        torch._foreach_copy_(dst, src)


def as_access(obj) -> OptimizerAccess:
    """An engine passes through; a torch optimizer (or None, e.g. in tests) is wrapped."""
    return obj if isinstance(obj, OptimizerAccess) else OptimizerAccess(obj)
