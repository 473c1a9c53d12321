"""Tuned studies (SPEC section 9): ``python -m badit_exp.study {tune,run,all,report}``.

A study is a file ``conf/study/<name>.yaml``: the experiment its tuning runs use (evaluated on a
hold-out of train.json), the experiment its test runs use, each method's first learning-rate
grid per training mode, and the methods and seeds of the study.

- ``tune`` runs each method's grid (``workers`` runs at a time, each a plain ``python -m
  badit_exp.train`` process), and while the best rate sits at a grid edge adds the next rate on
  the 1-3-10 ladder (:func:`badit_exp.tuning.ladder_step`), up to ``tune.max_extensions``. After
  every finished run it rewrites the choices file ``<results_dir>/lr_choices.yaml``.
- ``run`` trains every (method, seed) of the study at its chosen rate and scores it on test.
- ``all`` does both in one schedule: a method's study runs start as soon as its tuning is
  settled, filling the workers that a grid extension of another method would leave idle.
- ``report`` builds the tables (tuning curve and choices, the study with paired bootstrap
  intervals) and the learning-rate figure from the committed files alone.

Each finished run's ``metrics.json`` and per-example scores are copied into
``<results_dir>/runs/<id>/`` (commit them); a run found there is never run again, so a session on
a new machine continues from what is committed. An unfinished run resumes from its checkpoint
under ``output_dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from badit_exp import study_report as R
from badit_exp import tuning as T
from badit_exp.compose import CONF_DIR

REPO = Path(CONF_DIR).parent


def load_study(name: str):
    p = Path(CONF_DIR) / "study" / f"{name}.yaml"
    if not p.is_file():
        have = sorted(x.stem for x in (Path(CONF_DIR) / "study").glob("*.yaml"))
        raise SystemExit(f"study {name!r}: no {p}; studies: {have}")
    return OmegaConf.load(p)


def _path(p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else REPO / q


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: a tuning run (``split="holdout"``) or a test run."""

    split: str  # holdout | test
    mode: str
    method: str
    lr: float
    seed: int

    @property
    def id(self) -> str:
        return f"{self.split}-{self.mode}-{self.method}-lr{T.fmt_lr(self.lr)}-seed{self.seed}"

    def command(self, study) -> List[str]:
        exp = study.tune_experiment if self.split == "holdout" else study.study_experiment
        return [sys.executable, "-m", "badit_exp.train", f"experiment={exp}",
                f"method={self.method}", f"training_mode={self.mode}", f"seed={self.seed}",
                f"trainer.lr={self.lr!r}", f"trainer.num_threads={study.threads}",
                f"run_name={self.id}",
                f"hydra.run.dir={_path(study.output_dir) / 'runs' / self.id}"]


def finished(study, spec: RunSpec) -> Optional[Dict]:
    p = _path(study.results_dir) / "runs" / spec.id / "metrics.json"
    return json.loads(p.read_text()) if p.is_file() else None


# ---------------------------------------------------------------------------- scheduling
class Pool:
    """``workers`` training processes at a time; each finished run is collected at once."""

    def __init__(self, study, dry_run: bool = False):
        self.study, self.dry = study, dry_run
        self.running: Dict[RunSpec, Tuple[subprocess.Popen, float]] = {}
        self.failed: List[RunSpec] = []
        self.logs = _path(study.output_dir) / "logs"

    def start(self, spec: RunSpec) -> None:
        cmd = spec.command(self.study)
        print(f"[study] start {spec.id}: {' '.join(cmd[1:])}", flush=True)
        if self.dry:
            return
        self.logs.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(self.study.threads),
                   MKL_NUM_THREADS=str(self.study.threads), TQDM_DISABLE="1")
        log = open(self.logs / f"{spec.id}.log", "a")
        self.running[spec] = (subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                               env=env), time.time())

    def wait_one(self) -> Optional[RunSpec]:
        """Block until a run ends; collect it (or record its failure) and return it."""
        while self.running:
            for spec, (proc, t0) in list(self.running.items()):
                if proc.poll() is None:
                    continue
                del self.running[spec]
                run_dir = _path(self.study.output_dir) / "runs" / spec.id
                if proc.returncode == 0 and (run_dir / "metrics.json").exists():
                    R.collect(run_dir, _path(self.study.results_dir) / "runs" / spec.id)
                    print(f"[study] done {spec.id} in {(time.time() - t0) / 60:.1f} min",
                          flush=True)
                else:
                    self.failed.append(spec)
                    print(f"[study] FAILED {spec.id} (exit {proc.returncode}); log: "
                          f"{self.logs / (spec.id + '.log')}", flush=True)
                return spec
            time.sleep(5)
        return None

    @property
    def free(self) -> bool:
        return self.dry or len(self.running) < self.study.workers


