"""Where a study's runs execute: this machine or a SLURM cluster, both through submitit.

A run is a command (``python -m badit_exp.train ...``) wrapped in :class:`TrainJob`, a
``submitit.helpers.Checkpointable``: when SLURM (or submitit's local executor) signals a
preemption or the time limit, :meth:`TrainJob.checkpoint` stops the training process and hands
back the same command, which submitit requeues; the run then continues from its own checkpoint
(``resume=true``, the default: the last finished stage and the last in-stage checkpoint).

- ``local``: ``submitit.LocalExecutor``, one job per run, one task, the study's ``threads``
  torch threads; the controller keeps ``workers`` jobs running at a time.
- ``slurm``: ``submitit.AutoExecutor(cluster="slurm")``, one job per run with the resources of
  ``executor.slurm`` (nodes, GPUs per node, one task per GPU, CPUs per task, memory, time
  limit, partition / account / qos, extra sbatch options). With several tasks each starts the
  same command; :mod:`badit_exp.dist` maps submitit's environment to torch.distributed's, and
  the study adds ``distributed=<executor.distributed>`` to the command.

Every submitted job is recorded in ``<output_dir>/jobs/<run id>.json`` (executor, job id, its
submitit folder, log, attempt), so a restarted controller finds the jobs still running (a local
job by its process id, a SLURM job by ``sacct`` through submitit) instead of starting them
again. Nothing here knows about tuning or seeds: :mod:`badit_exp.study` schedules.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

EXECUTORS = ("local", "slurm")
# submitit's SLURM parameters a study file may set under executor.slurm (AutoExecutor names)
SLURM_KEYS = ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb",
              "timeout_min", "slurm_partition", "slurm_account", "slurm_qos",
              "slurm_max_num_timeout", "slurm_additional_parameters", "slurm_setup",
              "slurm_signal_delay_s", "slurm_array_parallelism", "name")
# how the study file names them (short) -> submitit's names
SLURM_ALIASES = {"partition": "slurm_partition", "account": "slurm_account",
                 "qos": "slurm_qos", "max_num_timeout": "slurm_max_num_timeout",
                 "additional_parameters": "slurm_additional_parameters",
                 "setup": "slurm_setup", "signal_delay_s": "slurm_signal_delay_s",
                 "array_parallelism": "slurm_array_parallelism"}


class ExecutorError(ValueError):
    """A study's executor block is wrong; the message names the key and the fix."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """The training process gets SIGTERM when the job's task dies (Linux), so a killed task
    never leaves an orphan training beside its requeued successor."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class TrainJob:
    """One run as a submitit job: start ``cmd`` (its output appended to ``log``), wait, and fail
    with the log's path when it exits non-zero. Requeue-safe: see :meth:`checkpoint`.

    Args:
        cmd: the command (``python -m badit_exp.train ...``).
        cwd: where to run it (the repository).
        env: variables added to the job's environment (threads, ...).
        log: the run's log file (task k > 0 of a several-task job writes ``<log>.rank<k>``).
        run_dir: the run's directory; success means its ``metrics.json`` exists.
    """

    def __init__(self, cmd: Sequence[str], cwd: str, env: Dict[str, str], log: str,
                 run_dir: str):
        self.cmd, self.cwd, self.env = list(cmd), str(cwd), dict(env)
        self.log, self.run_dir = str(log), str(run_dir)
        self._proc: Optional[subprocess.Popen] = None

    def __call__(self) -> str:
        rank = _task_rank()
        log = Path(self.log if rank == 0 else f"{self.log}.rank{rank}")
        log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, **self.env)
        with open(log, "a") as f:
            f.write(f"\n[job] {time.strftime('%Y-%m-%d %H:%M:%S')} start (task {rank}): "
                    f"{' '.join(self.cmd)}\n")
            f.flush()
            self._proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=env, stdout=f,
                                          stderr=subprocess.STDOUT,
                                          preexec_fn=_die_with_parent
                                          if sys.platform.startswith("linux") else None)
            try:
                rc = self._proc.wait()
            finally:
                self._stop()
        if rc != 0:
            raise RuntimeError(f"the run exited with code {rc}; log: {log}")
        if rank == 0 and not (Path(self.run_dir) / "metrics.json").exists():
            raise RuntimeError(f"the run exited 0 but wrote no {self.run_dir}/metrics.json; "
                               f"log: {log}")
        return self.run_dir

    def _stop(self, grace_s: float = 60.0) -> None:
        p = self._proc
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def checkpoint(self, *args, **kwargs):
        """Preemption or time limit: stop the training process (its last checkpoint is on
        disk) and requeue the same command, which resumes from it."""
        import submitit

        # called from submitit's signal handler while __call__ waits on the process: only send
        # the signal here (waiting would deadlock on Popen's wait lock); __call__'s ``finally``
        # waits for it once submitit's requeue unwinds the call
        p = self._proc
        if p is not None and p.returncode is None:
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        return submitit.helpers.DelayedSubmission(
            TrainJob(self.cmd, self.cwd, self.env, self.log, self.run_dir))

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_proc"] = None
        return d


