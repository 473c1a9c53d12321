"""Per-prediction scores (SPEC section 1), 0-100, best over all references.

* ``rougeL``: ROUGE-L F-measure of the ``rouge-score`` package with ``use_stemmer=True``.
* ``exact_match``: equality after lower-casing, removing punctuation, collapsing whitespace.
"""

from __future__ import annotations

import re
import string
from functools import lru_cache
from typing import Dict, Iterable, List, Sequence

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


@lru_cache(maxsize=1)
def _scorer():
    # imported on first use: rouge_score imports nltk, which imports scikit-learn (about 1 s),
    # a cost every command paid before it could even report a config error
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub("", text.lower()).split())


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure (0-100) against the best of ``references`` (``rouge_score``'s own
    multi-reference scoring)."""
    return 100.0 * _scorer().score_multi(list(references), prediction)["rougeL"].fmeasure


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100 if ``prediction`` equals a reference after :func:`normalize`, else 0."""
    p = normalize(prediction)
    return 100.0 * max(float(p == normalize(ref)) for ref in references)


def score_one(prediction: str, references: Sequence[str]) -> Dict[str, float]:
    """Both per-prediction scores of SPEC section 1.

    Args:
        prediction: the generated text.
        references: the task instance's reference outputs (at least one).

    Returns:
        ``{"rougeL": ..., "exact_match": ...}``, each 0-100.
    """
    return {"rougeL": rouge_l(prediction, references),
            "exact_match": exact_match(prediction, references)}


def aggregate(per_example: Iterable[Dict[str, float]]) -> Dict[str, float]:
    rows: List[Dict[str, float]] = list(per_example)
    if not rows:
        return {"rougeL": float("nan"), "exact_match": float("nan")}
    keys = ("rougeL", "exact_match") + (("loss",) if all("loss" in r for r in rows) else ())
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def summary_score(task: str, scores: Dict[str, float], summary_metric: str,
                  exact_match_tasks: Sequence[str]) -> float:
    """The per-task number that enters the matrix: rougeL, or exact match for the
    Table-4 mapping's tasks."""
    if summary_metric == "table4" and task in exact_match_tasks:
        return scores["exact_match"]
    return scores["rougeL"]
