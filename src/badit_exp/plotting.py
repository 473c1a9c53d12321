"""Figures written into run directories (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _short(task: str) -> str:
    return task.split("_")[0]


def bar_scores(path: Path, tasks: Sequence[str], scores: Sequence[float], title: str) -> None:
    """Per-task score bars with the mean as a dashed line."""
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(tasks) + 2), 4))
    ax.bar(range(len(tasks)), scores, color="#4C72B0")
    mean = sum(scores) / len(scores)
    ax.axhline(mean, ls="--", c="k", lw=1, label=f"mean {mean:.2f}")
    ax.set_xticks(range(len(tasks)), [_short(t) for t in tasks], rotation=60, ha="right")
    ax.set_ylabel("score (0-100)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def heatmap(path: Path, stages: Sequence[str], tasks: Sequence[str], A, title: str) -> None:
    """Stages x tasks matrix with the value written in each cell."""
    n, m = len(stages), len(tasks)
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * m + 2), max(4, 0.45 * n + 1.5)))
    im = ax.imshow(A, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i in range(n):
        for j in range(m):
            v = A[i][j]
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 60 else "black")
    ax.set_xticks(range(m), [_short(t) for t in tasks], rotation=60, ha="right")
    ax.set_yticks(range(n), [_short(s) for s in stages])
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training stage")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latex_matrix(stages: Sequence[str], tasks: Sequence[str], A) -> str:
    """A LaTeX tabular of the matrix (booktabs)."""
    head = " & ".join(["stage"] + [_short(t).replace("_", r"\_") for t in tasks])
    lines = [r"\begin{tabular}{l" + "r" * len(tasks) + "}", r"\toprule", head + r" \\",
             r"\midrule"]
    for s, row in zip(stages, A):
        lines.append(" & ".join([_short(s).replace("_", r"\_")] + [f"{v:.1f}" for v in row])
                     + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
