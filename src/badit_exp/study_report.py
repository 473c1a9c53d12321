"""A study's files and tables: what a finished run leaves in ``<results_dir>/runs/<id>/``, and
the tables built from those files alone (``python -m badit_exp.study report``).

Per run: ``metrics.json`` (the run's own, with its config and provenance), ``examples.jsonl``
(one row per evaluated example of the final stage: task, id, rougeL, exact_match, teacher-forced
target loss, prediction) and, for matrices, ``scores.csv``. Tables:

- ``tune_<mode>.md`` / ``tune_<mode>.png``: hold-out ROUGE-L (and target loss) of every method at
  every rate, the choice, its edge flag, and how often the hold-out target loss picks the same
  rate;
- ``study_<mode>.md``: each method at its tuned rate: mean ± std over seeds with the per-seed
  values, test target loss, (sequential) Forget and Backward, and per pair against each baseline
  the ROUGE-L difference with a paired bootstrap 95% interval over (seed, test example);
- ``study.json``: the same numbers for scripts.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from badit_exp import metrics as M
from badit_exp import plotting
from badit_exp import tuning as T
from badit_exp.io_utils import atomic_write_json, atomic_write_text, write_jsonl

# ---------------------------------------------------------------------------- run files
# small per-method diagnostics kept with a run: GainLoRA's gate per (evaluated task, branch)
# after each stage, O-LoRA's subspace overlaps, a mixture's router statistics, and the logged
# training losses and rates (why a method learns less is read from these, issue 26)
DIAGNOSTICS = ("gate_table.json", "o_lora_overlap.json", "router_stats.json", "train_log.jsonl")


def collect(run_dir: Path, dest: Path) -> None:
    """Copy what the tables need from a finished run into ``dest``, with its small diagnostics
    (:data:`DIAGNOSTICS`) where the run wrote them (``metrics.json`` last: its presence marks
    the run as done)."""
    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    for f in sorted((run_dir / "predictions").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            rows.append({"task": f.stem, "id": r["id"], "rougeL": r["rougeL"],
                         "exact_match": r["exact_match"], "loss": r.get("loss"),
                         "prediction": r["prediction"]})
    write_jsonl(dest / "examples.jsonl", rows)
    # sequential: every earlier row's per-example scores (and losses beyond them), for
    # Forward on the same ids and the loss matrix's examples
    inter = []
    for d in sorted((run_dir / "predictions").glob("after_*")):
        row = int(d.name.split("_")[1])
        for f in sorted(d.glob("*.jsonl")):
            task = f.name.split(".")[0]
            for line in f.read_text().splitlines():
                r = json.loads(line)
                inter.append({"row": row, "task": task, "id": r["id"],
                              "rougeL": r.get("rougeL"), "loss": r.get("loss")})
    if inter:
        write_jsonl(dest / "rows.jsonl", inter)
    for name in ("scores.csv", *DIAGNOSTICS):
        if (run_dir / name).exists():
            shutil.copy(run_dir / name, dest / name)
    shutil.copy(run_dir / "metrics.json", dest / "metrics.json")


def load_runs(results_dir: Path) -> List[Dict]:
    """Every collected run's metrics plus ``units`` {(seed, task, id): rougeL}, ``loss_units``
    (same keys, target loss), ``predictions`` {(task, id): generated text}, ``split``
    (holdout | test) and ``lr``."""
    out = []
    for m in sorted((Path(results_dir) / "runs").glob("*/metrics.json")):
        met = json.loads(m.read_text())
        units, loss_units, preds = {}, {}, {}
        ex = m.parent / "examples.jsonl"
        for line in ex.read_text().splitlines() if ex.exists() else []:
            r = json.loads(line)
            key = (met["seed"], r["task"], r["id"])
            units[key] = r["rougeL"]
            preds[(r["task"], r["id"])] = r.get("prediction")
            if r.get("loss") is not None:
                loss_units[key] = r["loss"]
        met["units"], met["loss_units"] = units, loss_units
        met["predictions"] = preds
        met["forget_units"], met["backward_units"] = _cl_units(met)
        met["loss_forget_units"], met["loss_backward_units"] = _loss_cl_units(met)
        met["split"] = "holdout" if met.get("eval_split") == "holdout" else "test"
        # 6 significant digits: a run made before the ladder parsed its rates from text
        # trained at 3 * 10 ** -4 = 0.00030000000000000003, the same rate as 3e-4
        met["lr"] = float(f"{float(met.get('lr') or met['config']['trainer']['lr']):.6g}")
        out.append(met)
    singles = {(r["method"], r["lr"], r["seed"], r["split"]): r for r in out
               if r["mode"] == "single"}
    for r in out:
        if r["mode"] in ("mixed", "sequential"):
            s = singles.get((r["method"], r["lr"], r["seed"], r["split"]))
            r["forward_units"] = forward_units(r, s) if s else {}
            r["forward_source"] = s.get("run_name") if s else None
            r["single_rouge"] = s["rouge"] if s else None
        else:
            r["forward_units"] = {}
    return out


def diagonal_ids(met: Dict) -> Dict[str, List[str]]:
    """The example ids behind each task's a_{t,t} (mixed: a_{T,t}) of a run, in its
    ``examples.jsonl`` order: every final-row id, except that in sequential mode a_{t,t} of a task
    trained before the last comes from an intermediate row, which scored the first
    ``data.max_eval_per_task_intermediate`` of the same ids (the runner takes the first n in
    file order; the final row scores them all in that order)."""
    ids: Dict[str, List[str]] = {}
    for (_, task, i) in met["units"]:  # dicts keep examples.jsonl's order
        ids.setdefault(task, []).append(i)
    if met["mode"] != "sequential":
        return ids
    k = (met["config"].get("data") or {}).get("max_eval_per_task_intermediate")
    last = met["tasks"][-1] if met.get("stages") is None else met["stages"][-1]
    return {t: (v if t == last or not k else v[:k]) for t, v in ids.items()}


def forward_units(met: Dict, single: Dict) -> Dict[Tuple, float]:
    """A run's per-task shares of Forward (SPEC section 3), keyed ``(seed, task)``: a_{t,t}
    (mixed: a_{T,t}) minus the single-task run's score on the same example ids
    (:func:`diagonal_ids`); their mean over tasks is the run's ``forward``. In mixed mode both
    sides are means over the same test examples; in sequential mode a_{t,t} of a task trained
    before the last is its intermediate row's mean (over the first
    ``max_eval_per_task_intermediate`` ids), matched with the single run's mean over exactly those
    ids. A task the single run did not score on every one of those ids is left out."""
    sd = met["seed"]
    diag = diagonal_ids(met)
    A = (met.get("matrix") or {}).get("summary")
    cols = met.get("tasks") or []
    out = {}
    for t, ids in diag.items():
        su = [single["units"].get((single["seed"], t, i)) for i in ids]
        if not ids or any(x is None for x in su):
            continue
        if met["mode"] == "sequential" and A:
            j = cols.index(t)
            mine = A[j][j]  # the row right after t was trained (stage j trains task j)
        else:
            mine = float(np.mean([met["units"][(sd, t, i)] for i in ids]))
        out[(sd, t)] = mine - float(np.mean(su))
    return out


def _cl_units(met: Dict) -> Tuple[Dict, Dict]:
    """A sequential run's per-task shares of Forget and Backward, keyed ``(seed, task)``
    (``metrics.forget_terms`` / ``backward_terms`` of its summary-metric matrix, ROUGE-L here;
    their means are the run's ``forget_rate`` and ``backward``); empty for other runs."""
    A = (met.get("matrix") or {}).get("summary")
    if met.get("mode") != "sequential" or not A or len(A) < 2:
        return {}, {}
    tasks = met["tasks"]
    fg = {(met["seed"], tasks[t]): v for t, v in enumerate(M.forget_terms(A))}
    bw = {(met["seed"], tasks[t]): v for t, v in enumerate(M.backward_terms(A))}
    return fg, bw


def _loss_cl_units(met: Dict) -> Tuple[Dict, Dict]:
    """The loss-matrix counterparts of :func:`_cl_units` (``metrics.loss_forget_terms`` /
    ``loss_backward_terms``); empty for runs without a loss matrix (older runs)."""
    L = (met.get("matrix") or {}).get("loss")
    if met.get("mode") != "sequential" or not L or len(L) < 2:
        return {}, {}
    tasks = met["tasks"]
    fg = {(met["seed"], tasks[t]): v for t, v in enumerate(M.loss_forget_terms(L))}
    bw = {(met["seed"], tasks[t]): v for t, v in enumerate(M.loss_backward_terms(L))}
    return fg, bw


def choices_from(runs: Sequence[Dict], mode: str) -> Dict[str, T.Choice]:
    """Each method's choice among its hold-out runs in ``mode``."""
    pts: Dict[str, Dict[float, List[float]]] = {}
    losses: Dict[str, Dict[float, List[float]]] = {}
    for r in runs:
        if r["split"] != "holdout" or r["mode"] != mode:
            continue
        pts.setdefault(r["method"], {}).setdefault(r["lr"], []).append(r["rouge"])
        if r.get("eval_target_loss") is not None:
            losses.setdefault(r["method"], {}).setdefault(r["lr"], []).append(
                r["eval_target_loss"])
    return {m: T.choose(m, mode, p, losses.get(m)) for m, p in pts.items()}


# ---------------------------------------------------------------------------- tables
def _f(x: Optional[float], d: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{d}f}"


def _hours(runs: Sequence[Dict]) -> float:
    return sum(sum(t.get("train_s", 0) + t.get("eval_s", 0) for t in r["timing"].values())
               for r in runs) / 3600


def _device(d: Dict) -> str:
    if d.get("type") == "cpu":
        n = d.get("threads")
        return f"CPU {d.get('name', '?')}, {n} thread{'s' if n != 1 else ''} per run"
    return f"{d.get('name', d.get('type', '?'))} x {d.get('count', 1)}"


def _machine(runs: Sequence[Dict]) -> str:
    return "; ".join(sorted({_device(r.get("provenance", {}).get("device") or {})
                             for r in runs}))


def tune_table(runs: Sequence[Dict], mode: str, out_dir: Path) -> Optional[Dict]:
    """``tune_<mode>.md`` and ``.png``; returns the choices as plain data (None: no runs)."""
    choices = choices_from(runs, mode)
    if not choices:
        return None
    mine = [r for r in runs if r["split"] == "holdout" and r["mode"] == mode]
    rates = sorted({r["lr"] for r in mine})
    loss = {(r["method"], r["lr"]): r.get("eval_target_loss") for r in mine}
    n_ex = {len(r["units"]) for r in mine}
    lines = [f"# Learning-rate tuning, {mode} training (hold-out of train.json, never test)", "",
             f"Hold-out ROUGE-L (mean over the 15 tasks; {'/'.join(map(str, sorted(n_ex)))} "
             "hold-out examples per run) at each peak learning rate, seed "
             f"{', '.join(map(str, sorted({r['seed'] for r in mine})))}; **bold** = chosen (best hold-out ROUGE-L), "
             "`edge` = the best is at the end of its grid (extend it). In brackets: hold-out "
             "teacher-forced target loss.", "",
             "| method | " + " | ".join(T.fmt_lr(x) for x in rates) + " | chosen | interior |",
             "|---" * (len(rates) + 3) + "|"]
    agree = []
    for m, c in sorted(choices.items()):
        cells = []
        for x in rates:
            if x not in c.grid:
                cells.append("")
                continue
            s = c.scores[c.grid.index(x)]
            txt = f"{s:.2f} ({_f(loss.get((m, x)), 3)})"
            cells.append(f"**{txt}**" if x == c.lr else txt)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {T.fmt_lr(c.lr)} | "
                     f"{'yes' if c.interior else 'no: ' + c.edge + ' edge'} |")
        if c.by_loss is not None:
            agree.append((m, c.by_loss == c.lr, c.by_loss))
    lines += ["", f"Cheaper signal: the hold-out target loss picks the same rate as hold-out "
              f"ROUGE-L for {sum(a for _, a, _ in agree)} of {len(agree)} methods"
              + (" (differs: " + ", ".join(f"{m} -> {T.fmt_lr(x)}" for m, a, x in agree if not a)
                 + ")" if not all(a for _, a, _ in agree) else "")
              + "; the choices use ROUGE-L.",
              "", f"Runs: {len(mine)}, {_hours(mine):.1f} process-hours of training and "
              f"evaluation; machine: {_machine(mine)}."]
    atomic_write_text(out_dir / f"tune_{mode}.md", "\n".join(lines) + "\n")
    plotting.lr_curves(out_dir / f"tune_{mode}.png",
                       {m: (c.grid, c.scores, c.lr) for m, c in choices.items()},
                       f"learning-rate tuning ({mode}, hold-out of train.json)")
    return {m: {"lr": c.lr, "holdout_rougeL": c.score, "interior": c.interior,
                "lr_by_target_loss": c.by_loss} for m, c in choices.items()}


