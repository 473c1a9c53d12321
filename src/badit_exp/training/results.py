"""The results of a run: ``scores.csv``, ``metrics.json``, plots and the LaTeX table.

:func:`write_results` turns the per-stage scores in ``progress.json`` into the score matrix and
the metrics of SPEC section 3 (:mod:`badit_exp.metrics`); ``forward`` needs the single-task
scores a_{t,0}, found by :func:`find_single_results`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

from badit_exp import dist as D
from badit_exp import metrics as M
from badit_exp import plotting, provenance
from badit_exp.config import Config, ConfigError
from badit_exp.evaluation.scoring import summary_score
from badit_exp.io_utils import atomic_write_json, atomic_write_text
from badit_exp.training.stages import Stage


def _summary(cfg: Config, task: str, scores: Dict[str, float]) -> float:
    d = cfg.data
    return summary_score(task, scores, d.summary_metric, d.exact_match_tasks)


def write_results(cfg: Config, resolved: Dict, stages: Sequence[Stage], progress: Dict,
                  run_dir: Path, variant: Dict) -> Dict:
    """Write scores.csv, metrics.json, plots and the LaTeX table into ``run_dir``.

    Args:
        cfg, resolved: the typed config and its resolved dict (recorded in metrics.json).
        stages: the run's stages (:func:`badit_exp.training.stages.plan_stages`).
        progress: ``progress.json`` of the finished run (scores of every stage).
        run_dir: where to write.
        variant: the method's ``describe()``.

    Returns:
        The metrics dict written to ``metrics.json``.
    """
    mode = cfg.training_mode.name
    res = progress["results"]
    stage_names = [s.name for s in stages]
    out: Dict = {"mode": mode, "run_name": cfg.run_name, "seed": cfg.seed,
                 "model": cfg.model.name, "method": cfg.method.name, "scale": cfg.scale.name,
                 "method_variant": variant,
                 "summary_metric": cfg.data.summary_metric, "match_key": match_key(cfg)}
    if mode == "single":
        tasks = list(cfg.data.tasks)
        out["tasks"] = tasks
        out["scores"] = {t: res[t][t] for t in tasks}
        out["single_scores"] = {t: _summary(cfg, t, res[t][t]) for t in tasks}
        out["rouge"] = sum(out["single_scores"].values()) / len(tasks)
        row = [out["single_scores"][t] for t in tasks]
        plotting.bar_scores(run_dir / "scores.png", tasks, row,
                            f"{cfg.model.name} / {cfg.method.name} / single")
        out["single_exact_match"] = {t: res[t][t]["exact_match"] for t in tasks}
    else:
        tasks = stages[0].eval_tasks  # the task order (columns)
        A = [[_summary(cfg, t, res[s][t]) for t in tasks] for s in stage_names]
        A_em = [[res[s][t]["exact_match"] for t in tasks] for s in stage_names]
        single, reason = find_single_results(cfg, tasks)
        out["tasks"] = tasks
        out["stages"] = stage_names
        out["scores"] = {t: res[stage_names[-1]][t] for t in tasks}
        out["matrix"] = {"summary": A, "rougeL": [[res[s][t]["rougeL"] for t in tasks]
                                                  for s in stage_names],
                         "exact_match": A_em}
        if all("loss" in res[s][t] for s in stage_names for t in tasks):
            # teacher-forced target loss per (row, task): loss-based Forget / Backward
            out["matrix"]["loss"] = [[res[s][t]["loss"] for t in tasks] for s in stage_names]
            out["matrix"]["loss_examples"] = [[res[s][t].get("loss_n") for t in tasks]
                                              for s in stage_names]
        out.update(M.compute_metrics(A, tasks, mode, single, reason))
        em_single = None
        if single is not None and "single_exact_match" in single:
            em_single = single["single_exact_match"]
        out["metrics_exact_match"] = M.compute_metrics(A_em, tasks, mode, em_single,
                                                       "no exact-match single results")
        if single is not None:
            out["single_results_source"] = single.get("_source")
        atomic_write_text(run_dir / "scores.csv", M.format_matrix_csv(stage_names, tasks, A))
        atomic_write_text(run_dir / "scores.tex", plotting.latex_matrix(stage_names, tasks, A))
        title = f"{cfg.model.name} / {cfg.method.name} / {mode}"
        if mode == "sequential":
            plotting.heatmap(run_dir / "scores_heatmap.png", stage_names, tasks, A, title)
        else:
            plotting.bar_scores(run_dir / "scores.png", tasks, A[-1], title)
    losses = [out["scores"][t].get("loss") for t in tasks]
    # mean over tasks of the teacher-forced target loss on the evaluated split (after the last
    # stage; in single mode each task's own run): a low-variance second metric
    out["eval_target_loss"] = (sum(losses) / len(losses) if losses and None not in losses
                               else None)
    out["eval_split"] = cfg.data.eval_split
    out["lr"] = cfg.trainer.lr
    out["timing"] = progress["timing"]
    out["target_loss"] = progress.get("target_loss")
    t = cfg.trainer
    out["parallel"] = {"engine": cfg.distributed.name, "world_size": D.world_size(),
                       "global_batch": t.per_device_batch_size * t.grad_accum_steps
                       * D.world_size()}
    out["provenance"] = provenance.collect()
    out["config"] = resolved
    atomic_write_json(run_dir / "metrics.json", _json_safe(out))
    return out


def match_key(cfg: Config) -> Dict:
    """What a single-task run must share with this run for ``forward`` to use it."""
    c = cfg
    return {"model": c.model.name, "method": c.method.name, "seed": c.seed,
            "root": str(Path(c.data.root).expanduser().resolve()),
            "max_train_per_task": c.data.max_train_per_task,
            "max_eval_per_task": c.data.max_eval_per_task, "max_seq_len": c.data.max_seq_len,
            "epochs": c.trainer.epochs, "summary_metric": c.data.summary_metric,
            "eval_split": c.data.eval_split, "holdout_per_task": c.data.holdout_per_task,
            "lr": c.trainer.lr}


def find_single_results(cfg: Config, tasks: List[str]):
    """({task: a_t0, ...}, reason-if-missing). Explicit file first, else the newest single
    run under ``paths.output_dir`` whose match key equals this run's."""
    explicit = cfg.training_mode.single_results
    if explicit:
        p = Path(explicit).expanduser()
        if not p.exists():
            raise ConfigError(f"training_mode.single_results={explicit!r} does not exist.")
        single = M.read_single(p)
        single["_source"] = str(p)
        if p.name == "metrics.json":
            em = json.loads(p.read_text()).get("single_exact_match")
            if em:
                single["single_exact_match"] = em
        return single, ""
    key = match_key(cfg)
    root = Path(cfg.paths.output_dir).expanduser()
    best = None
    for p in root.rglob("metrics.json") if root.exists() else []:
        try:
            m = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if m.get("mode") != "single" or m.get("match_key") != key:
            continue
        if not all(t in m.get("single_scores", {}) for t in tasks):
            continue
        if best is None or p.stat().st_mtime > best[0]:
            best = (p.stat().st_mtime, p, m)
    if best is None:
        return None, (f"no single-mode run with the same model, method, seed, data caps "
                      f"and epochs under {root}; run training_mode=single first or set "
                      "training_mode.single_results")
    single = dict(best[2]["single_scores"])
    single["_source"] = str(best[1])
    single["single_exact_match"] = best[2].get("single_exact_match")
    return single, ""


def _json_safe(obj):
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj
