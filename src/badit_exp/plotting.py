"""Figures written into run directories (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


class _Pyplot:
    """``matplotlib.pyplot`` on the Agg backend, imported at the first figure: every command
    imports this module, and matplotlib costs about half a second that a config error, a
    ``--help`` or a status table should not pay."""

    def __getattr__(self, name: str):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot

        return getattr(pyplot, name)


plt = _Pyplot()


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    _save(fig, path)


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
    _save(fig, path)


def agreement(path: Path, methods: Sequence[str], A, title: str) -> None:
    """Method x method matrix of agreement percentages (NaN: no shared seed), value in each
    cell; the diagonal (a method against itself over seeds) framed."""
    n = len(methods)
    A = np.asarray(A, dtype=float)
    fig, ax = plt.subplots(figsize=(max(5, 0.55 * n + 2.5), max(4, 0.5 * n + 1.5)))
    im = ax.imshow(np.ma.masked_invalid(A), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i in range(n):
        for j in range(n):
            if np.isfinite(A[i, j]):
                ax.text(j, i, f"{A[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if A[i, j] < 60 else "black")
        ax.add_patch(plt.Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, lw=1.5, ec="red"))
    ax.set_xticks(range(n), list(methods), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), list(methods), fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, label="% identical predictions")
    _save(fig, path)


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


def dog_angles(log_path: Path, path: Path) -> None:
    """Mean intra- and inter-expert gradient angles at each DOG regroup (the paper's Fig. 4)."""
    rows = [json.loads(l) for l in Path(log_path).read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "mean_intra_angle_after" in r]
    if not rows:
        return
    x = list(range(1, len(rows) + 1))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for kind, marker, color in (("inter", "o", "#C44E52"), ("intra", "s", "#4C72B0")):
        for when, ls, alpha in (("before", "--", 0.5), ("after", "-", 1.0)):
            ax.plot(x, [r[f"mean_{kind}_angle_{when}"] for r in rows], marker + ls, c=color,
                    alpha=alpha, label=f"{kind}-expert, {when}")
    ax.axhline(90, c="grey", lw=0.8, ls=":")
    ax.set_xlabel("regroup")
    ax.set_ylabel("mean gradient angle (deg)")
    ax.set_ylim(0, 180)
    ax.legend(fontsize=7)
    _save(fig, path)


def router_usage(path: Path, tasks: Sequence[str], weights, top_k: int, title: str) -> None:
    """Tasks x experts mean router weight, each task's top-k experts outlined (Fig. 13)."""
    W = np.asarray(weights, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * W.shape[1] + 2), max(3, 0.35 * len(tasks) + 1.5)))
    im = ax.imshow(W, cmap="magma", aspect="auto")
    for i in range(W.shape[0]):
        for j in np.argsort(-W[i])[:top_k]:
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="cyan", lw=1.2))
    ax.set_yticks(range(len(tasks)), [_short(t) for t in tasks])
    ax.set_xticks(range(W.shape[1]))
    ax.set_xlabel("expert")
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.04)
    _save(fig, path)