def _seeds(seeds: Sequence[int]) -> str:
    return f"seed{'s' if len(seeds) != 1 else ''} " + ", ".join(str(s) for s in seeds)


def missing_runs(by: Dict[str, List[Dict]], methods: Sequence[str], seeds: Sequence[int],
                 forward: bool) -> Dict[str, Dict[str, List[int]]]:
    """What the study's plan (``methods`` x ``seeds``, plus each test run's single-task
    counterpart when ``forward``) still lacks: {"test": {method: [seeds]}, "single": {method:
    [seeds]}}, where "single" lists the seeds whose Forward is missing (no single-task run at the
    test run's rate and seed, or no test run yet)."""
    out: Dict[str, Dict[str, List[int]]] = {"test": {}, "single": {}}
    for m in methods:
        have = {r["seed"]: r for r in by.get(m, [])}
        lacking = [s for s in seeds if s not in have]
        if lacking:
            out["test"][m] = lacking
        if forward:
            no_fw = [s for s in seeds if s not in have or not have[s]["forward_units"]]
            if no_fw:
                out["single"][m] = no_fw
    return out


def _missing_line(miss: Dict[str, Dict[str, List[int]]], n_methods: int, seeds: Sequence[int],
                  forward: bool) -> str:
    plan = (f"the plan: {n_methods} methods x {_seeds(seeds)}"
            + (", each test run with its single-task runs for Forward" if forward else ""))
    if not miss["test"] and not miss["single"]:
        return f"Every planned run is in this table ({plan})."
    parts = []
    if miss["test"]:
        parts.append("test runs: " + "; ".join(f"{m} ({_seeds(s)})"
                                                for m, s in miss["test"].items()))
    if miss["single"]:
        parts.append("single-task runs, so no Forward yet: " + "; ".join(
            f"{m} ({_seeds(s)})" for m, s in miss["single"].items()))
    return (f"**Not in this table yet** ({plan}; `python -m badit_exp.study status` lists the "
            "queue and its cost): " + ". ".join(parts) + ".")


