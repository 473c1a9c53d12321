"""Fair comparison (SPEC section 9.1): the learning-rate ladder, the per-method choice with its
edge flag, the committed choices file, and the paired bootstrap.

Pure functions of plain data (a leaf module): :mod:`badit_exp.study` runs the tuning and the
study and writes the tables; ``conf/experiment/study2_cpu.yaml`` reads a choice through the
``badit_tuned_lr`` resolver (:func:`tuned_lr`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import yaml

from badit_exp.config import ConfigError


# ---------------------------------------------------------------------------- the ladder
def ladder_step(lr: float, direction: int) -> float:
    """The next rate on the 1-3-10 log ladder (factor 3 then 10/3) up (+1) or down (-1).

    ``1e-3 -> 3e-3 -> 1e-2`` up, ``1e-3 -> 3e-4 -> 1e-4`` down; a rate off the ladder moves by
    sqrt(10) (factor ~3.16)."""
    e = math.floor(math.log10(lr) + 1e-9)
    m = round(lr / 10 ** e, 6)
    # parsed from text, so a step lands on the decimal rate (3e-4, not 3 * 10 ** -4 =
    # 0.00030000000000000003, which the choices file printed)
    if m == 1.0:
        return float(f"3e{e}") if direction > 0 else float(f"3e{e - 1}")
    if m == 3.0:
        return float(f"1e{e + 1}") if direction > 0 else float(f"1e{e}")
    return lr * 10 ** (0.5 * direction)


def fmt_lr(lr: float) -> str:
    """``3e-4`` style, the way the tables and the choices file print a rate."""
    m, e = f"{lr:.0e}".split("e")
    return f"{m}e{int(e)}" if math.isclose(float(m) * 10 ** int(e), lr, rel_tol=1e-9) else f"{lr:.3g}"


# ---------------------------------------------------------------------------- the choice
@dataclass
class Choice:
    """The chosen rate of one (method, mode) and how it was chosen."""

    method: str
    mode: str
    lr: float
    score: float  # mean over tasks of the hold-out ROUGE-L at that rate (mean over seeds)
    grid: List[float]
    scores: List[float]  # at each grid point, same order
    edge: Optional[str]  # "low" | "high" when the best is at the grid's end, else None
    by_loss: Optional[float] = None  # the rate the hold-out target loss would pick

    @property
    def interior(self) -> bool:
        return self.edge is None


def choose(method: str, mode: str, points: Mapping[float, Sequence[float]],
           losses: Optional[Mapping[float, Sequence[float]]] = None) -> Choice:
    """Pick the rate with the best mean hold-out ROUGE-L.

    Args:
        points: {lr: [hold-out ROUGE-L of each seed's run]} (mean over tasks per run).
        losses: {lr: [hold-out target loss of each run]}, for the cheaper signal's agreement.
    Returns:
        The choice; ``edge`` is ``"low"`` / ``"high"`` when the best rate is the smallest /
        largest of the grid (extend the grid that way) and None when it is interior. A grid of
        one point is an edge both ways ("low" is reported). Ties go to the smaller rate.
    """
    if not points:
        raise ValueError(f"no tuning runs for {method} ({mode})")
    grid = sorted(points)
    scores = [float(np.mean(points[lr])) for lr in grid]
    best = max(range(len(grid)), key=lambda i: (scores[i], -grid[i]))
    edge = "low" if best == 0 else "high" if best == len(grid) - 1 else None
    by_loss = None
    if losses and all(lr in losses and len(losses[lr]) for lr in grid):
        by_loss = min(grid, key=lambda lr: float(np.mean(losses[lr])))
    return Choice(method, mode, grid[best], scores[best], grid, scores, edge, by_loss)


def next_rate(choice: Choice) -> Optional[float]:
    """The rate to add so the best can become interior (None when it already is)."""
    if choice.edge == "low":
        return ladder_step(choice.grid[0], -1)
    if choice.edge == "high":
        return ladder_step(choice.grid[-1], +1)
    return None


# ---------------------------------------------------------------------------- the file
def write_choices(path: str | Path, choices: Sequence[Choice], header: str = "") -> None:
    """``{mode: {method: {lr, holdout_rougeL, grid, interior, ...}}}`` as YAML (committed)."""
    out: Dict[str, Dict[str, Dict]] = {}
    for c in sorted(choices, key=lambda c: (c.mode, c.method)):
        out.setdefault(c.mode, {})[c.method] = {
            "lr": float(c.lr), "holdout_rougeL": round(c.score, 3),
            "interior": c.interior, **({"edge": c.edge} if c.edge else {}),
            "grid": [float(f"{x:.6g}") for x in c.grid], "holdout_rougeL_by_lr": [round(s, 3) for s in c.scores],
            "lr_by_target_loss": None if c.by_loss is None else float(c.by_loss)}
    text = yaml.safe_dump(out, sort_keys=False, default_flow_style=None, width=100)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(header + text)


def read_choices(path: str | Path) -> Dict[str, Dict[str, Dict]]:
    p = Path(path)
    if not p.is_file():
        return {}
    return yaml.safe_load(p.read_text()) or {}


def tuned_lr(path: str, method: str, mode: str, root: Optional[str] = None) -> float:
    """The committed choice of ``method`` in ``mode`` from the choices file ``path`` (relative
    paths are tried from the working directory, then from ``root``).

    Raises:
        ConfigError: no file, or no choice for that method and mode (names the fix).
    """
    p = Path(path)
    if not p.is_file() and root is not None and (Path(root) / path).is_file():
        p = Path(root) / path
    table = read_choices(p)
    entry = table.get(mode, {}).get(method)
    if entry is None:
        have = sorted(table.get(mode, {}))
        raise ConfigError(
            f"trainer.lr: no tuned learning rate for method={method} in training_mode={mode} "
            f"in {p} (tuned there: {have or 'none'}). Tune it first "
            f"(`make tune METHODS={method} MODE={mode}`) or set trainer.lr=<rate> explicitly.")
    return float(entry["lr"])


# ---------------------------------------------------------------------------- statistics
def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, weights: Optional[np.ndarray] = None,
                     n_resamples: int = 9999, confidence: float = 0.95,
                     seed: int = 0) -> Tuple[float, float, float]:
    """Mean of ``a - b`` and its paired bootstrap interval (``scipy.stats.bootstrap``,
    ``paired=True``, BCa; percentile where BCa is undefined).

    Args:
        a, b: the same units (test example x seed) scored by two methods, aligned.
        weights: one per unit (resampled with it); the statistic is then the weighted mean of
            ``a - b``. :func:`task_weights` makes it the tables' mean over tasks.
    Returns:
        (mean difference, low, high)
    """
    from scipy.stats import bootstrap

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"paired samples must be two aligned 1-d arrays, got {a.shape} and "
                         f"{b.shape}")
    w = np.ones_like(a) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != a.shape or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {a.shape} non-negative numbers, not all 0")
    d = a - b
    diff = float(np.sum(w * d) / np.sum(w))
    if np.ptp(d) <= 1e-9 * max(1.0, abs(diff)):  # no spread: the interval is the point
        return diff, diff, diff

    def stat(x, y, v, axis=-1):
        return np.sum(v * (x - y), axis=axis) / np.sum(v, axis=axis)

    for method in ("BCa", "percentile"):  # BCa is undefined on near-degenerate samples
        res = bootstrap((a, b, w), stat, paired=True, n_resamples=n_resamples,
                        confidence_level=confidence, method=method,
                        random_state=np.random.default_rng(seed), vectorized=True)
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if np.isfinite(lo) and np.isfinite(hi):
            break
    return diff, lo, hi


def task_weights(keys: Sequence[Tuple]) -> np.ndarray:
    """Per-unit weights ``1 / (units of the same (seed, task))`` for units keyed
    ``(seed, task, id)``: the weighted mean of per-example scores is then the mean over seeds
    of each run's mean over tasks, the number the tables state (tasks with fewer test
    examples count as much as the others)."""
    n: Dict[Tuple, int] = {}
    for k in keys:
        n[k[:2]] = n.get(k[:2], 0) + 1
    return np.array([1.0 / n[k[:2]] for k in keys])


def seed_verdict(low: float, high: float, per_seed: Sequence[float]) -> str:
    """SPEC 9.3 plus the house rule that a difference inside the spread over seeds is no
    difference: "measurably higher/lower" only when the interval excludes 0 and, with two or
    more seeds, every seed's difference has the interval's sign; on one seed the verdict says
    so (the spread over seeds is unknown)."""
    if not measurable(low, high):
        return "no measurable difference"
    sign = 1 if low > 0 else -1
    if len(per_seed) >= 2 and any(np.sign(x) != sign for x in per_seed):
        agree = sum(np.sign(x) == sign for x in per_seed)
        return (f"no measurable difference (interval excludes 0, but only {agree} of "
                f"{len(per_seed)} seeds agree)")
    word = "measurably higher" if sign > 0 else "measurably lower"
    if len(per_seed) == 1:
        return f"{word} on one seed (the spread over seeds is not known yet)"
    return word


def measurable(low: float, high: float) -> bool:
    """A difference counts only when its interval excludes 0 (SPEC section 9.3)."""
    return low > 0 or high < 0


def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample std; the std of a single value is unknown (None), not 0."""
    v = [float(x) for x in values]
    if not v:
        return float("nan"), None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def fmt_mean_std(values: Sequence[float], digits: int = 2) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {'?' if s is None else f'{s:.{digits}f}'}"


def align(units_a: Mapping[Tuple, float], units_b: Mapping[Tuple, float], *,
          keys: bool = False):
    """The values of the units (e.g. (seed, task, id)) both methods have, in one order (and
    those keys, with ``keys=True``)."""
    common = sorted(set(units_a) & set(units_b))
    out = (np.array([units_a[k] for k in common], dtype=float),
           np.array([units_b[k] for k in common], dtype=float))
    return (*out, common) if keys else out


def per_task_mean(units: Mapping[Tuple, float]) -> float:
    """ROUGE-L of a run the way the tables state it: mean over tasks of the task means."""
    by_task: Dict[str, List[float]] = {}
    for k, v in units.items():
        by_task.setdefault(k[-2], []).append(v)
    return float(np.mean([np.mean(v) for v in by_task.values()]))
