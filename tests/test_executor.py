"""Issue 27: a study's runs dispatched through submitit. The ``local`` executor end to end on a
tiny study (tuning, test and single-task runs), a run preempted mid-way and resumed from its
checkpoint through submitit's requeue, a controller killed and restarted that starts no run
twice, a failed run retried a bounded number of times; the ``slurm`` executor's submission
(parameters, command, requeue) checked against a fake ``sbatch`` on PATH."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit  # noqa: F401 - imported at collection: its log handlers bind to pytest's
from omegaconf import OmegaConf  # session-wide capture, not to one test's (closed later)

from badit_exp import executors as X
from badit_exp import study as S
from conftest import CACHE, REPO, SLOW, SUPERNI

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="submitit's local executor and the fake sbatch need Linux")


def _study(tmp: Path, **extra) -> Path:
    """A tiny study file: 2 methods x 2 rates of tuning (mixed), 1 seed, Forward runs on."""
    d = {"name": "tiny", "results_dir": str(tmp / "res"), "output_dir": str(tmp / "out"),
         "tune_experiment": "tune_tiny", "study_experiment": "study_tiny", "workers": 2,
         "threads": 1,
         "overrides": [f"data.root={SUPERNI}", f"paths.cache_dir={CACHE}",
                       f"paths.output_dir={tmp / 'out'}", "trainer.epochs=1"],
         "executor": {"name": "local", "retries": 1},
         "tune": {"seed": 1, "max_extensions": 0,
                  "grids": {"mixed": {"lora": [1e-3, 5e-3], "lora_r32": [1e-3, 5e-3]}}},
         "study": {"mixed": {"methods": ["lora", "lora_r32"], "seeds": [1]}},
         "baselines": ["lora_r32"]}
    d.update(extra)
    p = tmp / "tiny.yaml"
    p.write_text(OmegaConf.to_yaml(OmegaConf.create(d)))
    return p


def _starts(log: Path) -> int:
    return log.read_text().count("[job] ") if log.exists() else 0


@SLOW  # about 80 s on 2 idle cores: 8 tiny runs, two controllers
def test_tiny_study_end_to_end_through_the_local_executor_with_a_controller_restart(tmp_path):
    """`study all` through submitit's LocalExecutor: the controller is killed (SIGKILL) while its
    first jobs run and started again; the second controller attaches to the running jobs (no
    run starts twice), collects every run, and `status` says all are finished."""
    f = _study(tmp_path)
    cmd = [sys.executable, "-m", "badit_exp.study", "all", "--study", str(f)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env, start_new_session=True)
    jobs = tmp_path / "out" / "jobs"
    t0 = time.time()
    while len(list(jobs.glob("*.json"))) < 2 and time.time() - t0 < 120:
        time.sleep(0.2)
    assert len(list(jobs.glob("*.json"))) == 2, first.communicate(timeout=5)[0]
    os.kill(first.pid, signal.SIGKILL)  # only the controller: its jobs keep running
    first.wait()
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert out.count("[study] attached local job") >= 1, out[-3000:]
    runs = sorted(p.name for p in (tmp_path / "res" / "runs").iterdir())
    assert runs == sorted(
        [f"holdout-mixed-{m}-lr{x}-seed1" for m in ("lora", "lora_r32") for x in ("1e-3", "5e-3")]
        + [f"test-{k}-{m}-lr{x}-seed1" for k in ("mixed", "single") for m, x in
           (("lora", S.T.fmt_lr(_chosen(tmp_path, "lora"))),
            ("lora_r32", S.T.fmt_lr(_chosen(tmp_path, "lora_r32"))))])
    for r in runs:  # every run started exactly once, with one job record, attempt 1
        assert _starts(tmp_path / "out" / "logs" / f"{r}.log") == 1, r
        rec = X.JobRecord.load(jobs / f"{r}.json")
        assert rec.state == "finished" and rec.attempt == 1
    single = json.loads((tmp_path / "res" / "runs" / runs[-1] / "metrics.json").read_text())
    assert single["mode"] == "single"
    # the report has a Forward column from those single runs
    rep = subprocess.run([sys.executable, "-m", "badit_exp.study", "report", "--study", str(f)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert "Forward [95% CI]" in (tmp_path / "res" / "study_mixed.md").read_text()
    st = subprocess.run([sys.executable, "-m", "badit_exp.study", "status", "--study", str(f)],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert st.returncode == 0 and "8 finished (8 runs)" in st.stdout, st.stdout[-2000:]


def _chosen(tmp: Path, method: str) -> float:
    from badit_exp import tuning as T

    return float(T.read_choices(tmp / "res" / "lr_choices.yaml")["mixed"][method]["lr"])


@SLOW  # about 40 s: one run started twice
def test_a_preempted_run_is_requeued_and_resumes_from_its_checkpoint(tmp_path):
    """submitit's preemption signal (USR2, what SLURM sends the job's tasks on preemption, and
    before the time limit) sent to the running task reaches TrainJob.checkpoint: the training
    process stops, submitit requeues the same command, and the run continues from its in-stage
    checkpoint to the end."""
    study = OmegaConf.load(_study(tmp_path, overrides=[
        f"data.root={SUPERNI}", f"paths.cache_dir={CACHE}", f"paths.output_dir={tmp_path / 'out'}",
        "trainer.epochs=12", "trainer.checkpoint_every_steps=2"]))
    pool = S.Pool(study)
    spec = S.RunSpec("holdout", "mixed", "lora", 5e-3, 1)
    pool.start(spec)
    job, _ = pool.running[spec]
    ckpt = pool.run_dir(spec) / "checkpoints" / "in_stage"
    t0 = time.time()
    while not ckpt.exists() and time.time() - t0 < 180:
        time.sleep(0.1)
    assert ckpt.exists(), (tmp_path / "out" / "logs" / f"{spec.id}.log").read_text()[-3000:]
    # the signal SLURM sends the job's tasks on preemption (submitit's USR2), to the task
    tasks = Path(f"/proc/{job.job_id}/task/{job.job_id}/children").read_text().split()
    assert len(tasks) == 1
    os.kill(int(tasks[0]), X.preemption_signal())
    assert pool.wait_one() == spec and not pool.failed
    log = (tmp_path / "out" / "logs" / f"{spec.id}.log").read_text()
    assert log.count("[job] ") == 2, log[-3000:]  # the first start and the requeued one
    assert "resuming stage 0" in log
    assert (tmp_path / "res" / "runs" / spec.id / "metrics.json").exists()
    assert X.JobRecord.load(tmp_path / "out" / "jobs" / f"{spec.id}.json").attempt == 1


@SLOW  # two runs through submitit (about 20 s on 2 idle cores)
def test_a_failing_run_is_retried_a_bounded_number_of_times_then_reported(tmp_path, capfd):
    study = OmegaConf.load(_study(tmp_path, overrides=["method.rank=-3"]))  # invalid: exits 2
    pool = S.Pool(study)
    spec = S.RunSpec("holdout", "mixed", "lora", 1e-3, 1)
    pool.start(spec)
    assert pool.wait_one() == spec and pool.failed == [spec]
    rec = X.JobRecord.load(tmp_path / "out" / "jobs" / f"{spec.id}.json")
    assert rec.state == "failed" and rec.attempt == 2  # retries: 1
    out = capfd.readouterr().out
    assert out.count("[study] FAILED") == 2 and f"local job {rec.job_id}" in out
    assert "exited with code 2" in rec.error and rec.log.endswith(f"{spec.id}.log")
    # a new controller does not start it again, and status lists it as failed
    again = S.Pool(study)
    assert again.failed == [spec] and not again.running
    rows = S.status(study, ["mixed"])
    row = next(r for r in rows if r["run"] == spec.id)
    assert row["state"].startswith("failed (attempt 2)") and row["job"] == rec.job_id


def test_a_killed_local_job_is_reported_in_words_not_by_submitits_log(tmp_path):
    """A local job whose process is killed (a session's end, out of memory) leaves no result and
    no Python error; its error stream holds only submitit's own INFO lines, which ``status`` and
    the controller printed as the reason. Now the reason says what happened."""
    ex = submitit.LocalExecutor(folder=str(tmp_path / "sub"))
    job = ex.submit(time.sleep, 60)
    deadline = time.time() + 30
    while not job.paths.stderr.exists() and time.time() < deadline:
        time.sleep(0.2)
    os.kill(int(job.job_id), signal.SIGKILL)
    while X.job_state(job) == "running" and time.time() < deadline:
        time.sleep(0.2)
    err = X.job_error(job)
    assert "killed" in err and "resumes from its last checkpoint" in err
    assert "submitit" not in err
    ok = ex.submit(abs, -3)  # a job that returned has no error
    ok.result()
    assert X.job_error(ok) == ""


FAKE_SBATCH = """#!/usr/bin/env python3
import json, os, sys
rec = os.environ["FAKE_SBATCH_RECORD"]
script = open(sys.argv[-1]).read()
with open(rec, "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "script": script}) + "\\n")
print("Submitted batch job 4242")
"""


def test_a_controller_attaches_only_to_the_runs_of_its_own_selection(tmp_path):
    """Two controllers over one study (``all --mode sequential --methods gainlora`` beside
    ``run --mode mixed --methods lora``): each attaches to the recorded jobs of its own selection
    only, never waiting on (or collecting) the other's."""
    st = S.load_study(str(_study(tmp_path)))
    jobs = Path(st.output_dir) / "jobs"
    ids = ["holdout-sequential-gainlora-lr1e-3-seed1", "test-single-lora-lr1e-3-seed1",
           "test-mixed-lora-lr1e-3-seed1", "test-mixed-lora_r32-lr1e-3-seed1"]
    for i in ids:  # jobs in flight (this process stands in for their pid)
        X.JobRecord(i, "local", str(os.getpid()), str(tmp_path / "sub"), "log").save(jobs)
    mine = S.Pool(st, scope=S.selection("mixed", ["lora"]))
    assert sorted(sp.id for sp in mine.running) == ["test-mixed-lora-lr1e-3-seed1",
                                                     "test-single-lora-lr1e-3-seed1"]
    assert sorted(sp.id for sp in S.Pool(st).running) == sorted(ids)  # no scope: every job


def test_slurm_submission_carries_resources_command_and_requeue(tmp_path, monkeypatch):
    """What submitit would hand to SLURM, recorded by a fake ``sbatch`` on PATH: the study's
    resources (nodes, one task per GPU, CPUs, memory, time, partition / account / qos, extra
    options), the requeue-on-timeout setting and the signal submitit turns into a checkpoint,
    and a pickled TrainJob whose command is the run's, with ``distributed=zero2`` for a
    several-GPU run. It proves the submission, not a cluster's behaviour."""
    import pickle

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit looks for srun on PATH
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SBATCH_RECORD", str(tmp_path / "sbatch.jsonl"))
    study = OmegaConf.load(_study(tmp_path, threads=None, executor={
        "name": "slurm", "retries": 2, "distributed": "zero2", "max_jobs": 16,
        "slurm": {"nodes": 1, "gpus_per_node": 8, "cpus_per_task": 12, "mem_gb": 640,
                  "timeout_min": 240, "partition": "h100", "account": "lab", "qos": "normal",
                  "max_num_timeout": 5, "additional_parameters": {"constraint": "h100"}}}))
    pool = S.Pool(study)
    assert pool.workers == 16 and pool.res.gpus == 8 and pool.res.tasks == 8
    spec = S.RunSpec("test", "mixed", "badit", 1e-3, 2)
    pool.start(spec)
    sub = [json.loads(x) for x in (tmp_path / "sbatch.jsonl").read_text().splitlines()]
    assert len(sub) == 1
    script = sub[0]["script"]
    for line in ("#SBATCH --nodes=1", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --cpus-per-task=12", "#SBATCH --mem=640GB", "#SBATCH --time=240",
                 "#SBATCH --partition=h100", "#SBATCH --account=lab", "#SBATCH --qos=normal",
                 "#SBATCH --constraint=h100", "#SBATCH --signal=USR2@",
                 f"#SBATCH --job-name=tiny:{spec.id}", "#SBATCH --open-mode=append"):
        assert line in script, (line, script)
    assert "srun" in script and "submitit.core._submit" in script
    rec = X.JobRecord.load(tmp_path / "out" / "jobs" / f"{spec.id}.json")
    assert rec.executor == "slurm" and rec.job_id == "4242"
    job_pkl = next(Path(rec.folder).glob("*_submitted.pkl"))
    delayed = pickle.loads(job_pkl.read_bytes())
    fn = delayed.function
    assert isinstance(fn, X.TrainJob) and fn.cmd[1:3] == ["-m", "badit_exp.train"]
    assert "method=badit" in fn.cmd and "trainer.lr=0.001" in fn.cmd and "seed=2" in fn.cmd
    assert fn.cmd[-1].startswith("distributed=zero2") or "distributed=zero2" in fn.cmd
    assert not any(c.startswith("trainer.num_threads") for c in fn.cmd)
    # requeue: checkpoint() hands back the same command; timeouts are bounded by submitit
    again = fn.checkpoint()
    assert again.function.cmd == fn.cmd and again.function is not fn
    assert pool.res.params["slurm_max_num_timeout"] == 5
    assert pool._executor._executor.max_num_timeout == 5


def test_executor_config_errors_name_the_key():
    with pytest.raises(X.ExecutorError, match="executor.slurm.gpus is not a SLURM resource"):
        X.resources({"slurm": {"gpus": 8}}, "slurm", 1)
    with pytest.raises(X.ExecutorError, match="tasks_per_node=2 with gpus_per_node=8"):
        X.resources({"slurm": {"gpus_per_node": 8, "tasks_per_node": 2}}, "slurm", 1)
    with pytest.raises(X.ExecutorError, match="executor.name='pbs'"):
        X.resources({}, "pbs", 1)


def test_study_help_lists_the_executor_and_status_and_plan():
    out = subprocess.run([sys.executable, "-m", "badit_exp.study", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60).stdout
    assert "--executor {local,slurm}" in out and "status" in out and "plan" in out
    assert "--workers" in out


# ---------------------------------------------------------------------------- the GPU plan
def test_the_estimate_arithmetic():
    """Training: tokens x seconds per token x the parameter ratio, or the step floor when that
    is larger; generation: prompts at half a training token's cost plus decoding from the
    memory bandwidth; sequential rows before the last on the intermediate sample."""
    from badit_exp import study_plan as P

    cfg = OmegaConf.create({"trainer": {"epochs": 10, "per_device_batch_size": 1,
                                        "grad_accum_steps": 1},
                            "data": {"max_new_tokens": 50, "max_eval_per_task_intermediate": 1}})
    data = {"tasks": {"a": {"train_tokens": 1000, "train_n": 16, "eval_prompt_tokens": [100, 300]},
                      "b": {"train_tokens": 3000, "train_n": 8, "eval_prompt_tokens": [200]}}}
    ref = {"s_per_token": {"lora": 1e-6}, "params": 1e9}
    est = OmegaConf.create({"fallback_method": "lora", "hbm_tb_s": 4.0,
                            "eval_examples_per_batch": 10, "step_floor_s": 0.0})
    c = P.run_cost(cfg, "mixed", data, ref, "badit", 2e9, 8, est)  # badit: lora's measurement
    assert c["train_tokens"] == 40000 and c["train_s"] == pytest.approx(40000 * 1e-6 * 2)
    assert c["steps"] == -(-24 * 10 // 8) == 30
    decode = 50 * 4e9 / 4e12 / 10
    assert c["eval_s"] == pytest.approx(600 * 2e-6 / 2 + 3 * decode)
    seq = P.run_cost(cfg, "sequential", data, ref, "lora", 2e9, 8, est)
    assert seq["steps"] == 20 + 10
    assert seq["eval_s"] == pytest.approx((100 + 200) * 1e-6 + 2 * decode + c["eval_s"])
    floor = P.run_cost(cfg, "mixed", data, ref, "lora", 2e9, 8,
                       OmegaConf.merge(est, {"step_floor_s": 1.0}))
    assert floor["train_s"] == pytest.approx(30 * 1.0 * 8) and floor["compute_s"] == c["train_s"]


def test_plan_commands_compose_and_validate_for_every_kind_of_run(tmp_path, monkeypatch):
    """The GPU study's commands compose and validate (one per mode and kind here; the slow test
    checks all of them), with 8-GPU resources and zero2 added."""
    from badit_exp import study_plan as P
    from badit_exp.compose import load

    study = S.load_study("study_gpu_qwen3_4b")
    pool = S.Pool(study, dry_run=True)
    assert pool.res.gpus == 8 and pool.res.name == "slurm"
    seen = {}
    for mode in ("mixed", "sequential"):
        for sp, kind, tuned in S.planned(study, mode):
            seen.setdefault((mode, kind), (sp, tuned))
    assert {k for _, k in seen} == {"tune", "test", "single"}
    for (_mode, kind), (sp, tuned) in seen.items():
        cmd = pool.command(sp)
        assert cmd[-1] == "distributed=zero2"
        cfg = load(P.run_overrides(cmd))
        assert cfg.model.name == "qwen3-4b" and cfg.trainer.precision == "bf16"
        assert cfg.data.max_train_per_task == 1000 and cfg.trainer.epochs == 10
        assert cfg.training_mode.name == (sp.mode) and tuned == (kind != "tune")
        assert cfg.data.eval_split == ("holdout" if kind == "tune" else "test")


def test_plan_prices_a_subset_by_method_and_family(capsys):
    """``plan --methods`` refuses a method the study lacks (naming the study's), and the per-method
    table sums each method's runs by mode, grouped by the study's families in their order."""
    study = S.load_study("study_gpu_qwen3_4b")
    with pytest.raises(SystemExit, match=r"--methods: nope not in study study_gpu_qwen3_4b.*lora_r32"):
        S.plan(study, ["mixed"], ["lora", "nope"])
    run = lambda mode, m, gh: S.PlannedRun(S.RunSpec("test", mode, m, 1e-4, 1), "test", False,  # noqa: E731
                                           [], "", 8, gh / 8, gh)
    runs = [run("mixed", "badit", 2.0), run("sequential", "badit", 3.0), run("single", "badit", 1.0),
            run("mixed", "smora_k8", 4.0), run("mixed", "lora", 1.5), run("mixed", "lora", 1.5)]
    table = S.method_hours_table(study, runs).splitlines()
    assert table[0] == "| family | method | runs | mixed GPU-h | sequential GPU-h | single GPU-h | GPU-hours |"
    assert table[2:] == ["| LoRA | lora | 2 | 3 | 0 | 0 | 3 |",
                         "| BADIT | badit | 3 | 2 | 3 | 1 | 6 |",
                         "| rank-wise experts | smora_k8 | 1 | 4 | 0 | 0 | 4 |"]


def test_plan_of_a_study_without_a_gpu_reference_says_so_instead_of_nan(capsys, monkeypatch):
    """A CPU study has no GPU step-time reference: its plan prints n/a and points at ``status``
    (which estimates from the committed runs), never ``nan``."""
    study = S.load_study("study2_cpu")
    runs = [S.PlannedRun(S.RunSpec("test", "mixed", "lora", 1e-4, 1), "test", True, ["python"],
                         "local", 0, float("nan"), float("nan"))]
    monkeypatch.setattr(S, "build_plan", lambda *a, **k: (runs, {"reference": None}))
    assert S.plan(study, ["mixed"], ["lora"]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out
    assert "| test-mixed-lora-lr?-seed1 | test | 1e-4 (tuned) | 1 | 0 | n/a | n/a |" in out
    assert "study status" in out


@SLOW  # composes all 216 runs and tokenises the data (a few minutes)
def test_the_gpu_study_plan_prints_every_run_validated_with_its_cost(capsys):
    study = S.load_study("study_gpu_qwen3_4b")
    runs, facts = S.build_plan(study, ["mixed", "sequential"])
    # 17 mixed and 7 sequential methods: a 3-point grid each, then 3 seeds of test and single runs
    assert len(runs) == 3 * 17 + 3 * 7 + 2 * 3 * (17 + 7)
    assert all(r.gpus == 8 and r.gpu_hours > 0 for r in runs)
    assert facts["reference"]["device"] == "NVIDIA H200"
    assert S.plan(study, ["mixed"], ["lora", "badit"]) == 0
    out = capsys.readouterr().out
    assert "# Plan of study study_gpu_qwen3_4b: 18 runs (mixed; methods lora, badit)" in out
    assert "Estimated GPU-hours:" in out and "step_time_h200_random_0.5b.json" in out
    mine = {(r.spec.method, r.spec.mode): 0.0 for r in runs}
    for r in runs:
        mine[(r.spec.method, r.spec.mode)] += r.gpu_hours
    assert f"| BADIT | badit | 9 | {mine[('badit', 'mixed')]:.0f} | " in out  # 3 tune, 3 test, 3 single


def test_study_lanes_script_runs_each_lanes_steps_in_order(tmp_path):
    """scripts/study_lanes.sh: each lane runs its MODE:METHODS steps one after the other as
    one-worker `study all` controllers, lanes side by side; a malformed step is refused."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "study_lanes.sh"
    shutil.copy(root / "scripts" / "study_lanes.sh", script)
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fakepy"  # stands in for the venv's python: records each controller
    fake.write_text(f'#!/bin/bash\nif [ "$1" = -c ]; then echo res; exit 0; fi\n'
                    f'echo "$OMP_NUM_THREADS $*" >> {calls}\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake))
    bad = subprocess.run(["bash", str(script), "mixed-lora"], env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "is not MODE:METHODS" in bad.stderr
    ok = subprocess.run(["bash", str(script), "sequential:a,b mixed:c", "mixed:d"], env=env,
                        capture_output=True, text=True, check=True)
    assert "lane 1: pid" in ok.stdout and "lane 2: pid" in ok.stdout
    for _ in range(100):
        logs = [tmp_path / "outputs" / "lanes" / f"lane{i}.log" for i in (1, 2)]
        if all(p.is_file() and "done" in p.read_text() for p in logs):
            break
        time.sleep(0.05)
    got = calls.read_text().splitlines()
    study = "-m badit_exp.study all --study study2_cpu --mode"
    assert len(got) == 3 and all(g.startswith("1 ") for g in got)  # one thread each
    lane1 = [g for g in got if "--methods d" not in g]
    assert lane1 == [f"1 {study} sequential --workers 1 --methods a,b",
                     f"1 {study} mixed --workers 1 --methods c"]
    assert f"1 {study} mixed --workers 1 --methods d" in got


def test_study_lanes_script_changes_one_lane_while_the_others_go_on(tmp_path):
    """--lane N stops lane N's old controller and starts the edited lane N, leaving the
    other lanes alone; a plain start refuses to double a lane that still runs."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "study_lanes.sh"
    shutil.copy(root / "scripts" / "study_lanes.sh", script)
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fakepy"  # a controller of methods "slow" runs until it is killed
    fake.write_text(f'#!/bin/bash\nif [ "$1" = -c ]; then echo res; exit 0; fi\n'
                    f'echo "$*" >> {calls}\n'
                    f'case "$*" in *"--methods slow"*) exec sleep 60 ;; esac\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake))
    lanes = tmp_path / "outputs" / "lanes"

    def run(*args):
        return subprocess.run(["bash", str(script), *args], env=env, capture_output=True,
                              text=True)

    def wait_for(cond):
        for _ in range(200):
            if cond():
                return True
            time.sleep(0.05)
        return False

    assert run("mixed:a", "mixed:slow").returncode == 0
    assert wait_for(lambda: calls.is_file() and "--methods slow" in calls.read_text())
    lane2 = int((lanes / "lane2.pid").read_text())
    controller = subprocess.run(["pgrep", "-P", str(lane2)], capture_output=True,
                                text=True).stdout.split()
    assert len(controller) == 1  # the lane's running `study all` (here: sleep)
    again = run("mixed:a", "mixed:slow")  # lane 2 still runs: refused, nothing doubled
    assert again.returncode == 2 and "lane 2" in again.stderr and "--lane 2" in again.stderr
    assert run("--lane", "3", "mixed:a", "mixed:b").returncode == 2
    ok = run("--lane", "2", "mixed:a", "mixed:b")
    assert ok.returncode == 0, ok.stderr
    assert "lane 2: stopped its old controller" in ok.stdout and "lane 1" not in ok.stdout
    assert wait_for(lambda: "done" in (lanes / "lane2.log").read_text())
    got = calls.read_text().splitlines()
    assert sum("--methods a" in g for g in got) == 1  # lane 1 was not started again
    assert any("--methods b" in g for g in got)
    assert wait_for(lambda: not os.path.exists(f"/proc/{controller[0]}"))  # stopped, not left
