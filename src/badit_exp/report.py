"""Gather runs into Table-1-style tables: ``python -m badit_exp.report <dirs...> [--out DIR]``.

Every ``metrics.json`` under the given directories (run dirs, sweep dirs, ``outputs/``) is
read; runs are grouped by model x method x mode AND by the rest of their config (everything
but the seed, the seed-derived task order, paths, logging and resume flags), so runs with
different settings are never averaged together: they become separate rows with a ``variant``
tag naming the differing keys. Each metric of SPEC section 3 is reported as mean ± sample std
over seeds, with the paper's number (SPEC section 7) beside it when the run is at paper scale.
Writes ``report.md``, ``report.tex`` and ``report.json`` to ``--out`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import OmegaConf

from badit_exp.compose import CONF_DIR
from badit_exp.config import is_result_neutral
from badit_exp.io_utils import flatten
from badit_exp.metrics import METRIC_NAMES

METRICS = list(METRIC_NAMES)
# keys that differ between the seeds of one row (the seed-derived task order, the run's name)
PER_SEED = ("seed", "run_name", "task_order", "training_mode.single_results")

# SPEC section 7, Table 1: model -> method -> (mixed rouge, seq rouge, seq forget, seq backward)
PAPER = {
    "qwen3-8b": {"lora": (54.22, 47.08, 9.21, -8.11), "olora": (54.53, 48.57, 8.73, -6.78),
                 "loramoe": (54.64, 48.07, 8.47, -6.23), "pissa": (53.57, 47.69, 7.50, -6.83),
                 "gainlora": (54.33, 48.44, 8.96, -6.42), "badit": (55.87, 50.86, 6.95, -5.43)},
    "qwen3-4b": {"lora": (53.31, 48.54, 8.53, -6.68), "olora": (53.50, 47.83, 8.78, -6.47),
                 "loramoe": (53.63, 48.58, 8.50, -6.25), "pissa": (52.87, 48.26, 8.05, -6.12),
                 "gainlora": (53.24, 48.07, 8.47, -6.23), "badit": (55.22, 50.74, 5.95, -4.21)},
    "llama3-8b": {"lora": (52.58, 44.88, 12.41, -10.23), "olora": (52.89, 45.25, 11.45, -10.01),
                  "loramoe": (52.95, 45.47, 11.78, -9.71), "pissa": (52.88, 45.23, 12.54, -10.67),
                  "gainlora": (52.71, 45.04, 12.70, -10.94), "badit": (54.75, 48.83, 8.57, -3.49)},
    "llama3-3b": {"lora": (50.07, 45.14, 9.79, -4.91), "olora": (49.83, 45.59, 10.07, -5.95),
                  "loramoe": (49.72, 46.20, 8.58, -3.51), "pissa": (49.64, 45.49, 9.13, -5.27),
                  "gainlora": (49.60, 45.34, 9.67, -5.66), "badit": (51.45, 48.13, 6.25, -2.57)},
    "gemma2-9b": {"lora": (55.16, 46.80, 10.46, -9.38), "olora": (54.78, 46.05, 11.20, -13.57),
                  "loramoe": (54.78, 46.98, 11.99, -10.11), "pissa": (54.20, 44.93, 12.27, -14.80),
                  "gainlora": (54.29, 46.51, 12.62, -10.80), "badit": (57.35, 48.34, 10.31, -8.45)},
    "gemma2-2b": {"lora": (51.72, 43.16, 13.21, -11.28), "olora": (51.82, 44.93, 10.94, -10.55),
                  "loramoe": (51.36, 43.88, 11.66, -9.95), "pissa": (50.96, 42.57, 12.74, -10.57),
                  "gainlora": (51.26, 44.16, 11.81, -10.27), "badit": (53.60, 46.76, 9.30, -7.65)},
}


def _keep(key: str) -> bool:
    return not is_result_neutral(key) and not any(key == i or key.startswith(i + ".")
                                                  for i in PER_SEED)


def scale_name(cfg: Dict) -> Optional[str]:
    """The run's scale (``scale.name`` of its config; None for runs without one)."""
    return (cfg.get("scale") or {}).get("name")


def paper_scale(cfg: Dict) -> bool:
    """The run is at ``scale=paper`` and no budget key of conf/scale/paper.yaml was changed
    on the command line (its numbers may then be set beside the paper's), on all 15 tasks."""
    if scale_name(cfg) != "paper":
        return False
    budget = flatten(OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "scale" / "paper.yaml")))
    run = flatten(cfg)
    return (all(run.get(k) == v for k, v in budget.items() if not k.startswith("scale."))
            and len(cfg.get("data", {}).get("tasks", [])) == 15)