def study_table(runs: Sequence[Dict], mode: str, methods: Sequence[str],
                baselines: Sequence[str], out_dir: Path,
                families: Optional[Dict[str, Sequence[str]]] = None,
                seeds: Optional[Sequence[int]] = None, forward: bool = False) -> Optional[Dict]:
    """``study_<mode>.md``: the tuned study's rows and paired intervals (None: no runs); rows
    grouped by ``families`` ({family: [methods]}, in that order) when given. With the plan's
    ``seeds`` (and ``forward``: single-task runs planned), the table also says which planned
    runs it still lacks."""
    mine = [r for r in runs if r["split"] == "test" and r["mode"] == mode]
    if not mine:
        return None
    by: Dict[str, List[Dict]] = {}
    for r in mine:
        by.setdefault(r["method"], []).append(r)
    order = [m for m in methods if m in by] + sorted(m for m in by if m not in methods)
    family = {m: f for f, ms in (families or {}).items() for m in ms}
    if families:
        rank = {f: i for i, f in enumerate(families)}
        order = sorted(order, key=lambda m: (rank.get(family.get(m), len(rank)),
                                             order.index(m)))
    seq = mode == "sequential"
    has_fw = any(r["forward_units"] for r in mine)
    has_loss = seq and any(r["loss_forget_units"] for r in mine)
    cl_metrics = ((["forward"] if has_fw else []) + (["forget", "backward"] if seq else [])
                  + (["loss_forget", "loss_backward"] if has_loss else []))
    rows, data = [], {}
    head = ("| family " if families else "") + \
        "| method | lr | seeds | ROUGE-L | per seed | test target loss | wall (min/run) |"
    if has_fw:
        head += " Forward [95% CI] | single-task ROUGE-L |"
    if seq:
        head += " Forget | Backward |"
    if has_loss:
        head += " Forget (loss) | Backward (loss) |"
    for m in order:
        rs = sorted(by[m], key=lambda r: r["seed"])
        lrs = sorted({r["lr"] for r in rs})
        rouge = [r["rouge"] for r in rs]
        tl = [r["eval_target_loss"] for r in rs if r.get("eval_target_loss") is not None]
        cells = [m, "/".join(T.fmt_lr(x) for x in lrs), str(len(rs)), T.fmt_mean_std(rouge),
                 ", ".join(f"{x:.2f}" for x in rouge), T.fmt_mean_std(tl, 3) if tl else "n/a",
                 f"{_hours(rs) * 60 / len(rs):.1f}"]
        d = {"lr": lrs, "seeds": [r["seed"] for r in rs], "rouge": rouge, "target_loss": tl}
        if has_fw:
            fw = forward_summary(rs)
            d["forward"] = fw
            cells += ["n/a", "n/a"] if fw is None else [
                f"{fw['mean']:+.2f} [{fw['ci'][0]:+.2f}, {fw['ci'][1]:+.2f}] "
                f"({fw['seeds']} seed{'s' if fw['seeds'] != 1 else ''}"
                f"{'' if fw['complete'] else ', ' + str(fw['units']) + ' tasks'})",
                f"{fw['single_rouge']:.2f}"]
        if seq:
            for k in ("forget_rate", "backward"):
                v = [r[k] for r in rs if r.get(k) is not None]
                cells.append(T.fmt_mean_std(v) if v else "n/a")
                d[k] = v
        if has_loss:
            for k in ("loss_forget", "loss_backward"):
                v = [float(np.mean(list(r[f"{k}_units"].values()))) for r in rs
                     if r[f"{k}_units"]]
                cells.append(f"{T.fmt_mean_std(v, 3)} ({len(v)})" if v else "n/a")
                d[k] = v
        if families:
            cells.insert(0, family.get(m, "other"))
            d["family"] = family.get(m, "other")
        rows.append(cells)
        data[m] = d
    pairs, pair_data, cl_pairs = [], {}, []
    for base in baselines:
        if base not in by:
            continue
        for m in order:
            if m == base:
                continue
            ua = {k: v for r in by[m] for k, v in r["units"].items()}
            ub = {k: v for r in by[base] for k, v in r["units"].items()}
            a, b, keys = T.align(ua, ub, keys=True)
            if len(a) < 2:
                continue
            diff, lo, hi = T.paired_bootstrap(a, b, weights=T.task_weights(keys))
            la = {k: v for r in by[m] for k, v in r["loss_units"].items()}
            lb = {k: v for r in by[base] for k, v in r["loss_units"].items()}
            x, y, lkeys = T.align(la, lb, keys=True)
            ld = (T.paired_bootstrap(x, y, weights=T.task_weights(lkeys)) if len(x) >= 2
                  else None)
            ra = {r["seed"]: r["rouge"] for r in by[m]}
            rb = {r["seed"]: r["rouge"] for r in by[base]}
            per_seed = [ra[sd] - rb[sd] for sd in sorted(set(ra) & set(rb))]
            verdict = T.seed_verdict(lo, hi, per_seed)
            n_seeds = len({k[0] for k in keys})
            pairs.append(f"| {m} − {base} | {diff:+.2f} [{lo:+.2f}, {hi:+.2f}] | "
                         + ", ".join(f"{x:+.2f}" for x in per_seed) + f" | {verdict} | "
                         + (f"{ld[0]:+.3f} [{ld[1]:+.3f}, {ld[2]:+.3f}]" if ld else "n/a")
                         + f" | {len(a)} ({n_seeds} seed{'s' if n_seeds != 1 else ''}) |")
            pair_data[f"{m}-{base}"] = {"rougeL": [diff, lo, hi], "per_seed": per_seed,
                                        "verdict": verdict,
                                        "loss": list(ld) if ld else None,
                                        "units": len(a), "seeds": n_seeds}
            if cl_metrics:
                cells = [f"{m} − {base}"]
                for k in cl_metrics:
                    cl = _cl_pair(by[m], by[base], k)
                    pair_data[f"{m}-{base}"][k] = cl
                    dg = 3 if k.startswith("loss_") else 2
                    cells += ["n/a"] * 3 if cl is None else [
                        f"{cl['diff'][0]:+.{dg}f} [{cl['diff'][1]:+.{dg}f}, "
                        f"{cl['diff'][2]:+.{dg}f}]",
                        ", ".join(f"{x:+.{dg}f}" for x in cl["per_seed"]),
                        T.seed_verdict(cl["diff"][1], cl["diff"][2], cl["per_seed"])
                        if not k.startswith("loss_") else _loss_verdict(cl)]
                cl_pairs.append("| " + " | ".join(cells) + " |")
    # the first baseline's ROUGE-L difference in each row, so one table carries the headline
    first = next((b for b in baselines if b in by), None)
    if first:
        head += f" ROUGE-L − {first} [95% CI] |"
        for m, cells in zip(order, rows):
            p = pair_data.get(f"{m}-{first}")
            cells.append("—" if m == first else "n/a" if p is None else
                         "{:+.2f} [{:+.2f}, {:+.2f}]".format(*p["rougeL"]))
    rows = ["| " + " | ".join(cells) + " |" for cells in rows]
    miss = missing_runs(by, methods, seeds, forward) if seeds else None
    n_test = "/".join(str(n) for n in sorted({len(r["units"]) for r in mine}))
    budget = mine[0]["config"]
    dcfg, tcfg = budget["data"], budget["trainer"]
    lines = [f"# Tuned study, {mode} training: each method at its own learning rate", "",
             f"SmolLM2-135M-Instruct ({budget['model']['name']}), all {len(dcfg['tasks'])} "
             f"SuperNI tasks, {dcfg['max_train_per_task']} training instances per task "
             f"({dcfg['holdout_per_task']} more held out for tuning, never trained on), "
             f"{tcfg['epochs']} epochs at batch {tcfg['per_device_batch_size']}, "
             f"{dcfg['max_seq_len']} tokens; rates from `lr_choices.yaml` (chosen on the "
             f"hold-out); test: {n_test} examples per run (up to {dcfg['max_eval_per_task']} per "
             "task). ROUGE-L is the mean over tasks; ± is the sample std over seeds ('?' for "
             "one seed).", "", head, "|---" * (head.count("|") - 1) + "|", *rows, "",
             *([_missing_line(miss, len(methods), seeds, forward), ""] if miss else []),
             "Paired differences (method − baseline) over the same (seed, test example) units, "
             "95% paired bootstrap interval (scipy.stats.bootstrap, BCa, 9999 resamples; each "
             "unit weighted 1 / its (seed, task)'s count, so the difference is that of the "
             "ROUGE-L column, a mean over tasks); per seed: the two runs' ROUGE-L difference at "
             "the same seed. A difference is measurable only when its interval excludes 0 and "
             "every seed's difference has its sign. Target loss: teacher-forced, nats per "
             "target token (lower is better).", "",
             "| pair | ROUGE-L diff [95% CI] | per seed | verdict | target-loss diff [95% CI] "
             "| units |",
             "|---|---|---|---|---|---|", *pairs, "",
             *([] if not has_fw else [FORWARD_NOTE[mode].format(
                 k=dcfg.get("max_eval_per_task_intermediate") or dcfg["max_eval_per_task"]), ""]),
             *([] if not cl_pairs else [
                 ", ".join(CL_NAMES[k] for k in cl_metrics) + " (SPEC section 3), paired "
                 "over (seed, task): each run's per-task shares of the metric ("
                 + "; ".join(CL_DEFS[k] for k in cl_metrics)
                 + "), the same seed for both methods; 95% paired bootstrap interval over those "
                 "units. " + _better(cl_metrics)
                 + (" The rows before the last are scored on "
                    f"{dcfg.get('max_eval_per_task_intermediate') or dcfg['max_eval_per_task']} "
                    "test examples per task, so these are noisier than ROUGE-L." if seq else ""),
                 "",
                 "| pair | " + " | ".join(f"{CL_NAMES[k]} diff [95% CI] | per seed | verdict"
                                         for k in cl_metrics) + " |",
                 "|---" * (1 + 3 * len(cl_metrics)) + "|", *cl_pairs, ""]),
             f"Runs: {len(mine)}, {_hours(mine):.1f} process-hours; machine: {_machine(mine)}."]
    atomic_write_text(out_dir / f"study_{mode}.md", "\n".join(lines) + "\n")
    panels = []  # one line of panels per baseline (lora_r32, then badit), columns by metric
    bases = [b for b in baselines if b in by]
    against = {b: {k.rsplit("-" + b, 1)[0]: v for k, v in pair_data.items()
                   if k.endswith("-" + b)} for b in bases}
    cols = [k for k in ("forward", "forget", "backward", "loss_forget")
            if any(v.get(k) for b in bases for v in against[b].values())]
    for base in bases:
        line = [(f"ROUGE-L − {base} (paired bootstrap 95% CI)",
                 {m: (v["rougeL"], v["verdict"]) for m, v in against[base].items()}, 1)]
        for k in cols:
            sign = -1 if k in ("forget", "loss_forget") else 1
            line.append((f"{CL_NAMES[k]} − {base} (95% CI; "
                         f"{'higher' if sign > 0 else 'lower'} is better)",
                         {m: (v[k]["diff"], v[k]["verdict"])
                          for m, v in against[base].items() if v.get(k)}, sign))
        panels.append(line)
    plotting.study_points(
        out_dir / f"study_{mode}.png",
        [(m, "/".join(T.fmt_lr(x) for x in data[m]["lr"]), data[m]["rouge"]) for m in order],
        panels, f"tuned study, {mode}: each method at its own rate ({len(mine)} runs)",
        [family.get(m, "other") for m in order] if families else None)
    return {"rows": data, "pairs": pair_data, **({"missing": miss} if miss else {})}


