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
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from badit_exp import executors as X
from badit_exp import study_plan as P
from badit_exp import study_report as R
from badit_exp import tuning as T
from badit_exp.compose import CONF_DIR, load

REPO = Path(CONF_DIR).parent


def load_study(name: str):
    """``conf/study/<name>.yaml``, or a study file's path."""
    p = Path(name) if name.endswith((".yaml", ".yml")) else Path(CONF_DIR) / "study" / f"{name}.yaml"
    if not p.is_file():
        have = sorted(x.stem for x in (Path(CONF_DIR) / "study").glob("*.yaml"))
        raise SystemExit(f"study {name!r}: no {p}; studies: {have} (or give a study file's path)")
    study = OmegaConf.load(p)
    study.setdefault("name", p.stem)
    return study


def _path(p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else REPO / q


@dataclass(frozen=True, eq=False)
class RunSpec:
    """One run of a study: a tuning run (``split="holdout"``) or a test run. Two specs are the
    same run when their ids are (a rate is compared as the id writes it)."""

    split: str  # holdout | test
    mode: str  # mixed | sequential | single (a_{t,0} for Forward, at a compared mode's rate)
    method: str
    lr: float
    seed: int

    @property
    def id(self) -> str:
        return f"{self.split}-{self.mode}-{self.method}-lr{T.fmt_lr(self.lr)}-seed{self.seed}"

    def __eq__(self, other) -> bool:
        return isinstance(other, RunSpec) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    @classmethod
    def from_id(cls, run_id: str) -> Optional["RunSpec"]:
        """The spec of an ``id`` (None when it is not one)."""
        m = re.fullmatch(r"(holdout|test)-(mixed|sequential|single)-(.+)-lr([0-9.e+-]+)-seed(\d+)",
                         run_id)
        if not m:
            return None
        return cls(m[1], m[2], m[3], float(m[4]), int(m[5]))

    def command(self, study) -> List[str]:
        exp = study.tune_experiment if self.split == "holdout" else study.study_experiment
        return [sys.executable, "-m", "badit_exp.train", f"experiment={exp}",
                f"method={self.method}", f"training_mode={self.mode}", f"seed={self.seed}",
                f"trainer.lr={self.lr!r}",
                *([f"trainer.num_threads={study.threads}"] if study.get("threads") else []),
                f"run_name={self.id}", *[str(x) for x in study.get("overrides") or []],
                f"hydra.run.dir={_path(study.output_dir) / 'runs' / self.id}"]


def forward_runs(study, mode: str) -> bool:
    """Whether the study runs the single-task runs that Forward needs in ``mode``
    (``study.<mode>.forward``, default true)."""
    return bool(OmegaConf.select(study, f"study.{mode}.forward", default=True))


def finished(study, spec: RunSpec) -> Optional[Dict]:
    """The committed metrics of ``spec``; None when it has none, or when they lack a key the
    study now requires of its mode (``requires.<mode>``: dotted keys, e.g. ``matrix.loss``):
    such a run is run again and its files replaced (the old ones stay in git's history)."""
    p = _path(study.results_dir) / "runs" / spec.id / "metrics.json"
    if not p.is_file():
        return None
    m = json.loads(p.read_text())
    for key in OmegaConf.select(study, f"requires.{spec.mode}", default=None) or []:
        node = m
        for part in str(key).split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return None
    return m


# ---------------------------------------------------------------------------- scheduling
class Pool:
    """At most ``workers`` runs in flight, each a submitit job of the study's executor
    (:mod:`badit_exp.executors`: ``local`` processes here, ``slurm`` jobs on a cluster); each
    finished run is collected at once.

    Jobs are recorded in ``<output_dir>/jobs/``: a new controller attaches to the ones still
    running instead of starting them again, and collects the ones that finished while no
    controller watched. A failed run is started again at most ``executor.retries`` times, then
    reported with its job id and log and left failed (``study status`` lists it).

    ``scope`` (a predicate on a run) is the controller's own selection: it attaches only to the
    recorded jobs inside it, so two controllers over disjoint selections (``--mode`` /
    ``--methods``) can share one study without either waiting on the other's runs."""

    def __init__(self, study, dry_run: bool = False, executor: Optional[str] = None,
                 scope: Optional[Callable[["RunSpec"], bool]] = None):
        self.study, self.dry = study, dry_run
        self.scope = scope
        self.running: Dict[RunSpec, Tuple[object, float]] = {}
        self.failed: List[RunSpec] = []
        out = _path(study.output_dir)
        self.logs, self.jobs_dir = out / "logs", out / "jobs"
        ecfg = study.get("executor") or {}
        self.res = X.resources(ecfg, executor or ecfg.get("name", "local"), int(study.get("threads") or 0))
        self.retries = int(ecfg.get("retries", 1))
        self.workers = int(ecfg.get("max_jobs", study.workers)) if self.res.name == "slurm" \
            else int(study.workers)
        self._executor = None
        self.records: Dict[str, X.JobRecord] = {}
        if not dry_run:
            self._reattach()

    # -- what a run is --------------------------------------------------------------------
    def command(self, spec: RunSpec) -> List[str]:
        cmd = spec.command(self.study)
        dist = (self.study.get("executor") or {}).get("distributed", "zero2")
        if self.res.name == "slurm" and self.res.tasks > 1:
            cmd.append(f"distributed={dist}")
        return cmd

    def env(self) -> Dict[str, str]:
        t = self.study.get("threads")
        env = {"TQDM_DISABLE": "1"}
        if t:
            env.update(OMP_NUM_THREADS=str(t), MKL_NUM_THREADS=str(t))
        return env

    def run_dir(self, spec: RunSpec) -> Path:
        return _path(self.study.output_dir) / "runs" / spec.id

    # -- controller restart -----------------------------------------------------------------
    def _reattach(self) -> None:
        for rec in X.read_records(self.jobs_dir):
            self.records[rec.run_id] = rec
            sp = RunSpec.from_id(rec.run_id)
            if sp is not None and self.scope is not None and not self.scope(sp):
                continue  # another controller's run
            if rec.state != "submitted" or sp is None or finished(self.study, sp):
                if rec.state == "failed" and sp is not None and not finished(self.study, sp) \
                        and rec.attempt > self.retries:
                    self.failed.append(sp)
                continue
            job = X.attach(rec)
            print(f"[study] attached {rec.executor} job {rec.job_id} of {rec.run_id} "
                  f"(attempt {rec.attempt})", flush=True)
            self.running[sp] = (job, rec.submitted)

    # -- the pool -----------------------------------------------------------------------------
    def start(self, spec: RunSpec) -> None:
        if spec in self.running:  # attached after a restart: already in flight
            return
        cmd = self.command(spec)
        print(f"[study] start {spec.id}: {' '.join(cmd[1:])}", flush=True)
        if self.dry:
            return
        if self._executor is None:
            self._executor = X.make_executor(self.res, _path(self.study.output_dir) / "submitit",
                                             f"{self.study.name}")
        if self.res.name == "slurm":
            self._executor.update_parameters(name=f"{self.study.name}:{spec.id}")
        log = self.logs / f"{spec.id}.log"
        job = self._executor.submit(X.TrainJob(cmd, str(REPO), self.env(), str(log),
                                               str(self.run_dir(spec))))
        prev = self.records.get(spec.id)
        rec = X.JobRecord(spec.id, self.res.name, str(job.job_id), str(job.paths.folder),
                          str(log), attempt=(prev.attempt + 1) if prev and prev.state == "failed"
                          else 1, submitted=time.time())
        rec.save(self.jobs_dir)
        self.records[spec.id] = rec
        self.running[spec] = (job, rec.submitted)

    def wait_one(self) -> Optional[RunSpec]:
        """Block until a run ends for good; collect it (or record its failure, after its
        retries) and return it."""
        while self.running:
            for spec, (job, t0) in list(self.running.items()):
                if X.job_state(job) == "running":
                    continue
                del self.running[spec]
                rec = self.records[spec.id]
                run_dir = self.run_dir(spec)
                err = "" if (run_dir / "metrics.json").exists() else (X.job_error(job)
                                                                       or "no metrics.json")
                if not err:
                    R.collect(run_dir, _path(self.study.results_dir) / "runs" / spec.id)
                    rec.state = "finished"
                    rec.save(self.jobs_dir)
                    print(f"[study] done {spec.id} in {(time.time() - t0) / 60:.1f} min",
                          flush=True)
                    return spec
                rec.state, rec.error = "failed", err
                rec.save(self.jobs_dir)
                print(f"[study] FAILED {spec.id} ({rec.executor} job {rec.job_id}, attempt "
                      f"{rec.attempt} of {self.retries + 1}): {err}; log: {rec.log}", flush=True)
                if rec.attempt <= self.retries:
                    self.start(spec)
                    continue
                self.failed.append(spec)
                return spec
            time.sleep(5)
        return None

    @property
    def free(self) -> bool:
        return self.dry or len(self.running) < self.workers


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


def selection(mode: str, methods: Sequence[str]) -> Callable[[RunSpec], bool]:
    """The runs a controller over ``mode`` and ``methods`` owns: theirs in that mode, and their
    single-task runs (shared by both modes where the tuned rates agree)."""
    ms = set(methods)
    return lambda sp: sp.method in ms and sp.mode in (mode, "single")


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
    pool = Pool(study, dry_run, scope=selection(mode, methods))
    forward = forward_runs(study, mode)
    by_mode = {mode: R.choices_from(R.load_runs(_path(study.results_dir)), mode)}
    # extensions already made (by an earlier controller): the committed rates off the grid
    extra = {m: [x for x in (by_mode[mode][m].grid if m in by_mode[mode] else [])
                 if all(abs(x - float(y)) > 1e-9 * x for y in grids[m])] for m in methods}
    extensions = {m: len(extra[m]) for m in methods}
    # interleave methods so every method's curve fills in early; the committed extensions
    # belong to the grid too (a run the study now requires again is rerun at them as well)
    full = {m: [float(x) for x in grids[m]] + extra[m] for m in methods}
    queue = [RunSpec("holdout", mode, m, full[m][i], seed)
             for i in range(max(len(full[m]) for m in methods)) for m in methods
             if i < len(full[m])]
    # each (method, seed)'s test run, then (for Forward) its single-task run at the same rate
    tests = [(m, int(s), "test") for s in seeds for m in methods]
    if forward:
        tests += [(m, int(s), "single") for s in seeds for m in methods]
    dry_started: List[RunSpec] = []  # dry run: the tuning runs it would start

    def extend(m: str) -> None:
        """Queue the next rate of ``m`` when its tuning is done and its best sits at an edge
        (also for a grid an earlier controller finished: a restart must not skip it)."""
        pending = [s for s in queue if s.method == m and finished(study, s) is None] + \
            [s for s in pool.running if s.method == m]
        c = by_mode[mode].get(m)
        if c is not None and not pending and c.edge and extensions[m] < study.tune.max_extensions:
            nxt = T.next_rate(c)
            extensions[m] += 1
            print(f"[study] {m}: best {T.fmt_lr(c.lr)} is at the {c.edge} edge of "
                  f"{[T.fmt_lr(x) for x in c.grid]}; adding {T.fmt_lr(nxt)}", flush=True)
            queue.insert(0, RunSpec("holdout", mode, m, nxt, seed))

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
            if finished(study, sp) is None and sp not in pool.failed:
                return sp
        for m, sd, kind in list(tests):
            c = settled(m)
            if c is None:
                continue
            tests.remove((m, sd, kind))
            sp = RunSpec("test", mode if kind == "test" else "single", m, c.lr, sd)
            if finished(study, sp) is None and sp not in pool.running and sp not in pool.failed:
                if c.edge:
                    print(f"[study] WARNING: {m}'s {mode} rate {T.fmt_lr(c.lr)} is still at "
                          f"the {c.edge} edge after {extensions[m]} extensions", flush=True)
                return sp
        return None

    for m in methods:
        extend(m)
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
        extend(ended.method)
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
    pool = Pool(study, dry_run, scope=selection(mode, methods))
    queue = [RunSpec("test", mode, m, float(choices[m]["lr"]), int(s))
             for s in seeds for m in methods]
    if forward_runs(study, mode):  # the single-task runs Forward needs
        queue += [RunSpec("test", "single", m, float(choices[m]["lr"]), int(s))
                  for s in seeds for m in methods]
    while queue or pool.running:
        while queue and pool.free:
            spec = queue.pop(0)
            if finished(study, spec) is None and spec not in pool.failed:
                pool.start(spec)
        if dry_run:
            break
        pool.wait_one()
    return 1 if pool.failed else 0


# ---------------------------------------------------------------------------- plan
def est_floor(study) -> float:
    return float(OmegaConf.select(study, "estimate.step_floor_s", default=0.1))


@dataclass
class PlannedRun:
    spec: RunSpec
    kind: str  # tune | test | single
    tuned: bool  # the rate is a placeholder until the tuning chooses it
    command: List[str]
    resources: str
    gpus: int
    hours: float  # wall-clock hours of one run
    gpu_hours: float


def planned(study, mode: str) -> List[Tuple[RunSpec, str, bool]]:
    """Every run of ``mode``: the tuning grid, then per seed each method's test run and its
    single-task run (Forward), at the chosen rate when the committed results have one, else at
    the grid's middle (``tuned`` = True)."""
    out = []
    for sp, kind in planned_runs(study, mode):
        if kind.endswith("?"):
            grid = [float(x) for x in study.tune.grids[mode][sp.method]]
            sp = RunSpec(sp.split, sp.mode, sp.method, grid[len(grid) // 2], sp.seed)
            out.append((sp, kind[:-1], True))
        else:
            out.append((sp, kind, False))
    return out



def build_plan(study, modes: Sequence[str], methods: Optional[Sequence[str]] = None
               ) -> Tuple[List[PlannedRun], Dict]:
    """Every run of ``modes`` (of ``methods`` only, when given) with its validated command and
    cost; and the cost model's facts."""
    pool = Pool(study, dry_run=True)
    est = study.get("estimate") or OmegaConf.create({})
    est = OmegaConf.merge(OmegaConf.create({"step_times": None, "fallback_method": "lora",
                                            "hbm_tb_s": 4.8, "eval_examples_per_batch": 16,
                                            "step_floor_s": 0.1}), est)
    ref = P.reference(_path(est.step_times)) if est.step_times else None
    runs: List[PlannedRun] = []
    cache: Dict = {}
    facts: Dict = {"reference": ref}
    for mode in modes:
        for sp, kind, tuned in planned(study, mode):
            if methods and sp.method not in methods:
                continue
            cmd = pool.command(sp)
            cfg = load(P.run_overrides(cmd))  # composes and validates, as the run will
            key = (sp.split, cfg.data.max_train_per_task, cfg.data.holdout_per_task,
                   cfg.data.max_eval_per_task, cfg.model.name)
            if key not in cache:
                cache[key] = (P.data_tokens(cfg), P.non_embedding_params(cfg))
                facts.setdefault("tokenizer", cache[key][0]["tokenizer"])
                facts["params"] = cache[key][1]
            data, params = cache[key]
            gpus = max(pool.res.gpus, 1) if pool.res.name == "slurm" else 0
            if ref is None:
                hours, gh = float("nan"), float("nan")
            else:
                c = P.run_cost(cfg, sp.mode, data, ref, sp.method, params, max(gpus, 1), est)
                gh = (c["train_s"] + c["eval_s"]) / 3600
                hours = gh / max(gpus, 1)
                facts["compute_gpu_hours"] = facts.get("compute_gpu_hours", 0.0) + (
                    c["compute_s"] + c["eval_s"]) / 3600
            runs.append(PlannedRun(sp, kind, tuned, cmd, pool.res.describe(), gpus, hours, gh))
    return runs, facts


def plan(study, modes: Sequence[str], methods: Optional[Sequence[str]] = None) -> int:
    """Print every run of ``modes`` (of ``methods`` only, when given) with its command,
    resources and estimated GPU-hours, and the GPU-hours per method (by family), so that a
    subset of the study can be priced before it is launched with the same ``--methods``."""
    known = {m for mode in modes for m in (OmegaConf.select(study, f"study.{mode}.methods")
                                            or [])}
    unknown = sorted(set(methods or []) - known)
    if unknown:
        raise SystemExit(f"--methods: {', '.join(unknown)} not in study {study.name} "
                         f"({', '.join(modes)}); its methods: {', '.join(sorted(known))}.")
    runs, facts = build_plan(study, modes, methods)
    ref = facts["reference"]
    print(f"# Plan of study {study.name}: {len(runs)} runs ({', '.join(modes)}"
          + (f"; methods {', '.join(methods)}" if methods else "") + ")\n")
    print("| run | kind | lr | seed | GPUs | est. hours | est. GPU-hours |\n|---|---|---|---|---|---|---|")
    for r in runs:
        lr = T.fmt_lr(r.spec.lr) + (" (tuned)" if r.tuned else "")
        hours = f"{r.hours:.2f} | {r.gpu_hours:.1f}" if ref is not None else "n/a | n/a"
        print(f"| {r.spec.id if not r.tuned else r.spec.id.replace(T.fmt_lr(r.spec.lr), '?')} | "
              f"{r.kind} | {lr} | {r.spec.seed} | {r.gpus} | {hours} |")
    print("\nCommands (each composed and validated):")
    for r in runs:
        print("  " + " ".join(r.command[1:]))
    print(f"\nResources per run: {runs[0].resources if runs else '-'}")
    by_kind: Dict[str, float] = {}
    for r in runs:
        by_kind[r.kind] = by_kind.get(r.kind, 0.0) + r.gpu_hours
    total = sum(by_kind.values())
    ext = int(study.tune.get("max_extensions", 0))
    n_methods = sum(len(study.tune.grids[m]) for m in modes if m in study.tune.grids)
    if ref is None:
        print("\nNo GPU step-time reference (`estimate.step_times`) in this study, so no hours "
              "here: `python -m badit_exp.study status` estimates the time left from the "
              "study's committed runs.")
    else:
        print("\n" + method_hours_table(study, runs))
        print(f"\nEstimated GPU-hours: {total:.0f} in all ("
              + ", ".join(f"{k} {v:.0f}" for k, v in sorted(by_kind.items())) + "); "
              f"up to {ext} extra tuning run(s) per method and mode if a best rate sits at its "
              f"grid's edge ({n_methods} grids).")
        print(f"Source: {ref['path']} ({ref['device']}, {ref['model']}, "
              f"{ref['params'] / 1e6:.0f} M non-embedding parameters, "
              f"{ref['tokens_per_step']} tokens a step), scaled to "
              f"{facts['params'] / 1e9:.2f} B non-embedding parameters (x"
              f"{facts['params'] / ref['params']:.1f}) and each run's training tokens "
              f"(tokenizer: {facts['tokenizer']}); generation from the memory bandwidth; at "
              f"least {est_floor(study)} s per optimizer step per GPU (an assumed floor, "
              "`estimate.step_floor_s`). Compute alone (no floor) would be "
              f"{facts['compute_gpu_hours']:.0f} GPU-hours. The model: "
              "src/badit_exp/study_plan.py and docs/clusters.md.")
    return 0


def method_hours_table(study, runs: Sequence[PlannedRun]) -> str:
    """GPU-hours per method (grouped by the study's ``families``): its tuning and test runs per
    mode, and its single-task runs (Forward) in their own column."""
    fams = {m: f for f, ms in (study.get("families") or {}).items() for m in ms}
    order = list((study.get("families") or {}).keys())
    rows: Dict[str, Dict[str, float]] = {}
    n: Dict[str, int] = {}
    for r in runs:
        rows.setdefault(r.spec.method, {}).setdefault(r.spec.mode, 0.0)
        rows[r.spec.method][r.spec.mode] += r.gpu_hours
        n[r.spec.method] = n.get(r.spec.method, 0) + 1
    modes = [m for m in ("mixed", "sequential", "single") if any(m in v for v in rows.values())]

    def rank(m: str) -> Tuple[int, int]:
        f = fams.get(m)
        return (order.index(f) if f in order else len(order), list(rows).index(m))
    out = ["| family | method | runs | " + " | ".join(f"{m} GPU-h" for m in modes)
           + " | GPU-hours |", "|---|---|---|" + "---|" * (len(modes) + 1)]
    for m in sorted(rows, key=rank):
        out.append(f"| {fams.get(m, '-')} | {m} | {n[m]} | "
                   + " | ".join(f"{rows[m].get(x, 0.0):.0f}" for x in modes)
                   + f" | {sum(rows[m].values()):.0f} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------- status
def planned_runs(study, mode: str) -> List[Tuple[RunSpec, str]]:
    """Every run of ``study`` in ``mode`` as far as the committed results fix it: each method's
    tuning grid and the extensions already made, then, once its rate is chosen, its test run and
    (for Forward) its single-task run per seed; ``(spec, kind)`` with kind tune | test | single.
    A method without a choice yet lists its test runs at rate 0 (kind ``test?``)."""
    spec_cfg = OmegaConf.select(study, f"study.{mode}")
    if spec_cfg is None:
        return []
    methods, seeds = list(spec_cfg.methods), [int(x) for x in spec_cfg.seeds]
    grids = OmegaConf.select(study, f"tune.grids.{mode}", default={}) or {}
    runs = R.load_runs(_path(study.results_dir)) if (_path(study.results_dir) / "runs").is_dir() \
        else []
    choices = R.choices_from(runs, mode)
    tseed = int(study.tune.seed)
    out: List[Tuple[RunSpec, str]] = []
    for m in methods:
        rates = [float(x) for x in grids.get(m, [])]
        done = sorted({r["lr"] for r in runs if r["split"] == "holdout" and r["mode"] == mode
                       and r["method"] == m})
        for x in rates + [x for x in done if all(abs(x - y) > 1e-12 * x for y in rates)]:
            out.append((RunSpec("holdout", mode, m, x, tseed), "tune"))
    for kind in ("test", "single"):
        if kind == "single" and not forward_runs(study, mode):
            continue
        for sd in seeds:
            for m in methods:
                c = choices.get(m)
                if c is None:
                    out.append((RunSpec("test", mode if kind == "test" else "single", m, 0.0,
                                        sd), f"{kind}?"))
                else:
                    out.append((RunSpec("test", mode if kind == "test" else "single", m, c.lr,
                                        sd), kind))
    return out


def status(study, modes: Sequence[str], executor: Optional[str] = None,
           methods: Optional[Sequence[str]] = None) -> List[Dict]:
    """Each run of the study: finished (its files are in ``<results_dir>/runs/``), running /
    pending (a recorded job the executor still runs: submitit asks ``sacct`` on a cluster, the
    process table here), failed (with its job id, attempt and error), or queued; printed as a
    table and returned as rows; ``methods`` keeps those methods' runs only."""
    jobs = {r.run_id: r for r in X.read_records(_path(study.output_dir) / "jobs")}
    rows, seen = [], set()
    for mode in modes:
        for sp, kind in planned_runs(study, mode):
            if methods and sp.method not in methods:
                continue
            if not kind.endswith("?") and sp.id in seen:
                continue  # a single-task run both modes share (the same rate): listed once
            seen.add(sp.id)
            rec = jobs.get(sp.id)
            row = {"run": sp.id if not kind.endswith("?") else f"{sp.split}-{sp.mode}-"
                   f"{sp.method}-lr?-seed{sp.seed}", "kind": kind.rstrip("?"), "mode": mode,
                   "method": sp.method, "lr": T.fmt_lr(sp.lr) if sp.lr else "(tuning)",
                   "seed": sp.seed, "job": rec.job_id if rec else "", "log": rec.log if rec else ""}
            if kind.endswith("?"):
                row["state"] = "waits for its rate"
            elif finished(study, sp) is not None:
                row["state"] = "finished"
            elif rec is None:
                row["state"] = "queued"
            elif rec.state == "failed":
                row["state"] = f"failed (attempt {rec.attempt}): {rec.error}"
            else:
                job = X.attach(rec)
                st = X.job_state(job)
                if st == "running":
                    row["state"] = ("running" if rec.executor == "local"
                                    else X.slurm_state(job).lower())
                else:
                    err = X.job_error(job)
                    row["state"] = (f"ended, not collected{': ' + err if err else ''} (the "
                                    "controller collects it when it runs)")
            rows.append(row)
    counts: Dict[str, int] = {}
    cost = run_costs(study)
    left = 0.0
    for r in rows:
        k = re.split(r"[ ,:(]", r["state"], maxsplit=1)[0]
        counts[k] = counts.get(k, 0) + 1
        kind = r["run"].split("-")[:2]
        est = cost.get((*kind, r["method"])) or cost.get(tuple(kind))
        r["est_min"] = "" if est is None or k == "finished" else f"{est:.0f}"
        left += (est or 0.0) if k != "finished" else 0.0
    head = ["run", "state", "lr", "seed", "est_min", "job", "log"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in head) + " |")
    print("\n" + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f" ({len(rows)} runs)")
    n_left = len(rows) - counts.get("finished", 0)
    unknown = sum(1 for r in rows if r["state"] != "finished" and not r["est_min"])
    if n_left:
        workers = int(study.workers)
        print(f"left: {n_left} runs, about {left / 60:.1f} process-hours ({left / 60 / workers:.1f} "
              f"h of wall time at {workers} runs at a time), each run estimated by the committed "
              "runs' training + evaluation time of the same kind (split, mode) and method, else "
              "of the same kind" + (f"; {unknown} runs of a kind with no committed run are not "
                                    "counted" if unknown else "")
              + "; grid extensions of a rate at an edge are not counted")
    return rows


def run_costs(study) -> Dict[Tuple, float]:
    """Minutes of training + evaluation per committed run, averaged by (split, mode, method)
    and by (split, mode): what ``status`` estimates the runs left with."""
    acc: Dict[Tuple, List[float]] = {}
    for m in sorted((_path(study.results_dir) / "runs").glob("*/metrics.json")):
        sp = RunSpec.from_id(m.parent.name)
        if sp is None:
            continue
        try:
            timing = json.loads(m.read_text()).get("timing") or {}
        except (OSError, ValueError):
            continue
        mins = sum(t.get("train_s", 0) + t.get("eval_s", 0) for t in timing.values()) / 60
        for key in ((sp.split, sp.mode, sp.method), (sp.split, sp.mode)):
            acc.setdefault(key, []).append(mins)
    return {k: sum(v) / len(v) for k, v in acc.items()}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m badit_exp.study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["tune", "run", "all", "report", "status", "plan"],
                    help="all: tune, then each method's study runs as soon as its rate is "
                         "settled (no worker idles while another method's grid is extended); "
                         "status: every run of the study, finished / running / queued / failed "
                         "with its job id and log; plan: every run it would launch with its "
                         "command, resources and estimated GPU-hours (nothing is started)")
    ap.add_argument("--study", default="study2_cpu", help="conf/study/<name>.yaml")
    ap.add_argument("--mode", default=None, choices=["mixed", "sequential"],
                    help="default: mixed (tune/run/all), both (status/plan)")
    ap.add_argument("--executor", default=None, choices=list(X.EXECUTORS),
                    help="where runs execute (default: the study's executor.name, else local): "
                         "local = processes on this machine, slurm = one job per run through "
                         "submitit")
    ap.add_argument("--methods", default="",
                    help="comma list (default: the study's); plan and status list only these")
    ap.add_argument("--seeds", default="", help="comma list (run; default: the study's)")
    ap.add_argument("--workers", type=int, default=None,
                    help="runs at a time for this controller (default: the study's workers); "
                         "two controllers over disjoint --mode/--methods selections, each with "
                         "--workers 1, share a study")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--allow-edge", action="store_true",
                    help="run: accept a rate at its grid's edge (tuning extensions spent)")
    a = ap.parse_args(argv)
    study = load_study(a.study)
    if a.executor:
        OmegaConf.update(study, "executor.name", a.executor, force_add=True)
    if a.workers is not None:
        if a.workers < 1:
            raise SystemExit(f"--workers {a.workers}: give 1 or more runs at a time.")
        OmegaConf.update(study, "workers", a.workers, force_add=True)
    try:
        X.resources(study.get("executor") or {},
                    OmegaConf.select(study, "executor.name", default="local"), int(study.get("threads") or 0))
    except X.ExecutorError as e:
        raise SystemExit(f"conf/study/{a.study}.yaml: {e}") from None
    if a.action == "report":
        R.report(study)
        return 0
    modes = [a.mode] if a.mode else [m for m in ("mixed", "sequential") if m in study.study]
    if a.action == "status":
        status(study, modes, methods=a.methods.split(",") if a.methods else None)
        return 0
    if a.action == "plan":
        return plan(study, modes, a.methods.split(",") if a.methods else None)
    a.mode = a.mode or "mixed"
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