def paper_value(model: str, method: str, mode: str, metric: str) -> Optional[float]:
    row = PAPER.get(model, {}).get(method)
    if row is None:
        return None
    if mode == "mixed":
        return row[0] if metric == "rouge" else None
    if mode == "sequential":
        return {"rouge": row[1], "forget_rate": row[2], "backward": row[3]}.get(metric)
    return None


def collect(dirs: List[Path]) -> List[Dict]:
    runs = []
    for d in dirs:
        files = [d] if d.is_file() else sorted(d.rglob("metrics.json"))
        for f in files:
            try:
                m = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                print(f"skipping unreadable {f}", file=sys.stderr)
                continue
            if "config" in m and "mode" in m:
                m["_path"] = str(f.parent)
                runs.append(m)
    return runs


def global_batch(run: Dict) -> int:
    """Examples per optimizer step: per-device batch x accumulation x processes (runs written
    before ``parallel`` was recorded ran in one process)."""
    if "parallel" in run:
        return int(run["parallel"]["global_batch"])
    t = run["config"].get("trainer", {})
    return int(t.get("per_device_batch_size", 1)) * int(t.get("grad_accum_steps", 1))


def group(runs: List[Dict]) -> List[Dict]:
    """Rows: one per (model, method, mode, config-without-seed)."""
    buckets: Dict[tuple, List[Dict]] = {}
    for r in runs:
        cfg = {k: json.dumps(v, sort_keys=True) for k, v in flatten(r["config"]).items() if _keep(k)}
        cfg["global_batch"] = json.dumps(global_batch(r))
        key = (r["model"], r["method"], r["mode"], json.dumps(cfg, sort_keys=True))
        buckets.setdefault(key, []).append(r)
    rows = []
    by_triple: Dict[tuple, List[tuple]] = {}
    for key in buckets:
        by_triple.setdefault(key[:3], []).append(key)
    for triple, keys in sorted(by_triple.items()):
        cfgs = [json.loads(k[3]) for k in keys]
        differing = sorted({k for c in cfgs for k in c if any(c.get(k) != o.get(k) for o in cfgs)})
        for k, cfg in zip(keys, cfgs):
            members = sorted(buckets[k], key=lambda r: r["seed"])
            variant = ", ".join(f"{d}={json.loads(cfg[d]) if d in cfg else None}" for d in differing)
            row = {"model": triple[0], "method": triple[1], "mode": triple[2], "variant": variant,
                   "seeds": [r["seed"] for r in members], "runs": [r["_path"] for r in members],
                   "lr": members[0]["config"].get("trainer", {}).get("lr"),
                   "scale": scale_name(members[0]["config"]),
                   "paper_scale": paper_scale(members[0]["config"])}
            for m in METRICS:
                vals = [r.get(m) for r in members if r.get(m) is not None]
                row[m] = {"mean": statistics.mean(vals) if vals else None,
                          "std": statistics.stdev(vals) if len(vals) > 1 else None,  # 1 seed: unknown
                          "n": len(vals),
                          "paper": paper_value(triple[0], triple[1], triple[2], m)
                          if row["paper_scale"] else None}
            rows.append(row)
    return rows


def _lr(lr) -> str:
    return "?" if lr is None else f"{float(lr):.0e}".replace("e-0", "e-")


def _cell(c: Dict, tex: bool = False) -> str:
    if c["mean"] is None:
        return "–"
    pm = r"$\pm$" if tex else "±"
    s = f"{c['mean']:.2f} {pm} " + ("?" if c["std"] is None else f"{c['std']:.2f}")
    if c["paper"] is not None:
        s += f" ({c['paper']:.2f})"
    return s


def markdown(rows: List[Dict]) -> str:
    head = ["model", "method", "mode", "variant", "lr", "seeds", *METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["model"], r["method"], r["mode"], r["variant"] or "",
                                          _lr(r["lr"]), ",".join(map(str, r["seeds"])),
                                          *[_cell(r[m]) for m in METRICS]]) + " |")
    lines.append("\nmean ± sample std over seeds ('?': one seed, spread unknown); (paper value, "
                 "SPEC §7) where the run is at paper scale.")
    return "\n".join(lines) + "\n"