def preemption_signal() -> int:
    """The signal submitit turns into :meth:`TrainJob.checkpoint` (USR2 unless configured)."""
    from submitit.core.job_environment import JobEnvironment

    return int(JobEnvironment._usr_sig())


def _task_rank() -> int:
    for k in ("SUBMITIT_LOCAL_GLOBALID", "SLURM_PROCID"):
        if k in os.environ:
            return int(os.environ[k])
    return 0


# ---------------------------------------------------------------------------- config
@dataclass
class Resources:
    """What one run gets. ``local``: ``threads`` torch threads; ``slurm``: submitit's
    parameters (``params``), from ``executor.slurm`` of the study file."""

    name: str = "local"
    threads: int = 1
    params: Dict = field(default_factory=dict)

    @property
    def gpus(self) -> int:
        return int(self.params.get("nodes", 1)) * int(self.params.get("gpus_per_node", 0) or 0)

    @property
    def tasks(self) -> int:
        return int(self.params.get("nodes", 1)) * int(self.params.get("tasks_per_node", 1) or 1)

    def describe(self) -> str:
        if self.name == "local":
            return f"local process, {self.threads} thread{'s' if self.threads != 1 else ''}"
        p = self.params
        parts = [f"{p.get('nodes', 1)} node(s) x {p.get('gpus_per_node', 0)} GPU",
                 f"{p.get('tasks_per_node', 1)} task(s)/node",
                 f"{p.get('cpus_per_task', '?')} CPU/task", f"{p.get('mem_gb', '?')} GB",
                 f"{p.get('timeout_min', '?')} min"]
        for k in ("slurm_partition", "slurm_account", "slurm_qos"):
            if p.get(k):
                parts.append(f"{k[6:]}={p[k]}")
        return ", ".join(parts)


def resources(executor_cfg, name: str, threads: int) -> Resources:
    """The per-run resources of ``name`` from a study's ``executor`` block (a mapping).

    Raises:
        ExecutorError: an unknown executor or SLURM key, or a GPU count that tasks cannot map
            one to one.
    """
    if name not in EXECUTORS:
        raise ExecutorError(f"executor.name={name!r} is not one of {list(EXECUTORS)}; use local "
                            "(this machine) or slurm (a cluster, through submitit).")
    if name == "local":
        return Resources("local", threads)
    raw = dict((executor_cfg or {}).get("slurm") or {})
    params = {}
    for k, v in raw.items():
        key = SLURM_ALIASES.get(k, k)
        if key not in SLURM_KEYS:
            raise ExecutorError(
                f"executor.slurm.{k} is not a SLURM resource this study knows; use one of "
                f"{sorted(set(SLURM_KEYS) | set(SLURM_ALIASES))} (extra sbatch options go in "
                "executor.slurm.additional_parameters, e.g. {constraint: h100}).")
        if v is not None:
            params[key] = dict(v) if hasattr(v, "items") else (list(v) if isinstance(
                v, (list, tuple)) or type(v).__name__ == "ListConfig" else v)
    gpn = int(params.get("gpus_per_node", 0) or 0)
    params.setdefault("tasks_per_node", max(gpn, 1))
    if gpn > 1 and int(params["tasks_per_node"]) != gpn:
        raise ExecutorError(
            f"executor.slurm.tasks_per_node={params['tasks_per_node']} with gpus_per_node={gpn}: "
            "a run starts one task per GPU; set tasks_per_node to gpus_per_node (or leave it "
            "out).")
    params.setdefault("timeout_min", 60)
    params.setdefault("slurm_max_num_timeout", 3)
    return Resources("slurm", threads, params)