CHOICES_HEADER = """\
# The learning rate of each method per training mode, chosen by `python -m badit_exp.study tune`
# on the hold-out carved from train.json (never on test): the rate with the best mean hold-out
# ROUGE-L over tasks; `interior: false` means the best sits at the grid's edge (extend the grid).
# `lr_by_target_loss` is the rate the hold-out target loss would have picked. The study's runs
# read their rate from here (conf/experiment/{study}.yaml).
"""


def write_choice_file(study) -> Dict[str, Dict[str, T.Choice]]:
    runs = R.load_runs(_path(study.results_dir))
    by_mode = {mode: R.choices_from(runs, mode) for mode in ("mixed", "sequential")}
    T.write_choices(_path(study.results_dir) / "lr_choices.yaml",
                    [c for cs in by_mode.values() for c in cs.values()],
                    CHOICES_HEADER.format(study=study.study_experiment))
    return by_mode


def tune(study, mode: str, methods: Sequence[str], dry_run: bool = False) -> int:
    """Run each method's grid, extend it while its best is at an edge, write the choices."""
    return tune_and_run(study, mode, methods, [], dry_run)


def tune_and_run(study, mode: str, methods: Sequence[str], seeds: Sequence[int],
                 dry_run: bool = False) -> int:
    """Tune each method (:func:`tune`), and start its study runs (every seed, scored on test)
    as soon as its tuning is settled: no tuning run of it queued or running, and its best rate
    interior or its extensions spent. Tuning runs go first; study runs fill the workers a
    tuning queue leaves idle (e.g. while one method's grid is being extended). A method whose
    tuning run failed gets no study runs."""
    grids = study.tune.grids[mode]
    unknown = [m for m in methods if m not in grids]
    if unknown:
        raise SystemExit(f"no tuning grid for {unknown} in conf/study/{study.name}.yaml "
                         f"tune.grids.{mode}; add one (1-3-10 ladder around the expected rate).")
    seed = int(study.tune.seed)
    pool = Pool(study, dry_run)
    # interleave methods so every method's curve fills in early
    queue = [RunSpec("holdout", mode, m, float(grids[m][i]), seed)
             for i in range(max(len(grids[m]) for m in methods)) for m in methods
             if i < len(grids[m])]
    tests = [(m, int(s)) for s in seeds for m in methods]
    extensions = {m: 0 for m in methods}
    by_mode = {mode: R.choices_from(R.load_runs(_path(study.results_dir)), mode)}
    dry_started: List[RunSpec] = []  # dry run: the tuning runs it would start

    def settled(m: str) -> Optional[T.Choice]:
        if any(sp.method == m and sp.split == "holdout"
               for sp in queue + list(pool.running) + pool.failed + dry_started):
            return None
        c = by_mode[mode].get(m)
        if c is None or (c.edge and extensions[m] < study.tune.max_extensions):
            return None
        return c

    def next_spec() -> Optional[RunSpec]:
        while queue:
            sp = queue.pop(0)
            if finished(study, sp) is None:
                return sp
        for m, sd in list(tests):
            c = settled(m)
            if c is None:
                continue
            tests.remove((m, sd))
            sp = RunSpec("test", mode, m, c.lr, sd)
            if finished(study, sp) is None and sp not in pool.running:
                if c.edge:
                    print(f"[study] WARNING: {m}'s {mode} rate {T.fmt_lr(c.lr)} is still at "
                          f"the {c.edge} edge after {extensions[m]} extensions", flush=True)
                return sp
        return None

    while True:
        while pool.free:
            sp = next_spec()
            if sp is None:
                break
            pool.start(sp)
            if dry_run and sp.split == "holdout":
                dry_started.append(sp)
        if dry_run or not pool.running:
            break
        ended = pool.wait_one()
        if ended is None or ended.split != "holdout":
            continue
        by_mode = write_choice_file(study)
        m = ended.method
        pending = [s for s in queue + list(pool.running) if s.method == m]
        c = by_mode[mode].get(m)
        if c is not None and not pending and c.edge and extensions[m] < study.tune.max_extensions:
            nxt = T.next_rate(c)
            extensions[m] += 1
            print(f"[study] {m}: best {T.fmt_lr(c.lr)} is at the {c.edge} edge of "
                  f"{[T.fmt_lr(x) for x in c.grid]}; adding {T.fmt_lr(nxt)}", flush=True)
            queue.insert(0, RunSpec("holdout", mode, m, nxt, seed))
    if not dry_run:
        by_mode = write_choice_file(study)
        for m in methods:
            c = by_mode[mode].get(m)
            if c is not None:
                print(f"[study] {mode} {m}: lr {T.fmt_lr(c.lr)} (hold-out ROUGE-L {c.score:.2f}"
                      f"{', AT THE ' + c.edge.upper() + ' EDGE' if c.edge else ''})")
    return 1 if pool.failed else 0