def agreement_table(runs: Sequence[Dict], mode: str, order: Sequence[str],
                    out_dir: Path) -> Optional[Dict]:
    """``agreement_<mode>.md`` and ``.png``: how often two methods generate the very same text
    for a test example. Off the diagonal: two methods at the same seed (the same data order and
    sample), the share of their shared test examples with identical predictions, averaged over
    their shared seeds; on it: one method against itself over each pair of its seeds. A score
    says how good the outputs are, this says whether two methods learned the same thing (e.g.
    an ablation that generates like another method is, in effect, that method). None: fewer
    than two methods with predictions."""
    preds: Dict[Tuple[str, int], Dict] = {}
    for r in runs:
        if r["split"] == "test" and r["mode"] == mode and r.get("predictions"):
            preds[(r["method"], r["seed"])] = r["predictions"]
    methods = [m for m in order if any(k[0] == m for k in preds)]
    if len(methods) < 2:
        return None
    seeds = {m: sorted(s for (x, s) in preds if x == m) for m in methods}

    def same(p: Dict, q: Dict) -> Optional[float]:
        ids = [i for i in p if i in q and p[i] is not None and q[i] is not None]
        return 100.0 * sum(p[i] == q[i] for i in ids) / len(ids) if ids else None

    A = np.full((len(methods), len(methods)), np.nan)
    for i, a in enumerate(methods):
        for j, b in enumerate(methods):
            if a == b:
                vals = [same(preds[(a, s)], preds[(a, t)])
                        for k, s in enumerate(seeds[a]) for t in seeds[a][k + 1:]]
            else:
                vals = [same(preds[(a, s)], preds[(b, s)]) for s in seeds[a] if s in seeds[b]]
            vals = [v for v in vals if v is not None]
            if vals:
                A[i, j] = float(np.mean(vals))
    rows = []
    for i, m in enumerate(methods):
        others = [(A[i, j], methods[j]) for j in range(len(methods))
                  if j != i and np.isfinite(A[i, j])]
        near = max(others) if others else None
        far = min(others) if others else None
        rows.append(f"| {m} | {len(seeds[m])} | " + (f"{A[i, i]:.1f}" if np.isfinite(A[i, i])
                                                      else "n/a") + " | "
                    + (f"{near[1]} ({near[0]:.1f})" if near else "n/a") + " | "
                    + (f"{far[1]} ({far[0]:.1f})" if far else "n/a") + " |")

    def cell(v: float) -> str:
        return f"{v:.0f}" if np.isfinite(v) else ""

    lines = [f"# Prediction agreement, {mode} training (test split)", "",
             "Share (%) of test examples on which two runs generate the identical text. "
             "Between two methods: at the same seed (the same training order and sample), "
             "averaged over their shared seeds; a method against itself: over each pair of its "
             "seeds, the reference for how much a reseed alone changes. Built by "
             "`python -m badit_exp.study report` from the committed `examples.jsonl`.", "",
             "| method | seeds | itself, across seeds | most like (same seed) | least like |",
             "|---|---|---|---|---|", *rows, "",
             "| | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|",
             *[f"| {m} | " + " | ".join(cell(v) for v in A[i]) + " |"
               for i, m in enumerate(methods)], ""]
    atomic_write_text(out_dir / f"agreement_{mode}.md", "\n".join(lines))
    plotting.agreement(out_dir / f"agreement_{mode}.png", methods, A,
                       f"identical test predictions (%), {mode}: same seed off the diagonal, "
                       "across seeds on it")
    return {"methods": methods, "seeds": seeds,
            "matrix": [[None if not np.isfinite(v) else round(float(v), 2) for v in row]
                       for row in A]}