def make_executor(res: Resources, folder: Path, job_name: str):
    """The submitit executor for ``res``, writing its files under ``folder``."""
    import submitit

    folder.mkdir(parents=True, exist_ok=True)
    if res.name == "local":
        ex = submitit.LocalExecutor(folder=str(folder))
        # a run may take hours here: the local executor's time limit is a day, not 2 minutes
        ex.update_parameters(timeout_min=24 * 60, tasks_per_node=1)
        return ex
    params = dict(res.params)
    # requeues after the time limit are bounded by submitit (the executor's constructor)
    ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm",
                               slurm_max_num_timeout=int(params.pop("slurm_max_num_timeout", 3)))
    ex.update_parameters(name=job_name, **{k: v for k, v in params.items() if k != "name"})
    return ex


# ---------------------------------------------------------------------------- job records
@dataclass
class JobRecord:
    """What the controller remembers of a submitted run (``<output_dir>/jobs/<id>.json``)."""

    run_id: str
    executor: str
    job_id: str
    folder: str
    log: str
    attempt: int = 1
    submitted: float = 0.0
    state: str = "submitted"  # submitted | finished | failed
    error: str = ""

    @classmethod
    def load(cls, path: Path) -> Optional["JobRecord"]:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def save(self, jobs_dir: Path) -> None:
        jobs_dir.mkdir(parents=True, exist_ok=True)
        tmp = jobs_dir / f".{self.run_id}.json.tmp"
        tmp.write_text(json.dumps(self.__dict__, indent=1))
        tmp.replace(jobs_dir / f"{self.run_id}.json")


def attach(rec: JobRecord):
    """A submitit job object for a recorded job (after a controller restart)."""
    import submitit

    if rec.executor == "local":
        return submitit.LocalJob(folder=rec.folder, job_id=rec.job_id)
    return submitit.SlurmJob(folder=rec.folder, job_id=rec.job_id)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own finished child, not yet reaped) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def job_state(job, rec: Optional[JobRecord] = None) -> str:
    """``running`` | ``done`` (ended; its result says whether it worked) for a submitit job. A
    local job attached after a restart has no process handle: its process id tells."""
    import submitit

    if isinstance(job, submitit.LocalJob) and getattr(job, "_process", None) is None:
        if job.paths.result_pickle.exists():
            return "done"
        return "running" if _pid_alive(int(job.job_id)) else "done"
    return "done" if job.done() else "running"


def job_error(job) -> str:
    """'' when the job's function returned, else the last line of its error. A local job whose
    process was killed (session end, out of memory, a signal) leaves no result file and no
    Python error: it is said in words, since its error stream holds only submitit's own lines."""
    import submitit

    if isinstance(job, submitit.LocalJob) and not job.paths.result_pickle.exists():
        return ("its process ended without a result (killed: session end, out of memory or a "
                "signal); a retry resumes from its last checkpoint")
    try:
        job.result()
        return ""
    except Exception as e:  # noqa: BLE001 - submitit raises the job's own error, or its own
        lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
        errs = [x for x in lines if re.match(r"\w+(Error|Exception): ", x)]
        return (errs or lines or [type(e).__name__])[-1]


def slurm_state(job) -> str:
    """The scheduler's word for a job (PENDING, RUNNING, COMPLETED, ...), or 'unknown'."""
    try:
        return str(job.state)
    except Exception:  # noqa: BLE001 - sacct unreachable
        return "unknown"


def read_records(jobs_dir: Path) -> List[JobRecord]:
    return [r for r in (JobRecord.load(p) for p in sorted(jobs_dir.glob("*.json"))) if r]