def gate_table(path: Path, tasks: Sequence[str], values, title: str) -> None:
    """Evaluated tasks x branches gate values (GainLoRA), values in the cells."""
    W = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * W.shape[1] + 2), max(3, 0.4 * len(tasks) + 1.5)))
    im = ax.imshow(W, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            ax.text(j, i, f"{W[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if W[i, j] < 0.6 else "black")
    ax.set_yticks(range(len(tasks)), [_short(t) for t in tasks])
    ax.set_xticks(range(W.shape[1]), [f"branch {j + 1}" for j in range(W.shape[1])], rotation=45)
    ax.set_ylabel("evaluated task")
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.04)
    _save(fig, path)


def lr_curves(path: Path, curves, title: str, ylabel: str = "hold-out ROUGE-L") -> None:
    """One line per method: score against learning rate (log x), the chosen rate circled.

    Args:
        curves: {method: (rates, scores, chosen rate)}.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (method, (rates, scores, chosen)) in enumerate(sorted(curves.items())):
        color = plt.cm.tab10(i % 10)
        ax.plot(rates, scores, marker="o", color=color, label=method)
        if chosen in rates:
            j = list(rates).index(chosen)
            ax.scatter([rates[j]], [scores[j]], s=180, facecolors="none", edgecolors=color,
                       linewidths=2)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (peak, cosine schedule)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def frontier(path: Path, curves, title: str, xlabel: str) -> None:
    """Plasticity against forgetting: one line per method through its rates (x = Forget,
    y = final score), each point labelled with its rate, the chosen rate circled.

    Args:
        curves: {method: [(forget, score, rate label, chosen), ...]} sorted by rate.
    """
    fig, ax = plt.subplots(figsize=(7, 4.8))
    # a diverged rate far right would squeeze every other point into a corner: points beyond
    # twice the 90th percentile of Forget are drawn at that edge as ">", their value in the label
    every = [p[0] for pts in curves.values() for p in pts]
    cut = 2 * float(np.percentile(every, 90)) if every else 0.0
    cut = cut if cut > 0 and max(every) > cut else float("inf")
    for i, (method, pts) in enumerate(curves.items()):
        color = plt.cm.tab10(i % 10)
        xs, ys = [min(p[0], cut) for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker="o", color=color, label=method,
                linewidth=2.5 if method == "lora_r32" else 1.5)
        for (x0, y, lab, chosen), x in zip(pts, xs):
            if x0 > cut:
                ax.scatter([x], [y], marker=">", s=80, color=color, zorder=3)
                lab = f"{lab} (Forget {x0:.3g}, off the axis)"
            ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=color, ha="right" if x0 > cut else "left")
            if chosen:
                ax.scatter([x], [y], s=160, facecolors="none", edgecolors=color, linewidths=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final hold-out ROUGE-L")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def study_points(path: Path, rows, panels, title: str,
                 families: Optional[Sequence[str]] = None) -> None:
    """Left: each method's ROUGE-L per seed (dots) and mean ± std (bar), its rate in the label.
    Then one panel per paired comparison: each method's difference to the baseline with its 95%
    interval (green: measurably better than the baseline, red: measurably worse, grey: neither,
    by the table's verdict).

    Args:
        rows: [(method, lr label, per-seed scores)] in display order.
        panels: [(x label, {method: ((diff, low, high), verdict)}, +1 if higher is better
            else -1)], e.g. ROUGE-L, Forget and Backward differences to one baseline; a verdict
            "measurably higher/lower" colours the point. A list of such lists draws one line
            of panels per baseline (the seeds panel repeated at the left of each).
        families: each row's family (rows grouped by it): a dashed line separates two
            families in every panel and the family's name heads its group in the seeds panel.
    """
    lines = panels if panels and isinstance(panels[0], list) else [panels]
    ncol = 1 + max(len(p) for p in lines)
    fig, axes = plt.subplots(len(lines), ncol, figsize=(5.5 + 4.5 * (ncol - 1),
                                                        (0.5 * len(rows) + 1.8) * len(lines)),
                             sharey=True, squeeze=False)
    ys = np.arange(len(rows))[::-1]
    for line, row_axes in zip(lines, axes):
        ax, bxs = row_axes[0], row_axes[1:]
        for y, (method, _lr, vals) in zip(ys, rows):
            v = np.asarray(vals, dtype=float)
            ax.scatter(v, np.full(len(v), y), color="tab:blue", alpha=0.7, zorder=3)
            sd = v.std(ddof=1) if len(v) > 1 else 0.0
            ax.errorbar([v.mean()], [y], xerr=[sd], fmt="|", color="black", markersize=14,
                        capsize=4, zorder=4)
            for bx, (_label, pairs, sign) in zip(bxs, line):
                if method in pairs:
                    (d, lo, hi), verdict = pairs[method]
                    up = {"measurably higher": 1, "measurably lower": -1}.get(verdict, 0)
                    color = ("tab:gray" if up == 0 else "tab:green" if up == sign
                             else "tab:red")
                    bx.errorbar([d], [y], xerr=[[d - lo], [hi - d]], fmt="o", color=color,
                                capsize=4)
        ax.set_yticks(ys)
        ax.set_yticklabels([f"{m} ({lr})" for m, lr, _ in rows])
        ax.set_xlabel("test ROUGE-L (dots: seeds; bar: mean ± std)")
        ax.grid(True, axis="x", alpha=0.3)
        for bx, (label, _pairs, _sign) in zip(bxs, line):
            bx.axvline(0, color="black", lw=1)
            bx.set_xlabel(label)
            bx.grid(True, axis="x", alpha=0.3)
        for bx in bxs[len(line):]:
            bx.set_visible(False)
        if families:
            for i, fam in enumerate(families):
                if i == 0 or fam != families[i - 1]:
                    if i:
                        for a in row_axes:
                            a.axhline(ys[i] + 0.5, color="tab:gray", ls="--", lw=0.8)
                    ax.annotate(fam, (0.01, ys[i] + 0.45), xycoords=("axes fraction", "data"),
                                fontsize=8, color="tab:gray", va="top")
    fig.suptitle(title)
    _save(fig, path)