def _loss_verdict(cl: Dict) -> str:
    """A loss difference's verdict in words of the metric it mirrors (lower loss-Forget, higher
    loss-Backward = better); the same rule as :func:`badit_exp.tuning.seed_verdict`."""
    return T.seed_verdict(cl["diff"][1], cl["diff"][2], cl["per_seed"])


CL_DEFS = {"forward": "Forward: a task's a_{t,t} minus its single-task score on the same examples",
           "loss_forget": "Forget (loss): a task's final teacher-forced target loss minus its "
                          "lowest over the rows before the last, nats",
           "loss_backward": "Backward (loss): a task's loss right after it was trained minus "
                            "its final loss, nats",
           "forget": "Forget: a task's max ROUGE-L over the rows before the last minus its final "
                     "ROUGE-L",
           "backward": "Backward: its final ROUGE-L minus its ROUGE-L right after it was trained"}
CL_BETTER = {"forward": "higher Forward", "forget": "lower Forget", "backward": "higher Backward",
             "loss_forget": "lower Forget (loss)", "loss_backward": "higher Backward (loss)"}
CL_NAMES = {"forward": "Forward", "forget": "Forget", "backward": "Backward",
            "loss_forget": "Forget (loss)", "loss_backward": "Backward (loss)"}

def _better(metrics: Sequence[str]) -> str:
    txt = ", ".join(CL_BETTER[k] for k in metrics)
    return txt[0].upper() + txt[1:] + (" are" if len(metrics) > 1 else " is") + " better."


FORWARD_NOTE = {
    "mixed": "Forward (SPEC section 3, mixed): per task, the multi-task ROUGE-L minus the same "
             "method's single-task ROUGE-L (`training_mode=single`: each task trained alone from "
             "the pre-trained model at the same budget per task, the same seed and the method's "
             "tuned mixed rate) on the same test examples; the mean over tasks, then over seeds. "
             "Negative = the tasks interfere (a task scores less trained with the others than "
             "alone). The interval is a bootstrap over the (seed, task) units. Single-task "
             "ROUGE-L: the single runs' own mean.",
    "sequential": "Forward (SPEC section 3, sequential): per task, a_{{t,t}} (its ROUGE-L right "
                  "after it was trained) minus the same method's single-task ROUGE-L "
                  "(`training_mode=single` at the method's tuned sequential rate, same seed) on "
                  "the same examples: a_{{t,t}} of a task trained before the last comes from an "
                  "intermediate row, which scores the first {k} test examples of the task, and "
                  "is matched with the single run's mean over exactly those ids; the last task's "
                  "uses all of them. The interval is a bootstrap over the (seed, task) units.",
}


def forward_summary(runs: Sequence[Dict]) -> Optional[Dict]:
    """A method's Forward over its runs: the mean over seeds of each run's mean over tasks, the
    per-seed values, a 95% bootstrap interval over the (seed, task) units (against 0), the
    single runs' mean ROUGE-L; None when no run has a single-task counterpart."""
    units = {k: v for r in runs for k, v in r["forward_units"].items()}
    if len(units) < 2:
        return None
    with_fw = [r for r in runs if r["forward_units"]]
    per_seed = [float(np.mean(list(r["forward_units"].values()))) for r in with_fw]
    v = np.array(list(units.values()))
    _, lo, hi = T.paired_bootstrap(v, np.zeros_like(v))
    n_tasks = {len(r["tasks"]) for r in with_fw}
    return {"mean": float(np.mean(per_seed)), "per_seed": per_seed, "ci": [lo, hi],
            "seeds": len(with_fw), "units": len(units),
            "complete": all(len(r["forward_units"]) == len(r["tasks"]) for r in with_fw)
            and len(n_tasks) == 1,
            "single_rouge": float(np.mean([r["single_rouge"] for r in with_fw])),
            "sources": [r["forward_source"] for r in with_fw]}


def _gap_to_front(run: Dict, fg: float, seg: List) -> Tuple[float, float, float]:
    """A run's final ROUGE-L minus the baseline frontier ``seg`` at Forget ``fg`` (the two
    frontier points around it, mixed linearly), paired over the same hold-out examples:
    (difference, 95% bootstrap interval)."""
    xs = [p[1] for p in seg]
    if fg >= xs[-1]:
        a, b, w = seg[-1][3], seg[-1][3], 1.0
    else:
        j = max(i for i, x in enumerate(xs) if x <= fg)
        a, b = seg[j][3], seg[j + 1][3]
        w = 1.0 - (fg - xs[j]) / (xs[j + 1] - xs[j]) if xs[j + 1] > xs[j] else 1.0
    ua = {k[1:]: v for k, v in a["units"].items()}
    ub = {k[1:]: v for k, v in b["units"].items()}
    um = {k[1:]: v for k, v in run["units"].items()}
    keys = [k for k in um if k in ua and k in ub]
    x = np.array([um[k] for k in keys])
    y = np.array([w * ua[k] + (1 - w) * ub[k] for k in keys])
    return T.paired_bootstrap(x, y, weights=T.task_weights([(0, *k) for k in keys]),
                              n_resamples=2999)