def latex(rows: List[Dict]) -> str:
    cols = ["model", "method", "mode", "lr", "seeds", *METRICS]
    out = [r"\begin{tabular}{lllll" + "r" * len(METRICS) + "}", r"\toprule",
           " & ".join(c.replace("_", r"\_") for c in cols) + r" \\", r"\midrule"]
    for r in rows:
        name = r["method"] + (f" [{r['variant']}]" if r["variant"] else "")
        out.append(" & ".join([r["model"], name.replace("_", r"\_"), r["mode"], _lr(r["lr"]),
                               str(len(r["seeds"])), *[_cell(r[m], tex=True) for m in METRICS]])
                   + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def timing(runs: List[Dict]) -> List[Dict]:
    """Table 3: mean total training time per (model, mode, method) and its ratio to LoRAMoE
    (from each run's own ``timing`` record)."""
    acc: Dict[tuple, List[float]] = {}
    for r in runs:
        if r["mode"] == "single":
            continue
        total = sum(t.get("train_s", 0.0) for t in r.get("timing", {}).values())
        acc.setdefault((r["model"], r["mode"], r["method"]), []).append(total)
    rows = []
    for (model, mode, method), v in sorted(acc.items()):
        base = acc.get((model, mode, "loramoe"))
        mean = statistics.mean(v)
        rows.append({"model": model, "mode": mode, "method": method, "train_s": mean, "n": len(v),
                     "ratio_vs_loramoe": mean / statistics.mean(base) if base else None})
    return rows


def timing_markdown(rows: List[Dict]) -> str:
    lines = ["| model | mode | method | runs | train time (s) | vs LoRAMoE (paper: LoRA 0.76x, "
             "PiSSA 0.87x, BADIT 1.22x) |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio_vs_loramoe']:.2f}x" if r["ratio_vs_loramoe"] is not None else "–"
        lines.append(f"| {r['model']} | {r['mode']} | {r['method']} | {r['n']} | {r['train_s']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def _mean(vals: List[float]) -> Optional[float]:
    vals = [v for v in vals if v is not None]
    return statistics.mean(vals) if vals else None


def study(runs: List[Dict], reference: str = "lora") -> List[Dict]:
    """SPEC section 9's table: per method (one mode, one config per method), ROUGE mean ± std
    over seeds with the per-seed values, the target loss of the pre-trained model / at step 0 /
    after training on the fixed slice, the wall time, and the difference to ``reference``
    called measurable only when it exceeds the sum of the two seed standard deviations."""
    rows = group(runs)
    by_path = {r["_path"]: r for r in runs}
    out = []
    for row in rows:
        members = [by_path[p] for p in row["runs"]]
        tl = [m.get("target_loss") or {} for m in members]
        wall = [sum(t.get("train_s", 0.0) + t.get("eval_s", 0.0) for t in m["timing"].values())
                for m in members]
        out.append({"method": row["method"], "model": row["model"], "mode": row["mode"],
                    "variant": row["variant"], "seeds": row["seeds"], "lr": row["lr"],
                    "rouge": row["rouge"]["mean"], "rouge_std": row["rouge"]["std"],
                    "rouge_per_seed": [m.get("rouge") for m in members],
                    "loss_pretrained": _mean([t.get("pretrained") for t in tl]),
                    "loss_step0": _mean([t.get("step0") for t in tl]),
                    "loss_final": _mean([t.get("final") for t in tl]),
                    "wall_s": _mean(wall), "runs": row["runs"]})
    ref = next((r for r in out if r["method"] == reference), None)
    for r in out:
        r["vs_reference"] = None
        if ref is not None and r is not ref and r["rouge"] is not None and ref["rouge"] is not None:
            d = r["rouge"] - ref["rouge"]
            spread = (r["rouge_std"] or 0.0) + (ref["rouge_std"] or 0.0)
            enough = len(r["seeds"]) > 1 and len(ref["seeds"]) > 1
            r["vs_reference"] = {"method": reference, "diff": d, "spread": spread,
                                 "measurable": (abs(d) > spread) if enough else None}
    order = {m: i for i, m in enumerate(STUDY_ORDER)}
    return sorted(out, key=lambda r: (order.get(r["method"], len(order)), r["method"], r["variant"]))


STUDY_ORDER = ["untrained", "lora", "loramoe", "badit_reference", "badit_paper", "badit",
               "badit_anchor", "badit_wo_dog", "badit_wo_bad"]


def study_setting(runs: List[Dict]) -> Dict:
    """The budget and machine the study's runs share (from the first run)."""
    r = runs[0]
    c, prov = r["config"], r.get("provenance", {})
    d, t = c.get("data", {}), c.get("trainer", {})
    return {"model": r["model"], "mode": r["mode"], "scale": scale_name(c),
            "tasks": len(r.get("tasks", [])),
            "train_per_task": d.get("max_train_per_task"), "eval_per_task": d.get("max_eval_per_task"),
            "max_seq_len": d.get("max_seq_len"), "epochs": t.get("epochs"),
            "global_batch": global_batch(r),
            "lr": ("per row" if len({q["config"].get("trainer", {}).get("lr") for q in runs}) > 1
                   else _lr(t.get("lr"))),
            "device": prov.get("device"), "git_commit": prov.get("git_commit"),
            "total_wall_min": sum(sum(x.get("train_s", 0.0) + x.get("eval_s", 0.0)
                                      for x in q["timing"].values()) for q in runs) / 60}


def _device(d: Optional[Dict]) -> str:
    if not d:
        return "?"
    if d.get("type") == "cpu":
        return f"CPU ({d.get('name')}, {d.get('threads')} threads)"
    return f"{d.get('name')} x {d.get('count', 1)}"


def study_markdown(rows: List[Dict], setting: Optional[Dict] = None) -> str:
    def f(x, nd=2):
        return "–" if x is None else f"{x:.{nd}f}"

    head = ["method", "lr", "ROUGE-L (mean ± std)", "per seed", "Δ vs " + next(
        (r["vs_reference"]["method"] for r in rows if r["vs_reference"]), "ref"),
            "target loss: pre-trained / step 0 / final", "wall (min)"]
    lines = []
    if setting:
        lines += [f"{setting['model']}, {setting['mode']}, scale {setting.get('scale')}, {setting['tasks']} tasks x "
                  f"{setting['train_per_task']} training examples, {setting['epochs']} epochs, "
                  f"global batch {setting['global_batch']}, lr {setting['lr']}, "
                  f"{setting['eval_per_task']} test examples per task, prompts <= "
                  f"{setting['max_seq_len']} tokens; device {_device(setting['device'])}; "
                  f"{setting['total_wall_min']:.0f} min of training + evaluation in all; "
                  f"commit {str(setting['git_commit'])[:10]}.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        v = r["vs_reference"]
        vs = "–" if v is None else (f"{v['diff']:+.2f} " + (
            "(one seed: spread unknown)" if v["measurable"] is None else
            "(measurable)" if v["measurable"] else "(within seed spread)"))
        name = r["method"] + (f" [{r['variant']}]" if r["variant"] else "")
        lines.append("| " + " | ".join([
            name, _lr(r["lr"]),
            f"{f(r['rouge'])} ± " + ("?" if r["rouge_std"] is None else f(r["rouge_std"])),
            ", ".join(f(x) for x in r["rouge_per_seed"]), vs,
            f"{f(r['loss_pretrained'], 3)} / {f(r['loss_step0'], 3)} / {f(r['loss_final'], 3)}",
            f(None if r["wall_s"] is None else r["wall_s"] / 60, 1)]) + " |")
    lines.append("\nROUGE-L: mean over the 15 tasks (SPEC 3), mean ± sample std over seeds. A "
                 "difference is called measurable only when it exceeds the sum of the two seed "
                 "standard deviations. Target loss: mean target-token cross-entropy on a fixed "
                 "slice of the training data (trainer.step0_examples), averaged over seeds.")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m badit_exp.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path, help="run / sweep / outputs directories")
    p.add_argument("--out", type=Path, default=None, help="where to write report.* (default: first dir)")
    p.add_argument("--timing", action="store_true",
                   help="Table 3: training-time ratios vs LoRAMoE instead of the metrics table")
    p.add_argument("--study", action="store_true",
                   help="SPEC 9's study table (per-seed values, target losses, wall time, "
                        "difference to --reference) instead of the metrics table")
    p.add_argument("--reference", default="lora", help="the method --study compares with")
    p.add_argument("--name", default="study", help="file stem of the --study outputs")
    a = p.parse_args(argv)
    runs = collect([d for d in a.dirs if d.exists()])
    if not runs:
        print(f"error: no metrics.json under {[str(d) for d in a.dirs]}", file=sys.stderr)
        return 2
    out = a.out or (a.dirs[0] if a.dirs[0].is_dir() else a.dirs[0].parent)
    out.mkdir(parents=True, exist_ok=True)
    if a.timing:
        rows = timing(runs)
        md = timing_markdown(rows)
        (out / "timing.md").write_text(md)
        (out / "timing.json").write_text(json.dumps(rows, indent=2))
        print(md)
        return 0
    if a.study:
        rows = study(runs, a.reference)
        setting = study_setting(runs)
        md = study_markdown(rows, setting)
        (out / f"{a.name}.md").write_text(md)
        (out / f"{a.name}.json").write_text(json.dumps({"setting": setting, "rows": rows},
                                                       indent=2))
        print(md)
        print(f"written: {out}/{a.name}.md, {a.name}.json")
        return 0
    rows = group(runs)
    md = markdown(rows)
    (out / "report.md").write_text(md)
    (out / "report.tex").write_text(latex(rows))
    (out / "report.json").write_text(json.dumps(rows, indent=2))
    print(md)
    print(f"written: {out}/report.md, report.tex, report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
