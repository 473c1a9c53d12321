"""Continual-learning metrics of SPEC section 3, and ``python -m badit_exp.metrics``.

A is the T x T score matrix (0-100): ``A[i][j]`` = score on task j after training through
task i (rows = training stages, columns = tasks, both in training order). ``single[t]`` is
a_{t,0}, the score of task t trained alone. Indices below are 0-based; SPEC writes them 1-based.

Matrix CSV format (what runs write as ``scores.csv``)::

    stage,<task_1>,...,<task_T>
    <task_1>,a_11,...,a_1T
    ...

The single-task file is JSON (``{task: score}``, or a single run's ``metrics.json``) or a CSV
with a header ``task,score``.

CLI: ``python -m badit_exp.metrics --matrix scores.csv [--single single.json] [--mode sequential]``
prints the metrics as JSON.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

Matrix = List[List[float]]

# every metric :func:`compute_metrics` can return, in the order tables show them (the one list:
# the runner's log, the CLI table, the report and the tests read it from here)
METRIC_NAMES = ("rouge", "forward", "forget_rate", "backward", "forget_rate_textbook",
                "backward_textbook")
SEQUENTIAL_ONLY = METRIC_NAMES[2:]


def rouge(A: Matrix) -> float:
    """Mean of the last row: (1/T) sum_j a_{T,j}."""
    return sum(A[-1]) / len(A[-1])


def forward(A: Matrix, single: Sequence[float], mode: str = "sequential") -> float:
    """sequential: (1/T) sum_t (a_{t,t} - a_{t,0}); mixed: (1/T) sum_t (a_{T,t} - a_{t,0})."""
    T = len(single)
    if mode == "mixed":
        return sum(A[-1][t] - single[t] for t in range(T)) / T
    return sum(A[t][t] - single[t] for t in range(T)) / T


def forget_terms(A: Matrix) -> List[float]:
    """Task t's share of ``forget_rate``, t < T: max over ALL rows i<T of a_{i,t} - a_{T,t}."""
    T = len(A)
    return [max(A[i][t] for i in range(T - 1)) - A[T - 1][t] for t in range(T - 1)]


def backward_terms(A: Matrix) -> List[float]:
    """Task t's share of ``backward``, t <= T: a_{T,t} - a_{t,t} (the last term is zero)."""
    T = len(A)
    return [A[T - 1][t] - A[t][t] for t in range(T)]


def loss_forget_terms(L: Matrix) -> List[float]:
    """Task t's share of the loss-based Forget, t < T, from the teacher-forced target-loss
    matrix L (nats per target token; a forgotten task's loss rises): l_{T,t} - min over ALL rows
    i < T of l_{i,t}, ``forget_terms`` with the loss's sign (higher = more forgetting)."""
    T = len(L)
    return [L[T - 1][t] - min(L[i][t] for i in range(T - 1)) for t in range(T - 1)]


def loss_backward_terms(L: Matrix) -> List[float]:
    """Task t's share of the loss-based Backward, t <= T: l_{t,t} - l_{T,t} (higher = the
    final model fits task t better than right after it was trained; the last term is zero)."""
    T = len(L)
    return [L[t][t] - L[T - 1][t] for t in range(T)]


def forget_rate(A: Matrix) -> float:
    """(1/(T-1)) sum_{t<T} (max over ALL rows i<T of a_{i,t}  -  a_{T,t}): the mean of
    :func:`forget_terms`."""
    return sum(forget_terms(A)) / (len(A) - 1)


def backward(A: Matrix) -> float:
    """(1/T) sum_{t<=T} (a_{T,t} - a_{t,t}); the t = T term is zero, the divisor is T: the mean
    of :func:`backward_terms`."""
    return sum(backward_terms(A)) / len(A)


def forget_rate_textbook(A: Matrix) -> float:
    """(1/(T-1)) sum_{t<T} (a_{t,t} - a_{T,t})."""
    T = len(A)
    return sum(A[t][t] - A[T - 1][t] for t in range(T - 1)) / (T - 1)


def backward_textbook(A: Matrix) -> float:
    """(1/(T-1)) sum_{t<T} (a_{T,t} - a_{t,t})."""
    T = len(A)
    return sum(A[T - 1][t] - A[t][t] for t in range(T - 1)) / (T - 1)