def _forget_gap(run: Dict, base: Dict, key: str, loss: bool) -> str:
    """A point left of the baseline's curve: its Forget minus that of the baseline's
    least-forgetting point, paired over the (seed, task) units both have, as a note."""
    keys = [k for k in run[key] if k in base[key]]
    if len(keys) < 2:
        return ""
    d, lo, hi = T.paired_bootstrap(np.array([run[key][k] for k in keys]),
                                   np.array([base[key][k] for k in keys]), n_resamples=2999)
    f = ".3f" if loss else ".2f"
    word = "measurably less" if hi < 0 else "not measurably less"
    return (f"; Forget {d:+{f}} [{lo:+{f}}, {hi:+{f}}] against that point over {len(keys)} "
            f"tasks: {word}")


def frontier_table(runs: Sequence[Dict], out_dir: Path, baseline: str = "lora_r32",
                   choices: Optional[Dict[str, T.Choice]] = None) -> Optional[Dict]:
    """The plasticity-forgetting frontier of the sequential tuning runs (hold-out): per method
    and rate, final hold-out ROUGE-L against Forget, loss-based where every run has its loss
    matrix (ROUGE-based otherwise, on the rows' few examples); ``frontier_sequential.md`` /
    ``.png`` and, per method, whether its points lie above ``baseline``'s curve (linear
    interpolation in Forget) beyond the noise (the two points' interval half-widths added in
    quadrature)."""
    mine = [r for r in runs if r["split"] == "holdout" and r["mode"] == "sequential"]
    if not mine:
        return None
    use_loss = all(r["loss_forget_units"] for r in mine)
    key = "loss_forget_units" if use_loss else "forget_units"
    pts: Dict[str, List[Tuple[float, float, float, Dict]]] = {}
    for r in mine:
        if r[key]:
            pts.setdefault(r["method"], []).append(
                (r["lr"], float(np.mean(list(r[key].values()))), r["rouge"], r))
    for m in pts:
        pts[m].sort()
    base = pts.get(baseline)
    verdicts: Dict[str, List[str]] = {}
    at_choice: Dict[str, Dict] = {}  # the chosen rate's point against the curve, per method
    left: Dict[str, List[bool]] = {}  # per point left of the curve: Forget measurably less?
    rows = []
    for m, ps in pts.items():
        for lr, fg, rg, r in ps:
            note = ""
            if base and m != baseline:
                # the baseline's frontier: its points no other of its points beats on both
                # (less Forget and more ROUGE-L), joined linearly, flat beyond its last point
                seg = sorted((p for p in base if not any(q[1] <= p[1] and q[2] > p[2]
                                                         for q in base if q is not p)),
                             key=lambda p: p[1])
                gap, lo, hi = _gap_to_front(r, max(fg, seg[0][1]), seg)
                if fg >= seg[0][1]:
                    verdict = "above" if lo > 0 else "below" if hi < 0 else "within the noise"
                elif lo > 0:  # forgets less AND scores more than its least-forgetting point
                    verdict = "above"
                else:  # left of the curve: no baseline point forgets as little
                    verdict = "outside"
                note = f"{gap:+.2f} [{lo:+.2f}, {hi:+.2f}] vs {baseline}: " + (
                    f"forgets less than any {baseline} point; not more final score than its "
                    "least-forgetting one beyond the noise (left of its curve)" if verdict == "outside"
                    else verdict)
                if fg < seg[0][1]:  # is "forgets less" itself beyond Forget's noise?
                    gapf = _forget_gap(r, seg[0][3], key, use_loss)
                    note += gapf
                    left.setdefault(m, []).append(gapf.endswith(": measurably less"))
                verdicts.setdefault(m, []).append(verdict)
            chosen = choices.get(m).lr if choices and m in choices else None
            if note and chosen == lr:
                at_choice[m] = {"lr": lr, "diff": [gap, lo, hi], "verdict": verdict}
            rows.append(f"| {m} | {T.fmt_lr(lr)}{' (chosen)' if chosen == lr else ''} | "
                        f"{rg:.2f} | {fg:+.3f} | {note} |")
    what = ("Forget (loss): mean over t < T of l_{T,t} − min_{i<T} l_{i,t}, nats (the rows "
            "before the last on their loss sample, the final row on every hold-out example)"
            if use_loss else
            "Forget (ROUGE-L) from rows of few hold-out examples (no loss matrix yet)")
    summary = []
    for m, v in verdicts.items():
        n = {k: v.count(k) for k in ("above", "below", "within the noise", "outside")}
        head = ("above" if n["above"] and not n["below"] else
                "below" if n["below"] and not n["above"] else
                "mixed" if n["above"] else "not beyond the noise of")
        parts = [f"{c} of {len(v)} rates {k}" for k, c in n.items() if c]
        summary.append(f"- **{m}**: " + (
            f"{head} {baseline}'s curve beyond the noise" if head in ("above", "below") else
            f"above {baseline}'s curve at some rates, below at others" if head == "mixed" else
            f"not beyond the noise of {baseline}'s curve") + f" ({'; '.join(parts)})"
            + (f"; left of the curve: {sum(left[m])} of {len(left[m])} points forget measurably "
               f"less than its least-forgetting point" if left.get(m) else ""))
    if any("outside" in v for v in verdicts.values()):
        summary.append(f"\n'outside': the point forgets less than every point of {baseline}'s "
                       "curve, and does not score more than its least-forgetting one beyond the "
                       "noise: a trade-off the curve does not reach, so no comparison at equal "
                       "forgetting.")
    lines = ["# Plasticity against forgetting, sequential tuning runs (hold-out of train.json)",
             "", f"Per method and rate (seed 1, Table-5 order 1): final hold-out ROUGE-L against "
             f"{what}. A point above {baseline}'s curve keeps more final score at equal "
             f"forgetting ({baseline}'s frontier: its undominated points joined linearly, flat "
             "beyond the last); the interval is a paired 95% bootstrap over the same hold-out "
             "examples (the method's point against the frontier's two points around its Forget, "
             "mixed as the interpolation mixes them); Forget's own noise is not in it. For a "
             "point left of the curve, its Forget minus that of the baseline's least-forgetting "
             "point follows, paired over the tasks (95% bootstrap).", "",
             "| method | lr | final ROUGE-L | Forget | against the curve |", "|---|---|---|---|---|",
             *rows, "", *summary]
    atomic_write_text(out_dir / "frontier_sequential.md", "\n".join(lines) + "\n")
    plotting.frontier(out_dir / "frontier_sequential.png",
                      {m: [(fg, rg, T.fmt_lr(lr), bool(choices and m in choices
                                                      and choices[m].lr == lr))
                           for lr, fg, rg, _ in ps] for m, ps in pts.items()},
                      "plasticity vs forgetting (sequential tuning, hold-out)",
                      "Forget (loss, nats)" if use_loss else "Forget (ROUGE-L)")
    return {"metric": "loss" if use_loss else "rougeL",
            "points": {m: [[lr, fg, rg] for lr, fg, rg, _ in ps] for m, ps in pts.items()},
            "verdicts": verdicts, "baseline": baseline, "at_choice": at_choice}