def run_study(study, mode: str, methods: Sequence[str], seeds: Sequence[int],
              dry_run: bool = False, allow_edge: bool = False) -> int:
    """Every (method, seed) at its chosen rate, scored on test. A rate at its grid's edge
    means the tuning is unfinished: refused unless ``allow_edge``."""
    choices = T.read_choices(_path(study.results_dir) / "lr_choices.yaml").get(mode, {})
    missing = [m for m in methods if m not in choices]
    if missing:
        raise SystemExit(f"no tuned rate for {missing} in {mode} mode; run "
                         f"`python -m badit_exp.study tune --mode {mode} --methods "
                         f"{','.join(missing)}` first.")
    edge = [m for m in methods if not choices[m].get("interior", True)]
    if edge and not allow_edge:
        raise SystemExit(
            f"the {mode} rate of {edge} is at the edge of its grid "
            + ", ".join(f"{m}: {T.fmt_lr(float(choices[m]['lr']))} of "
                        f"{[T.fmt_lr(float(x)) for x in choices[m].get('grid', [])]}"
                        for m in edge)
            + f"; finish the tuning (`python -m badit_exp.study tune --mode {mode} --methods "
            f"{','.join(edge)}` adds rates until the best is interior), or pass --allow-edge "
            "when its extensions are spent.")
    if edge:
        print(f"[study] WARNING: the rate of {edge} is at its grid's edge (--allow-edge)")
    pool = Pool(study, dry_run)
    queue = [RunSpec("test", mode, m, float(choices[m]["lr"]), int(s))
             for s in seeds for m in methods]
    while queue or pool.running:
        while queue and pool.free:
            spec = queue.pop(0)
            if finished(study, spec) is None:
                pool.start(spec)
        if dry_run:
            break
        pool.wait_one()
    return 1 if pool.failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m badit_exp.study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["tune", "run", "all", "report"],
                    help="all: tune, then each method's study runs as soon as its rate is "
                         "settled (no core idles while another method's grid is extended)")
    ap.add_argument("--study", default="study2_cpu", help="conf/study/<name>.yaml")
    ap.add_argument("--mode", default="mixed", choices=["mixed", "sequential"])
    ap.add_argument("--methods", default="", help="comma list (default: the study's)")
    ap.add_argument("--seeds", default="", help="comma list (run; default: the study's)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--allow-edge", action="store_true",
                    help="run: accept a rate at its grid's edge (tuning extensions spent)")
    a = ap.parse_args(argv)
    study = load_study(a.study)
    if a.action == "report":
        R.report(study)
        return 0
    if a.action == "tune":
        methods = a.methods.split(",") if a.methods else list(study.study[a.mode].methods)
        return tune(study, a.mode, methods, a.dry_run)
    spec = study.study[a.mode]
    methods = a.methods.split(",") if a.methods else list(spec.methods)
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else list(spec.seeds)
    if a.action == "all":
        return tune_and_run(study, a.mode, methods, seeds, a.dry_run)
    return run_study(study, a.mode, methods, seeds, a.dry_run, a.allow_edge)


if __name__ == "__main__":
    sys.exit(main())