def compute_metrics(A: Matrix, tasks: Sequence[str], mode: str,
                    single: Optional[Dict[str, float]] = None,
                    single_missing_reason: str = "no single-task results were found") -> Dict:
    """Every metric of SPEC section 3 that ``mode`` defines.

    Args:
        A: the score matrix (rows = stages, columns = ``tasks``, 0-100).
        tasks: the column tasks, in training order.
        mode: ``sequential`` (T x T matrix) or ``mixed`` (one row).
        single: {task: a_{t,0}}, the single-task scores ``forward`` needs (None: missing).
        single_missing_reason: recorded as ``forward_missing_reason`` when they are missing.

    Returns:
        {name: value} for the names of :data:`METRIC_NAMES` that ``mode`` defines; ``forward``
        is None with a reason when the single-task scores are missing (never 0).
    """
    out: Dict = {"rouge": rouge(A)}
    missing = [t for t in tasks if not single or t not in single]
    if missing:
        out["forward"] = None
        out["forward_missing_reason"] = (single_missing_reason if not single else
                                         f"single-task results lack {missing}")
    else:
        out["forward"] = forward(A, [single[t] for t in tasks], mode)
    if mode == "sequential":
        square = len(A) == len(tasks) and all(len(r) == len(tasks) for r in A)
        if not square:
            raise ValueError(f"sequential metrics need a T x T matrix; got {len(A)} rows for "
                             f"{len(tasks)} tasks")
        fns = {"forget_rate": forget_rate, "backward": backward,
               "forget_rate_textbook": forget_rate_textbook, "backward_textbook": backward_textbook}
        out.update({k: fns[k](A) if len(tasks) > 1 else None for k in SEQUENTIAL_ONLY})
    return out


# -- files ----------------------------------------------------------------------------------

def format_matrix_csv(stages: Sequence[str], tasks: Sequence[str], A: Matrix) -> str:
    """The matrix CSV text (see the module docstring)."""
    rows = [["stage", *tasks]] + [[s, *[f"{v:.4f}" for v in r]] for s, r in zip(stages, A)]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def read_matrix_csv(path: str | Path) -> Tuple[List[str], List[str], Matrix]:
    """(stages, tasks, A) from a matrix CSV; a clear error for a malformed file."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if not rows or rows[0][0] != "stage":
        raise ValueError(f"{path}: first row must be 'stage,<task_1>,...'")
    tasks = rows[0][1:]
    stages, A = [], []
    for k, r in enumerate(rows[1:], start=2):
        if len(r) != len(tasks) + 1:
            raise ValueError(f"{path}: row {k} has {len(r) - 1} values for {len(tasks)} tasks")
        try:
            vals = [float(v) for v in r[1:]]
        except ValueError:
            raise ValueError(f"{path}: row {k} holds a non-number: {r[1:]}") from None
        stages.append(r[0])
        A.append(vals)
    if not A:
        raise ValueError(f"{path}: no stage rows")
    return stages, tasks, A


def read_single(path: str | Path) -> Dict[str, float]:
    """{task: a_{t,0}} from JSON ({task: score} or a single run's metrics.json) or CSV."""
    path = Path(path)
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r]
        start = 1 if rows and rows[0][:2] == ["task", "score"] else 0
        return {r[0]: float(r[1]) for r in rows[start:]}
    data = json.loads(path.read_text())
    if "single_scores" in data:
        return {k: float(v) for k, v in data["single_scores"].items()}
    return {k: float(v) for k, v in data.items()}


def _clean(obj):
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    return obj


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m badit_exp.metrics", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matrix", required=True, help="score matrix CSV (scores.csv)")
    p.add_argument("--single", help="single-task scores: JSON {task: score} or CSV task,score")
    p.add_argument("--mode", choices=["sequential", "mixed"], default=None,
                   help="default: sequential for a square matrix with >1 row, else mixed")
    a = p.parse_args(argv)
    try:
        stages, tasks, A = read_matrix_csv(a.matrix)
        single = read_single(a.single) if a.single else None
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mode = a.mode or ("sequential" if len(A) == len(tasks) and len(A) > 1 else "mixed")
    reason = "no --single file given"
    res = compute_metrics(A, tasks, mode, single, single_missing_reason=reason)
    print(json.dumps(_clean({"mode": mode, "tasks": tasks, **res}), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