def _cl_pair(runs_a: Sequence[Dict], runs_b: Sequence[Dict], metric: str) -> Optional[Dict]:
    """``metric`` (forward | forget | backward) of method a minus method b, paired over the (seed, task)
    units both have: the mean difference (that of the table's column), its 95% paired bootstrap
    interval, the per-seed differences and the verdict; None without two common units."""
    key = f"{metric}_units"
    ua = {k: v for r in runs_a for k, v in r[key].items()}
    ub = {k: v for r in runs_b for k, v in r[key].items()}
    a, b, keys = T.align(ua, ub, keys=True)
    if len(a) < 2:
        return None
    diff = T.paired_bootstrap(a, b)
    seeds = sorted({k[0] for k in keys})
    per_seed = [float(np.mean([x - y for x, y, k in zip(a, b, keys) if k[0] == sd]))
                for sd in seeds]
    return {"diff": list(diff), "per_seed": per_seed,
            "verdict": T.seed_verdict(diff[1], diff[2], per_seed), "units": len(a)}


# the paper's claims this budget can test: (mode, claim, method a, method b, metric, better)
# with a - b > 0 supporting the claim when better = +1, a - b < 0 when better = -1
CLAIMS = [
    ("mixed", "BADIT scores above LoRA (rank 4, the paper's baseline)", "badit", "lora", "rougeL", 1),
    ("mixed", "BADIT scores above LoRA at equal size (rank 32)", "badit", "lora_r32", "rougeL", 1),
    ("mixed", "BADIT scores above LoRAMoE", "badit", "loramoe", "rougeL", 1),
    ("mixed", "BADIT interferes less than LoRA (Forward, rank 4, the paper's baseline)", "badit",
     "lora", "forward", 1),
    ("mixed", "BADIT interferes less than LoRA (Forward, rank 32)", "badit", "lora_r32",
     "forward", 1),
    ("mixed", "BADIT interferes less than LoRAMoE (Forward)", "badit", "loramoe", "forward", 1),
    ("mixed", "DOG helps (BADIT vs BADIT without DOG)", "badit", "badit_wo_dog", "rougeL", 1),
    ("mixed", "BAD helps (BADIT vs BADIT with LoRA-initialised experts)", "badit", "badit_wo_bad",
     "rougeL", 1),
    ("mixed", "the SVD initialisation helps (PiSSA vs LoRA, rank 32)", "pissa_r32", "lora_r32",
     "rougeL", 1),
    ("sequential", "BADIT ends above LoRA (rank 32)", "badit", "lora_r32", "rougeL", 1),
    ("sequential", "BADIT ends above LoRAMoE", "badit", "loramoe", "rougeL", 1),
    ("sequential", "BADIT forgets less than LoRA (rank 32)", "badit", "lora_r32", "forget", -1),
    ("sequential", "BADIT forgets less than LoRAMoE", "badit", "loramoe", "forget", -1),
    ("sequential", "BADIT forgets less than LoRA (rank 32), from the target loss", "badit",
     "lora_r32", "loss_forget", -1),
    ("sequential", "BADIT forgets less than LoRAMoE, from the target loss", "badit", "loramoe",
     "loss_forget", -1),
    ("sequential", "BADIT forgets less than LoRA (rank 32) at equal plasticity (the hold-out "
     "frontier: more final score than LoRA's curve at BADIT's Forget)", "badit", "lora_r32",
     "frontier", 1),
    ("sequential", "DOG helps (BADIT vs BADIT without DOG)", "badit", "badit_wo_dog", "rougeL", 1),
]


def _pair(pairs: Dict, a: str, b: str, metric: str) -> Optional[Tuple[float, float, float, List]]:
    """``a - b`` of ``metric`` from a study's pairs (either orientation), with per-seed values."""
    for x, y, sign in ((a, b, 1), (b, a, -1)):
        p = pairs.get(f"{x}-{y}")
        if not p:
            continue
        v = p.get(metric) if metric != "rougeL" else p["rougeL"]
        if v is None:
            continue
        d, lo, hi = (v["diff"] if isinstance(v, dict) else v)
        per = (v["per_seed"] if isinstance(v, dict) else p["per_seed"])
        if sign < 0:
            d, lo, hi, per = -d, -hi, -lo, [-z for z in per]
        return d, lo, hi, per
    return None


def _frontier_claim(claim: str, a: str, b: str, frontier: Optional[Dict]) -> str:
    """A claims-table row from the frontier: method a's point at its chosen rate against b's
    curve (one seed's hold-out runs, so no verdict about the spread over seeds)."""
    got = (frontier or {}).get("at_choice", {}).get(a)
    if got is None or frontier.get("baseline") != b:
        return f"| sequential | {claim} | not measured yet ({a} against {b}'s frontier) | | — |"
    d, lo, hi = got["diff"]
    forget = "Forget (loss)" if frontier.get("metric") == "loss" else "Forget"
    verdict = {
        "above": "supported on the hold-out (seed 1; the spread over seeds is unknown)",
        "below": "contradicted on the hold-out (seed 1; the spread over seeds is unknown)",
        "within the noise": f"unresolved: within the noise of {b}'s curve (one seed's hold-out "
                            "runs; `frontier_sequential.md`)",
        "outside": f"unresolved: it forgets less than every {b} point, so no point of the curve "
                   "has its Forget (`frontier_sequential.md`)"}[got["verdict"]]
    return (f"| sequential | {claim} | final ROUGE-L − {b}'s curve at {a}'s {forget} "
            f"(hold-out, {T.fmt_lr(got['lr'])}) {d:+.2f} [{lo:+.2f}, {hi:+.2f}] | {d:+.2f} | "
            f"{verdict} |")


