"""The paper's evidence that tasks share parameters (Figs. 1, 2, 5-10, 13), on any model.

Pure, streaming building blocks (tested on hand-built modules) used by
``python -m badit_exp.analyze``:

* neurons: per task, the mean over examples of act(W_gate x) (each example averaged over its
  non-padding tokens, prompt and target) at chosen layers; a neuron is activated for a task
  when |mean| > epsilon.
* fisher: per task, the diagonal empirical Fisher mean_examples (dL/dw)^2 of chosen weight
  matrices (one example per backward pass, accumulated, never stored) and the mean gradient
  (for the sign analysis); activated = top fraction of a task's values per matrix, or above a
  threshold.
* experts: mean router weight per task of a trained mixture model, top-k marked.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from badit_exp.data.prompts import collate_train


def default_layers(num_layers: int) -> List[int]:
    """A low, a middle and a high layer (the paper's appendix picks)."""
    return sorted({0, num_layers // 2, num_layers - 1})


def resolve_layers(layers: Optional[Sequence[int]], num_layers: int) -> List[int]:
    if not layers:
        return default_layers(num_layers)
    out = [l if l >= 0 else num_layers + l for l in layers]
    bad = [l for l in out if not 0 <= l < num_layers]
    if bad:
        raise ValueError(f"analysis.layers={list(layers)}: the model has {num_layers} layers.")
    return out


# ------------------------------------------------------------------------------- neurons
class GateActivations:
    """Streaming per-example means of act(gate_proj(x)) for several MLPs.

    Args:
        mlps: {name: module with ``gate_proj`` and ``act_fn``} (HF Llama/Qwen/Gemma MLPs).
    """

    def __init__(self, mlps: Dict[str, torch.nn.Module]):
        self.mlps = mlps
        self.sums = {n: None for n in mlps}
        self.count = 0
        self.mask: Optional[torch.Tensor] = None
        self._hooks = [m.gate_proj.register_forward_hook(self._hook(n, m)) for n, m in mlps.items()]

    def _hook(self, name, mlp):
        def fn(module, inputs, output):
            a = mlp.act_fn(output).detach().double()  # (b, t, N)
            m = self.mask if self.mask is not None else torch.ones(a.shape[:2], device=a.device)
            m = m.to(a.dtype).unsqueeze(-1)
            per_example = (a * m).sum(1) / m.sum(1).clamp_min(1)  # (b, N)
            s = per_example.sum(0).cpu()
            self.sums[name] = s if self.sums[name] is None else self.sums[name] + s
        return fn

    def set_batch(self, attention_mask: torch.Tensor) -> None:
        self.mask = attention_mask
        self.count += int(attention_mask.shape[0])

    def means(self) -> Dict[str, np.ndarray]:
        return {n: (s / max(self.count, 1)).numpy() for n, s in self.sums.items()}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def activation_mask(means: np.ndarray, epsilon: float) -> np.ndarray:
    """(tasks, neurons) bool: |mean activation| > epsilon."""
    return np.abs(means) > epsilon


def sharing_counts(mask: np.ndarray) -> np.ndarray:
    """counts[k-1] = number of units activated by exactly k tasks, k = 1..T."""
    per_unit = mask.sum(0)
    T = mask.shape[0]
    return np.array([(per_unit == k).sum() for k in range(1, T + 1)], dtype=np.int64)


# ------------------------------------------------------------------------------- fisher
class FisherAccumulator:
    """Streaming sums of grad^2 and grad over examples (call :meth:`update` after each
    single-example backward)."""

    def __init__(self, params: Dict[str, torch.nn.Parameter]):
        self.params = params
        self.sq = {n: torch.zeros_like(p, dtype=torch.float64, device="cpu") for n, p in params.items()}
        self.lin = {n: torch.zeros_like(p, dtype=torch.float64, device="cpu") for n, p in params.items()}
        self.n = 0

    def update(self) -> None:
        for name, p in self.params.items():
            g = p.grad.detach().double().cpu() if p.grad is not None else torch.zeros_like(self.sq[name])
            self.sq[name] += g * g
            self.lin[name] += g
        self.n += 1

    def fisher(self) -> Dict[str, np.ndarray]:
        return {n: (v / max(self.n, 1)).numpy() for n, v in self.sq.items()}

    def mean_grad(self) -> Dict[str, np.ndarray]:
        return {n: (v / max(self.n, 1)).numpy() for n, v in self.lin.items()}


def fisher_mask(F: np.ndarray, top_fraction: Optional[float], threshold: Optional[float]) -> np.ndarray:
    """Activated parameters of one matrix for one task: top ``top_fraction`` of its values
    (ties included), or values above ``threshold`` when that is given."""
    if threshold is not None:
        return F > threshold
    k = max(1, int(round(top_fraction * F.size)))
    cut = np.partition(F.ravel(), F.size - k)[F.size - k]
    return F >= cut


def sign_counts(mean_grads: np.ndarray) -> Dict[str, np.ndarray]:
    """mean_grads: (tasks, rows, cols). Per parameter, how many tasks push it up / down;
    summarised per row (mean over the row's parameters) and the fraction of parameters on
    which tasks disagree in sign."""
    pos = (mean_grads > 0).sum(0)
    neg = (mean_grads < 0).sum(0)
    return {"positive_per_row": pos.mean(1), "negative_per_row": neg.mean(1),
            "conflict_fraction_per_row": ((pos > 0) & (neg > 0)).mean(1)}


def iterate_examples(examples: Iterable[Dict], pad_id: int, batch_size: int):
    ex = list(examples)
    for i in range(0, len(ex), batch_size):
        yield collate_train(ex[i: i + batch_size], pad_id)
