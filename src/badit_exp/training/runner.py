"""The experiment runner: stages of training, evaluation after each, results, resume.

The three training modes are one loop over *stages* (SPEC section 2):

* ``mixed``: one stage, all tasks' training sets shuffled together; evaluate all tasks.
* ``sequential``: one stage per task in the task order; the adapter carries over, the optimizer
  and schedule restart; after each stage evaluate all tasks -> the T x T matrix.
* ``single``: one stage per task, each from the pristine base model; evaluate that task only
  -> a_{t,0} for ``forward``.

Data parallel runs (``distributed=ddp|zero2``): every rank runs this same code on its shard;
rank 0 alone writes files (config, logs, checkpoints, predictions, results) and the others
return ``None`` from :meth:`Runner.run`.

Named steps: :meth:`Runner.setup`, :meth:`Runner.build_model`, :meth:`Runner.train_stage`,
:meth:`Runner.evaluate`, :meth:`Runner.checkpoint_stage`, :meth:`Runner.finish`.
Progress lives in ``<run_dir>/progress.json`` (atomic); a killed run started again with the
same command (same run directory, ``resume=true``, the default) continues from the last
finished stage, and from the last in-stage checkpoint if there is one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from badit_exp import metrics as M
from badit_exp import plotting, provenance
from badit_exp.config import Config, ConfigError
from badit_exp.data.prompts import collate_train, tokenize_task
from badit_exp.data.superni import Task, load_task, resolve_task_names
from badit_exp.evaluation.generate import evaluate_task
from badit_exp.evaluation.scoring import summary_score
from badit_exp.io_utils import (atomic_write_json, atomic_write_text, flatten,
                                truncate_jsonl, write_jsonl)
from badit_exp.methods import registry
from badit_exp.models import load_model, load_tokenizer, resolve_device
from badit_exp.training import checkpoint as ckpt
from badit_exp.training import distributed as D
from badit_exp.training.logger import RunLogger
from badit_exp.training.loop import Position, rng_state, set_rng_state, train_stage

log = logging.getLogger(__name__)

# Keys that may change between a run and its resumption without changing its results.
# ``distributed``: checkpoints hold full tensors, so a ZeRO-2 run may resume under DDP and back
# (a mid-epoch checkpoint still needs the same number of processes, checked in the loop).
RESUME_IGNORED = {"resume", "logger", "paths", "trainer.eval_batch_size", "trainer.log_every",
                  "trainer.num_threads", "trainer.checkpoint_every_steps", "distributed"}


@dataclass
class Stage:
    name: str
    train_tasks: List[str]
    eval_tasks: List[str]
    fresh_model: bool  # start from the pristine base model (single mode, first stage)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_order(seed: int) -> List[str]:
    """Table 5's order number ``seed``, read from ``conf/task_order/order<seed>.yaml``."""
    path = Path(__file__).resolve().parents[3] / "conf" / "task_order" / f"order{seed}.yaml"
    if not path.exists():
        raise ConfigError(f"task_order=order_from_seed has no order for seed={seed} (the paper "
                          "defines orders 1-5); set task_order=order1..order5 or "
                          "task_order=random.")
    return [str(x) for x in OmegaConf.load(path).order]


def task_order(cfg: Config) -> List[str]:
    """The sequential order: the configured list, or a seeded shuffle for ``random``."""
    tasks = list(cfg.data.tasks)
    if cfg.task_order.random:
        rng = random.Random(cfg.seed)
        rng.shuffle(tasks)
        return tasks
    names = cfg.task_order.order
    if cfg.task_order.from_seed:
        names = seed_order(cfg.seed)
    order = resolve_task_names(names, tasks, f"task_order={cfg.task_order.name}",
                               skip_unknown=cfg.task_order.restrict_to_data_tasks)
    if len(order) != len(tasks):
        missing = [t for t in tasks if t not in order]
        raise ConfigError(f"task_order={cfg.task_order.name} leaves out {missing} of data.tasks; "
                          "a sequential order must list every task once (or use "
                          "task_order=random).")
    return order


def plan_stages(cfg: Config) -> List[Stage]:
    mode = cfg.training_mode.name
    tasks = list(cfg.data.tasks)
    if mode == "mixed":
        return [Stage("mixed", tasks, tasks, True)]
    order = task_order(cfg) if mode == "sequential" else tasks
    if mode == "sequential":
        return [Stage(t, [t], order, i == 0) for i, t in enumerate(order)]
    return [Stage(t, [t], [t], True) for t in order]


def sync_rng() -> None:
    """Rank 0's random state on every rank (nothing changes with one process). Training draws
    differ per rank (dropout on different shards); hooks outside training must not."""
    if D.world_size() > 1:
        set_rng_state(D.broadcast_object(rng_state()))


def config_diff(old: Dict, new: Dict) -> List[str]:
    a, b = flatten(old), flatten(new)
    ign = lambda k: any(k == i or k.startswith(i + ".") for i in RESUME_IGNORED)  # noqa: E731
    return sorted(k for k in set(a) | set(b) if not ign(k) and a.get(k) != b.get(k))


class Runner:
    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg = cfg
        self._set_run_dir(Path(run_dir))

    def _set_run_dir(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        self.progress_path = run_dir / "progress.json"

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.trainer.num_threads:
            torch.set_num_threads(cfg.trainer.num_threads)
        device = resolve_device(cfg.trainer.device)
        self.dist = D.init(cfg.distributed, device)
        self.device = D.device_for(self.dist, device)
        self.is_main = self.dist.is_main
        # one run directory for all ranks: rank 0's (a Hydra sweep dir carries a timestamp that
        # could differ by a second between processes)
        self._set_run_dir(Path(D.broadcast_object(str(self.run_dir))))
        prec = cfg.trainer.precision
        use_bf16 = prec == "bf16" or (prec == "auto" and self.device.type == "cuda"
                                      and torch.cuda.is_bf16_supported())
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.cache_dir = Path(cfg.paths.cache_dir).expanduser().resolve()
        self.stages = plan_stages(cfg)
        with D.main_first():  # rank 0 fills the model and tokenisation caches, then the others
            self.tok = load_tokenizer(cfg.model, self.cache_dir)
            self._load_data()
        self.resolved = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
        err = None
        if self.is_main:  # rank 0 checks and writes config.yaml; every rank gets its verdict
            try:
                self._check_run_dir()
            except ConfigError as e:
                err = str(e)
        err = D.broadcast_object(err)
        if err:
            raise ConfigError(err)
        self.logger = RunLogger(self.run_dir, cfg.logger.name, cfg.logger.project, cfg.run_name,
                                cfg.logger.mode, self.resolved, enabled=self.is_main)

    def _load_data(self) -> None:
        d = self.cfg.data
        root = Path(d.root).expanduser()
        tok_cache = self.cache_dir / "tokenized" if d.cache_tokenization else None
        self.train_tasks: Dict[str, Task] = {}
        self.eval_tasks: Dict[str, Task] = {}
        self.train_examples: Dict[str, List[Dict]] = {}
        self.eval_examples: Dict[str, List[Dict]] = {}
        kw = dict(max_seq_len=d.max_seq_len, max_new_tokens=d.max_new_tokens, seed=self.cfg.seed,
                  cache_dir=tok_cache)
        for name in d.tasks:
            tr = load_task(root, name, d.train_split, d.max_train_per_task)
            ev = load_task(root, name, d.eval_split, d.max_eval_per_task)
            self.train_tasks[name], self.eval_tasks[name] = tr, ev
            self.train_examples[name] = tokenize_task(
                tr, self.tok, kind="train", task_file=root / name / f"{d.train_split}.json", **kw)
            self.eval_examples[name] = tokenize_task(
                ev, self.tok, kind="eval", task_file=root / name / f"{d.eval_split}.json", **kw)
            for ex in self.train_examples[name]:
                ex["task_index"] = d.tasks.index(name)

    def _check_run_dir(self) -> None:
        cfg_path = self.run_dir / "config.yaml"
        if cfg_path.exists():
            if not self.cfg.resume:
                raise ConfigError(f"{self.run_dir} already holds a run and resume=false; choose "
                                  "another hydra.run.dir (or run_name), or resume=true.")
            old = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)
            diff = config_diff(old, self.resolved)
            if diff:
                raise ConfigError(f"{self.run_dir} holds a run with a different config "
                                  f"({', '.join(diff[:8])}); resuming it would mix results. "
                                  "Use another hydra.run.dir / run_name, or restore the settings.")
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cfg_path, OmegaConf.to_yaml(self.resolved))

    # ------------------------------------------------------------------------------ model
    def loss_slice(self) -> List[Dict]:
        """The fixed slice of training data for the step-0 / final target loss: round-robin over
        data.tasks (example 0 of every task, then example 1, ...), ``trainer.step0_examples``."""
        n = self.cfg.trainer.step0_examples
        lists = [self.train_examples[t] for t in self.cfg.data.tasks]
        out: List[Dict] = []
        for j in range(max(len(x) for x in lists)):
            out += [x[j] for x in lists if j < len(x)]
        return out[:n]

    @torch.no_grad()
    def target_loss(self, model) -> Optional[float]:
        """Mean target-token cross-entropy of ``model`` on :meth:`loss_slice` (eval mode)."""
        examples = self.loss_slice()
        if not examples:
            return None
        was_training = model.training
        model.eval()
        amp = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
               if self.autocast_dtype is not None else contextlib.nullcontext())
        total, count = 0.0, 0
        bs = self.cfg.trainer.per_device_batch_size
        for i in range(0, len(examples), bs):
            batch = collate_train(examples[i: i + bs], self.tok.pad_token_id)
            batch = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask", "labels")}
            n_tok = int((batch["labels"][:, 1:] != -100).sum())
            with amp:
                loss = model(**batch).loss
            total += float(loss) * n_tok
            count += n_tok
        model.train(was_training)
        return total / max(count, 1)

    def build_model(self, measure_step0: bool = False):
        """Pristine base model + the method's adapter (deterministic from the seed). With
        ``measure_step0`` the target loss of the pre-trained model and of the model with the
        fresh adapter are stored in ``self.step0`` (a start far above the pre-trained model's
        loss means the method does not start from the pre-trained function: warned)."""
        seed_everything(self.cfg.seed)  # same seed on every rank: identical adapters
        with D.main_first():
            base = load_model(self.cfg.model, self.cache_dir, self.device,
                              vocab_size=len(self.tok) if self.cfg.model.source == "tiny" else None)
        if base.generation_config is not None:
            base.generation_config.pad_token_id = self.tok.pad_token_id
        pre = self.target_loss(base) if measure_step0 else None
        method = registry.build(self.cfg.method)
        method.run_dir = self.run_dir if self.is_main else None  # diagnostics: rank 0 writes
        method.task_names = list(self.cfg.data.tasks)
        model = method.apply(base)
        if measure_step0 and pre is not None:
            start = self.target_loss(model)
            self.step0 = {"pretrained": pre, "step0": start, "examples": len(self.loss_slice())}
            log.info("target loss on %d training examples: pre-trained %.4f, %s at step 0 %.4f",
                     self.step0["examples"], pre, self.cfg.method.name, start)
            if start > 1.1 * pre:
                log.warning("method %s starts %.0f%% above the pre-trained model's target loss "
                            "(%.3f vs %.3f): its adapter does not start at the pre-trained "
                            "function (for BADIT see method.function_preserving).",
                            self.cfg.method.name, 100 * (start / pre - 1), start, pre)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        log.info("model %s + method %s: %d trainable of %d parameters (%.3f%%)",
                 self.cfg.model.name, self.cfg.method.name, n_train, n_all, 100 * n_train / n_all)
        return model, method

    # ------------------------------------------------------------------------------ progress
    def _load_progress(self) -> Dict:
        if not self.progress_path.exists():
            return {"completed": [], "results": {}, "timing": {}, "global_step": 0}
        try:
            return json.loads(self.progress_path.read_text())
        except json.JSONDecodeError as e:
            raise ckpt.CheckpointError(f"{self.progress_path} is corrupted ({e}); delete the run "
                                       "directory to start over.") from None

    def _save_progress(self, progress: Dict) -> None:
        if self.is_main:
            atomic_write_json(self.progress_path, progress)

    # ------------------------------------------------------------------------------ steps
    def train_stage(self, model, method, i: int, stage: Stage, progress: Dict) -> Dict:
        examples = [ex for t in stage.train_tasks for ex in self.train_examples[t]]
        in_stage = self.ckpt_dir / "in_stage"
        resume_state = None
        if in_stage.exists():
            tensors, meta, tstate = ckpt.load(in_stage)
            if meta.get("stage") == i:
                method.load_state_dict(model, tensors)
                resume_state = tstate
                log.info("resuming stage %d (%s) at epoch %d, batch %d", i, stage.name,
                         tstate["position"]["epoch"], tstate["position"]["batch"])
        # logs written after the checkpoint we resume from would otherwise appear twice
        done_steps = resume_state["position"]["step"] if resume_state else 0
        last = progress["global_step"] + done_steps
        if self.is_main:
            truncate_jsonl(self.logger.path, lambda r: not (r.get("train/stage") == stage.name
                                                            and r.get("step", 0) > last))
        method.on_resume(stage.name, done_steps)

        def save(pos: Position, tstate: Dict) -> None:
            if self.is_main:
                ckpt.save(in_stage, method.state_dict(model),
                          {"stage": i, "stage_name": stage.name}, tstate)
            D.barrier()

        return train_stage(model, method, examples, tcfg=self.cfg.trainer,
                           pad_id=self.tok.pad_token_id, seed=self.cfg.seed, stage_index=i,
                           stage_name=stage.name, device=self.device,
                           autocast_dtype=self.autocast_dtype, logger=self.logger,
                           global_step_offset=progress["global_step"], resume=resume_state,
                           save_checkpoint=save, dcfg=self.cfg.distributed,
                           run_dir=self.run_dir)

    def evaluate(self, model, method, i: int, stage: Stage, final: bool,
                 step: int = 0) -> Dict[str, Dict[str, float]]:
        """Evaluate ``stage.eval_tasks``; per-task results are kept as they finish so a crash
        during evaluation does not redo finished tasks. Generation is sharded over ranks (see
        :func:`badit_exp.evaluation.generate.generate`); rank 0 writes."""
        partial_path = self.ckpt_dir / f"eval_stage_{i}.json"
        done = json.loads(partial_path.read_text()) if partial_path.exists() else {}
        done = D.broadcast_object(done)  # every rank evaluates the same remaining tasks
        pred_dir = self.run_dir / "predictions"
        if self.cfg.training_mode.name == "sequential":
            pred_dir = pred_dir / f"after_{i:02d}_{stage.name}"
        todo = [t for t in stage.eval_tasks if t not in done]
        for t in tqdm(todo, desc=f"evaluate after {stage.name}",
                      disable=len(todo) < 2 or not self.is_main):
            method.start_eval(t)
            scores, records = evaluate_task(
                model, self.tok, self.eval_tasks[t], self.eval_examples[t],
                batch_size=self.cfg.trainer.eval_batch_size,
                max_new_tokens=self.cfg.data.max_new_tokens, device=self.device,
                autocast_dtype=self.autocast_dtype)
            method.end_eval(t)
            done[t] = scores
            if self.is_main:
                write_jsonl(pred_dir / f"{t}.jsonl", records)
                if final and pred_dir != self.run_dir / "predictions":
                    write_jsonl(self.run_dir / "predictions" / f"{t}.jsonl", records)
                atomic_write_json(partial_path, done)
            self.logger.log({f"eval/{t}/rougeL": scores["rougeL"],
                             f"eval/{t}/exact_match": scores["exact_match"], "eval/stage": i},
                            step=step)
        method.after_evaluate(stage.name)
        return done

    def checkpoint_stage(self, model, method, i: int) -> None:
        if self.is_main:
            ckpt.save(self.ckpt_dir / f"stage_{i}", method.state_dict(model), {"stage": i})
        D.barrier()

    # ------------------------------------------------------------------------------ run
    def run(self) -> Dict:
        self.setup()
        progress = D.broadcast_object(self._load_progress() if self.is_main else None)
        model = method = None
        n = len(self.stages)
        for i, stage in enumerate(self.stages):
            if stage.name in progress["completed"]:
                continue
            if model is None or stage.fresh_model:
                first = "target_loss" not in progress and self.cfg.trainer.step0_examples > 0
                model, method = self.build_model(measure_step0=first)
                if first:
                    progress["target_loss"] = dict(self.step0)
                if not stage.fresh_model and i > 0:
                    tensors, _, _ = ckpt.load(self.ckpt_dir / f"stage_{i - 1}")
                    method.load_state_dict(model, tensors)
            data = [self.train_examples[t] for t in stage.train_tasks]
            t0 = time.perf_counter()
            sync_rng()  # a method drawing random numbers at a task boundary (a new branch's
            method.on_stage_start(model, i, stage.name, data)  # init) draws the same on all ranks
            summary = self.train_stage(model, method, i, stage, progress)
            sync_rng()
            method.on_stage_end(model, i, stage.name, data)
            t_train = time.perf_counter() - t0
            slice_loss = self.target_loss(model) if self.cfg.trainer.step0_examples else None
            self.checkpoint_stage(model, method, i)
            t1 = time.perf_counter()
            scores = self.evaluate(model, method, i, stage, final=(i == n - 1),
                                   step=progress["global_step"] + summary["steps"])
            progress["results"][stage.name] = scores
            progress["timing"][stage.name] = {"train_s": t_train,
                                              "eval_s": time.perf_counter() - t1,
                                              "train_steps": summary["steps"],
                                              "train_tokens": summary["tokens"],
                                              "first_loss": summary["first_loss"],
                                              "last_loss": summary["last_loss"],
                                              "slice_loss_after": slice_loss}
            if slice_loss is not None and "target_loss" in progress:
                progress["target_loss"]["final"] = slice_loss
            progress["completed"].append(stage.name)
            progress["global_step"] += summary["steps"]
            self._save_progress(progress)
            # the stage is recorded: drop what only its resumption needed
            stale = [self.ckpt_dir / "in_stage", self.ckpt_dir / f"eval_stage_{i}",
                     self.ckpt_dir / f"stage_{i - 1}"]
            for old in stale if self.is_main else []:
                if old.is_dir():
                    shutil.rmtree(old)
                elif old.with_suffix(".json").exists():
                    old.with_suffix(".json").unlink()
        self.model, self.method = model, method  # the trained adapter, for notebooks and tests
        if model is not None and self.is_main:
            self._export_adapter(model, method)
        result = self.finish(progress) if self.is_main else None
        self.logger.close()
        D.barrier()
        return result

    def _export_adapter(self, model, method) -> None:
        from safetensors.torch import save_file

        out = self.run_dir / "adapter"
        out.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in method.state_dict(model).items()},
                  str(out / "adapter.safetensors"))
        atomic_write_json(out / "method.json", {"method": self.resolved["method"],
                                                "model": self.resolved["model"],
                                                "seed": self.cfg.seed,
                                                "variant": method.describe()})

    # ------------------------------------------------------------------------------ results
    def _summary(self, task: str, scores: Dict[str, float]) -> float:
        d = self.cfg.data
        return summary_score(task, scores, d.summary_metric, d.exact_match_tasks)

    def finish(self, progress: Dict) -> Dict:
        """Write scores.csv, metrics.json, plots and the LaTeX table; return metrics."""
        cfg = self.cfg
        mode = cfg.training_mode.name
        res = progress["results"]
        stage_names = [s.name for s in self.stages]
        out: Dict = {"mode": mode, "run_name": cfg.run_name, "seed": cfg.seed,
                     "model": cfg.model.name, "method": cfg.method.name,
                     "method_variant": registry.build(cfg.method).describe(),
                     "summary_metric": cfg.data.summary_metric, "match_key": self.match_key()}
        if mode == "single":
            tasks = list(cfg.data.tasks)
            out["tasks"] = tasks
            out["scores"] = {t: res[t][t] for t in tasks}
            out["single_scores"] = {t: self._summary(t, res[t][t]) for t in tasks}
            out["rouge"] = sum(out["single_scores"].values()) / len(tasks)
            row = [out["single_scores"][t] for t in tasks]
            plotting.bar_scores(self.run_dir / "scores.png", tasks, row,
                                f"{cfg.model.name} / {cfg.method.name} / single")
        else:
            tasks = self.stages[0].eval_tasks  # the task order (columns)
            A = [[self._summary(t, res[s][t]) for t in tasks] for s in stage_names]
            A_em = [[res[s][t]["exact_match"] for t in tasks] for s in stage_names]
            single, reason = self.find_single_results(tasks)
            out["tasks"] = tasks
            out["stages"] = stage_names
            out["scores"] = {t: res[stage_names[-1]][t] for t in tasks}
            out["matrix"] = {"summary": A, "rougeL": [[res[s][t]["rougeL"] for t in tasks]
                                                      for s in stage_names],
                             "exact_match": A_em}
            out.update(M.compute_metrics(A, tasks, mode, single, reason))
            em_single = None
            if single is not None and "single_exact_match" in single:
                em_single = single["single_exact_match"]
            out["metrics_exact_match"] = M.compute_metrics(A_em, tasks, mode, em_single,
                                                           "no exact-match single results")
            if single is not None:
                out["single_results_source"] = single.get("_source")
            atomic_write_text(self.run_dir / "scores.csv", M.format_matrix_csv(stage_names, tasks, A))
            atomic_write_text(self.run_dir / "scores.tex", plotting.latex_matrix(stage_names, tasks, A))
            title = f"{cfg.model.name} / {cfg.method.name} / {mode}"
            if mode == "sequential":
                plotting.heatmap(self.run_dir / "scores_heatmap.png", stage_names, tasks, A, title)
            else:
                plotting.bar_scores(self.run_dir / "scores.png", tasks, A[-1], title)
        if mode == "single":
            out["single_exact_match"] = {t: res[t][t]["exact_match"] for t in out["tasks"]}
        out["timing"] = progress["timing"]
        out["target_loss"] = progress.get("target_loss")
        t = cfg.trainer
        out["parallel"] = {"engine": cfg.distributed.name, "world_size": D.world_size(),
                           "global_batch": t.per_device_batch_size * t.grad_accum_steps
                           * D.world_size()}
        out["provenance"] = provenance.collect()
        out["config"] = self.resolved
        atomic_write_json(self.run_dir / "metrics.json", _json_safe(out))
        for k in ("rouge", "forward", "forget_rate", "backward"):
            if out.get(k) is not None:
                self.logger.log({f"cl/{k}": out[k]}, step=progress["global_step"])
        return out

    def match_key(self) -> Dict:
        """What a single-task run must share with this run for ``forward`` to use it."""
        c = self.cfg
        return {"model": c.model.name, "method": c.method.name, "seed": c.seed,
                "root": str(Path(c.data.root).expanduser().resolve()),
                "max_train_per_task": c.data.max_train_per_task,
                "max_eval_per_task": c.data.max_eval_per_task, "max_seq_len": c.data.max_seq_len,
                "epochs": c.trainer.epochs, "summary_metric": c.data.summary_metric}

    def find_single_results(self, tasks: List[str]):
        """({task: a_t0, ...}, reason-if-missing). Explicit file first, else the newest single
        run under ``paths.output_dir`` whose match key equals this run's."""
        explicit = self.cfg.training_mode.single_results
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
        key = self.match_key()
        root = Path(self.cfg.paths.output_dir).expanduser()
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