def claims_table(study_out: Dict, seeds: Optional[Dict[str, int]] = None,
                 frontier: Optional[Dict] = None) -> List[str]:
    """The README's claims table: each claim beside the measured difference, its interval and
    the verdict; an unresolved one with the interval it would need. ``seeds`` (mode -> the
    study's seed count) marks a verdict that rests on fewer seeds than the study plans;
    ``frontier`` (``frontier_table``'s output) answers the claim at equal plasticity."""
    rows = ["| mode | the paper's claim | measured (a − b) [95% CI] | per seed | verdict |",
            "|---|---|---|---|---|"]
    for mode, claim, a, b, metric, better in CLAIMS:
        if metric == "frontier":
            rows.append(_frontier_claim(claim, a, b, frontier))
            continue
        pairs = (study_out.get(mode) or {}).get("pairs", {})
        got = _pair(pairs, a, b, metric)
        name = {"rougeL": "ROUGE-L", "forward": "Forward", "forget": "Forget",
                "loss_forget": "Forget (loss, nats)"}[metric]
        f = ".3f" if metric.startswith("loss_") else ".2f"  # nats want a third digit
        if got is None:
            rows.append(f"| {mode} | {claim} | not measured yet ({a}, {b}: {name}) | | — |")
            continue
        d, lo, hi, per = got
        verdict = T.seed_verdict(lo, hi, per)
        if len(per) < 2:  # one seed says nothing of the spread over seeds
            rows.append(f"| {mode} | {claim} | {name} {d:+{f}} [{lo:+{f}}, {hi:+{f}}] | "
                        + ", ".join(f"{z:+{f}}" for z in per)
                        + " | unresolved: one seed so far (a verdict needs two or more) |")
            continue
        if verdict.startswith("measurably"):
            ok = (d > 0) == (better > 0)
            verdict = "supported" if ok else "contradicted"
        elif lo > 0 or hi < 0:  # the interval excludes 0, a seed goes the other way
            agree = sum((z > 0) == (d > 0) for z in per)
            verdict = (f"unresolved: the interval excludes 0 but {len(per) - agree} of "
                       f"{len(per)} seeds go the other way; a verdict needs every seed's "
                       "sign (more seeds decide it)")
        else:
            half = (hi - lo) / 2
            factor = (half / abs(d)) ** 2 if abs(d) > 1e-9 else float("inf")
            verdict = (f"unresolved: the interval (half-width {half:{f}}) rules out effects "
                       f"beyond {max(abs(lo), abs(hi)):{f}}; resolving {abs(d):{f}} needs a "
                       "half-width below it, "
                       + (f"about {max(1.0, factor):.0f}x the units (seeds x test examples)"
                          if factor <= 100 else "over 100x the units: no affordable study"))
        planned = (seeds or {}).get(mode, 0)
        if len(per) < planned:  # a verdict that more of the study's seeds may still move
            verdict += f" (on {len(per)} of {planned} seeds so far)"
        rows.append(f"| {mode} | {claim} | {name} {d:+{f}} [{lo:+{f}}, {hi:+{f}}] | "
                    + ", ".join(f"{z:+{f}}" for z in per) + f" | {verdict} |")
    return rows


# ---------------------------------------------------------------------------- docs' tables
# A document quotes a report table between two markers, and the report rewrites what lies
# between them, so the README and docs/ cannot drift from the committed results:
#
#   <!-- table:study2_cpu/study_mixed.md#1 columns=method;lr;ROUGE-L (written by `python -m badit_exp.study report`) -->
#   <!-- /table -->
#
# ``study2_cpu`` names the study, ``study_mixed.md`` a file of its results folder, ``#1`` the
# file's first markdown table, and the optional ``columns=`` (``;``-separated header names)
# keeps those columns in that order.
DOC_TABLE = re.compile(
    r"(?P<start><!-- table:(?P<study>[\w.-]+)/(?P<file>[\w.-]+\.md)#(?P<n>\d+)"
    r"(?: columns=(?P<cols>[^>]*?))? \(written by `python -m badit_exp\.study report`\) -->\n)"
    r"(?P<body>.*?)(?P<end><!-- /table -->)", re.S)


def md_tables(text: str) -> List[List[str]]:
    """The markdown tables of ``text``, each as its lines (header, rule, rows)."""
    tables: List[List[str]] = []
    prev = False
    for line in text.splitlines():
        is_row = line.startswith("|")
        if is_row and not prev:
            tables.append([])
        if is_row:
            tables[-1].append(line)
        prev = is_row
    return tables


def _cells(line: str) -> List[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def select_columns(table: List[str], columns: Sequence[str], where: str = "") -> List[str]:
    """``table`` with only ``columns`` (header names), in that order."""
    head = _cells(table[0])
    missing = [c for c in columns if c not in head]
    if missing:
        raise ValueError(f"{where}: no column {missing} in the table; its columns: {head}")
    idx = [head.index(c) for c in columns]
    out = []
    for k, line in enumerate(table):
        cells = _cells(line)
        out.append("|---" * len(idx) + "|" if k == 1 else
                   "| " + " | ".join(cells[i] if i < len(cells) else "" for i in idx) + " |")
    return out


def update_doc_tables(path: Path, name: str, results_dir: Path) -> int:
    """Rewrite every ``table:<name>/...`` block of ``path`` (see ``DOC_TABLE``) from the
    results folder's files; returns how many blocks it holds. A block naming a file, table or
    column the report did not write is an error naming the block and the fix."""
    if not path.is_file():
        return 0
    text = path.read_text()
    n = 0

    def fill(m: "re.Match") -> str:
        nonlocal n
        if m["study"] != name:
            return m[0]
        n += 1
        where = f"{path}: block {m['start'].strip()}"
        src = Path(results_dir) / m["file"]
        if not src.is_file():
            raise ValueError(f"{where}: {src} does not exist (the report writes "
                             f"{sorted(p.name for p in Path(results_dir).glob('*.md'))})")
        tables = md_tables(src.read_text())
        k = int(m["n"])
        if not 1 <= k <= len(tables):
            raise ValueError(f"{where}: {src.name} has {len(tables)} table(s), not #{k}")
        table = tables[k - 1]
        if m["cols"]:
            table = select_columns(table, [c.strip() for c in m["cols"].split(";")], where)
        return m["start"] + "\n".join(table) + "\n" + m["end"]

    new = DOC_TABLE.sub(fill, text)
    if new != text:
        atomic_write_text(path, new)
    return n


def report(study) -> Dict:
    """Every table of ``study`` from its committed run files; prints the markdown."""
    res = Path(study.results_dir)
    res = res if res.is_absolute() else Path(__file__).resolve().parents[2] / res
    runs = load_runs(res)
    out: Dict = {"tune": {}, "study": {}}
    for mode in ("mixed", "sequential"):
        t = tune_table(runs, mode, res)
        if t:
            out["tune"][mode] = t
            print((res / f"tune_{mode}.md").read_text())
        spec = study.study.get(mode)
        fams = study.get("families")
        s = study_table(runs, mode, list(spec.methods) if spec else [], list(study.baselines),
                        res, {k: list(v) for k, v in fams.items()} if fams else None,
                        seeds=list(spec.get("seeds") or []) if spec else None,
                        forward=bool(spec.get("forward", True)) if spec else False)
        if s:
            out["study"][mode] = s
            print((res / f"study_{mode}.md").read_text())
            a = agreement_table(runs, mode, list(s["rows"]), res)
            if a:
                out.setdefault("agreement", {})[mode] = a
    fr = frontier_table(runs, res, choices=choices_from(runs, "sequential"))
    if fr:
        out["frontier"] = fr
        print((res / "frontier_sequential.md").read_text())
    if out["study"]:
        head = ["# The paper's claims at this budget", "",
                "Built by `python -m badit_exp.study report` from the study's pairs "
                "(`study_<mode>.md`): a claim is supported or contradicted only when the paired "
                "95% interval excludes 0 and every seed agrees (Forget: lower is less "
                "forgetting). Rates tuned on the hold-out, never on test.", ""]
        table = claims_table(out["study"], {m: len(study.study[m].get("seeds") or [])
                                            for m in out["study"] if study.study.get(m)},
                             out.get("frontier"))
        atomic_write_text(res / "claims.md", "\n".join(head + table) + "\n")
        print((res / "claims.md").read_text())
    atomic_write_json(res / "study.json", _clean(out))
    root = Path(__file__).resolve().parents[2]
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        update_doc_tables(doc, study.get("name", ""), res)
    return out


def _clean(obj):
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj
