"""The experiment runner: stages of training, evaluation after each, results, resume.

:class:`Runner` runs the stages of :func:`badit_exp.training.stages.plan_stages` in named steps:
``setup`` (``_setup_dist``, ``_setup_data``, ``_setup_run_dir``, ``_setup_logger``), then for each
stage :meth:`Runner.build_model` (when the stage starts from the base model),
:meth:`Runner.train_stage` (a :class:`badit_exp.training.loop.StageTrainer`),
:meth:`Runner.checkpoint_stage`, :meth:`Runner.evaluate`; at the end the adapter export and
:func:`badit_exp.training.results.write_results`. The run directory's rules (config check,
progress, checkpoints) are :class:`badit_exp.training.rundir.RunDir`'s.

Data parallel runs (``distributed=ddp|zero2``): every rank runs this same code on its shard;
rank 0 alone writes files (config, logs, checkpoints, predictions, results) and the others
return ``None`` from :meth:`Runner.run`. A killed run started again with the same command (same
run directory, ``resume=true``, the default) continues from the last finished stage, and from
the last in-stage checkpoint if there is one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from transformers import set_seed

from badit_exp import dist as D
from badit_exp.config import Config, ConfigError
from badit_exp.data.prompts import collate_train, tokenize_task
from badit_exp.data.superni import Task, check_disjoint, load_task, split_holdout, take
from badit_exp.evaluation.generate import evaluate_task, example_losses
from badit_exp.io_utils import atomic_write_json, truncate_jsonl, write_jsonl
from badit_exp.methods import registry
from badit_exp.metrics import METRIC_NAMES
from badit_exp.models import load_model, load_tokenizer, resolve_device
from badit_exp.training import engine as E
from badit_exp.training.logger import RunLogger
from badit_exp.training.loop import Position, StageTrainer, rng_state, set_rng_state
from badit_exp.training.results import write_results
from badit_exp.training.rundir import RunDir
from badit_exp.training.stages import Stage, plan_stages

log = logging.getLogger(__name__)


def sync_rng() -> None:
    """Rank 0's random state on every rank (nothing changes with one process). Training draws
    differ per rank (dropout on different shards); hooks outside training must not."""
    if D.world_size() > 1:
        set_rng_state(D.broadcast_object(rng_state()))


def ds_config_for(t, d, world_size: int, bf16: bool) -> Dict:
    """The DeepSpeed JSON from the ``trainer`` (``t``) and ``distributed`` (``d``) configs."""
    return E.deepspeed_config(
        micro_batch_size=t.per_device_batch_size, grad_accum_steps=t.grad_accum_steps,
        max_grad_norm=t.max_grad_norm, world_size=world_size, bf16=bf16, zero_stage=d.zero_stage,
        overlap_comm=d.overlap_comm, contiguous_gradients=d.contiguous_gradients,
        reduce_bucket_size=d.reduce_bucket_size, allgather_bucket_size=d.allgather_bucket_size,
        extra=dict(d.deepspeed))


class Runner:
    """One run of ``cfg`` in ``run_dir`` (see the module docstring)."""

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg = cfg
        self.rundir = RunDir(Path(run_dir))

    @property
    def run_dir(self) -> Path:
        return self.rundir.path

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        self._setup_dist()
        self.stages: List[Stage] = plan_stages(self.cfg)
        with D.main_first():  # rank 0 fills the model and tokenisation caches, then the others
            self.tok = load_tokenizer(self.cfg.model, self.cache_dir)
            self._setup_data()
        self._setup_run_dir()
        self._setup_logger()

    def _setup_dist(self) -> None:
        cfg = self.cfg
        if cfg.trainer.num_threads:
            torch.set_num_threads(cfg.trainer.num_threads)
        device = resolve_device(cfg.trainer.device)
        self.dist = D.init(cfg.distributed, device)
        self.device = D.device_for(self.dist, device)
        self.is_main = self.dist.is_main
        # one run directory for all ranks: rank 0's (a Hydra sweep dir carries a timestamp that
        # could differ by a second between processes)
        self.rundir = RunDir(Path(D.broadcast_object(str(self.run_dir))), writer=self.is_main)
        prec = cfg.trainer.precision
        use_bf16 = prec == "bf16" or (prec == "auto" and self.device.type == "cuda"
                                      and torch.cuda.is_bf16_supported())
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.cache_dir = Path(cfg.paths.cache_dir).expanduser().resolve()

    def _setup_data(self) -> None:
        """Each task's training instances, evaluation instances (test, or the hold-out carved
        from the training split) and their tokens; an evaluation instance the run may train on
        is refused (:func:`badit_exp.data.superni.check_disjoint`)."""
        d = self.cfg.data
        root = Path(d.root).expanduser()
        tok_cache = self.cache_dir / "tokenized" if d.cache_tokenization else None
        self.train_tasks: Dict[str, Task] = {}
        self.eval_tasks: Dict[str, Task] = {}
        self.train_examples: Dict[str, List[Dict]] = {}
        self.eval_examples: Dict[str, List[Dict]] = {}
        self.eval_loss_examples: Dict[str, List[Dict]] = {}
        kw = dict(max_seq_len=d.max_seq_len, max_new_tokens=d.max_new_tokens, cache_dir=tok_cache)
        for name in d.tasks:
            train_file = root / name / f"{d.train_split}.json"
            pool, held = split_holdout(load_task(root, name, d.train_split), d.holdout_per_task,
                                       d.holdout_seed, train_file)
            if d.eval_split == "holdout":
                ev, eval_file = take(held, d.max_eval_per_task), train_file
            else:
                ev = load_task(root, name, d.eval_split, d.max_eval_per_task)
                eval_file = root / name / f"{d.eval_split}.json"
            check_disjoint(pool, ev, train_file, eval_file)
            tr = take(pool, d.max_train_per_task)
            self.train_tasks[name], self.eval_tasks[name] = tr, ev
            self.train_examples[name] = tokenize_task(tr, self.tok, kind="train",
                                                      task_file=train_file, seed=self.cfg.seed,
                                                      **kw)
            self.eval_examples[name] = tokenize_task(ev, self.tok, kind="eval",
                                                     task_file=eval_file, seed=self.cfg.seed, **kw)
            # teacher-forced target loss on the evaluation instances: one reference each,
            # chosen independently of the run's seed so every run scores the same targets
            self.eval_loss_examples[name] = tokenize_task(ev, self.tok, kind="train",
                                                          task_file=eval_file, seed=0, **kw)
            for ex in self.train_examples[name] + self.eval_loss_examples[name]:
                ex["task_index"] = d.tasks.index(name)

    def _setup_run_dir(self) -> None:
        """Rank 0 claims the directory (writes or checks config.yaml); every rank gets its
        verdict."""
        self.resolved = OmegaConf.to_container(OmegaConf.structured(self.cfg), resolve=True)
        err = None
        if self.is_main:
            try:
                self.rundir.claim(self.resolved, self.cfg.resume)
            except ConfigError as e:
                err = str(e)
        err = D.broadcast_object(err)
        if err:
            raise ConfigError(err)

    def _setup_logger(self) -> None:
        c = self.cfg
        self.logger = RunLogger(self.run_dir, c.logger.name, c.logger.project, c.run_name,
                                c.logger.mode, self.resolved, enabled=self.is_main)

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
    def target_loss(self, model, method=None) -> Optional[float]:
        """Mean target-token cross-entropy of ``model`` on :meth:`loss_slice` (eval mode);
        ``method`` gets each batch first (:meth:`Method.before_forward`, e.g. the task id)."""
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
            full = collate_train(examples[i: i + bs], self.tok.pad_token_id)
            full = {k: v.to(self.device) for k, v in full.items()}
            if method is not None:
                method.before_forward(model, full)
            batch = {k: full[k] for k in ("input_ids", "attention_mask", "labels")}
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
        set_seed(self.cfg.seed)  # same seed on every rank: identical adapters
        with D.main_first():
            base = load_model(self.cfg.model, self.cache_dir, self.device,
                              vocab_size=len(self.tok) if self.cfg.model.source == "tiny" else None)
        if base.generation_config is not None:
            base.generation_config.pad_token_id = self.tok.pad_token_id
        pre = self.target_loss(base) if measure_step0 else None
        method = registry.build(self.cfg.method)
        method.run_dir = self.run_dir if self.is_main else None  # diagnostics: rank 0 writes
        method.task_names = list(self.cfg.data.tasks)
        method.mode, method.stages = self.cfg.training_mode.name, [s.name for s in self.stages]
        model = method.apply(base)
        if measure_step0 and pre is not None:
            start = self.target_loss(model, method)
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

    def make_engine(self, model, method, total_steps: int) -> E.Engine:
        """The stage's engine from ``trainer`` and ``distributed`` (flat arguments) and the
        method's schedule phases; a method that may leave parameters without a gradient in a
        step (``skips_parameters``: sparse dispatch) is declared to DDP."""
        t, d = self.cfg.trainer, self.cfg.distributed
        optim = E.Optim(lr=t.lr, weight_decay=t.weight_decay, lr_scheduler=t.lr_scheduler,
                        warmup_ratio=t.warmup_ratio, grad_accum_steps=t.grad_accum_steps,
                        max_grad_norm=t.max_grad_norm,
                        phases=tuple(method.lr_phases(total_steps) or ()))
        skips_parameters = method.skips_parameters
        ds = (ds_config_for(t, d, D.world_size(), self.autocast_dtype == torch.bfloat16)
              if d.name == "zero2" else None)
        return E.build_engine(model, d.name, optim, total_steps, device=self.device,
                              find_unused_parameters=d.find_unused_parameters or skips_parameters,
                              ds_config=ds,
                              config_path=self.run_dir / "deepspeed_config.json")

    # ------------------------------------------------------------------------------ steps
    def train_stage(self, model, method, i: int, stage: Stage, progress: Dict) -> Dict:
        examples = [ex for t in stage.train_tasks for ex in self.train_examples[t]]
        found = self.rundir.load_in_stage(i)
        resume_state = None
        if found is not None:
            tensors, resume_state = found
            method.load_state_dict(model, tensors)
            log.info("resuming stage %d (%s) at epoch %d, batch %d", i, stage.name,
                     resume_state["position"]["epoch"], resume_state["position"]["batch"])
        # logs written after the checkpoint we resume from would otherwise appear twice
        done_steps = resume_state["position"]["step"] if resume_state else 0
        last = progress["global_step"] + done_steps
        if self.is_main:
            truncate_jsonl(self.logger.path, lambda r: not (r.get("train/stage") == stage.name
                                                            and r.get("step", 0) > last))
        method.on_resume(stage.name, done_steps)

        def save(pos: Position, tstate: Dict) -> None:
            self.rundir.save_in_stage(i, stage.name, method.state_dict(model), tstate)
            D.barrier()

        t = self.cfg.trainer
        trainer = StageTrainer(
            model, method, examples,
            make_engine=lambda n: self.make_engine(model, method, n),
            epochs=t.epochs, batch_size=t.per_device_batch_size,
            grad_accum_steps=t.grad_accum_steps, seed=self.cfg.seed, stage_index=i,
            stage_name=stage.name, pad_id=self.tok.pad_token_id, device=self.device,
            autocast_dtype=self.autocast_dtype, log_every=t.log_every,
            checkpoint_every_steps=t.checkpoint_every_steps, logger=self.logger,
            global_step_offset=progress["global_step"], save_checkpoint=save)
        return trainer.run(resume_state)

    def evaluate(self, model, method, i: int, stage: Stage, final: bool,
                 step: int = 0) -> Dict[str, Dict[str, float]]:
        """Evaluate ``stage.eval_tasks``; per-task results are kept as they finish so a crash
        during evaluation does not redo finished tasks. Generation is sharded over ranks (see
        :func:`badit_exp.evaluation.generate.generate`); rank 0 writes."""
        partial_path = self.rundir.eval_partial(i)
        done = json.loads(partial_path.read_text()) if partial_path.exists() else {}
        done = D.broadcast_object(done)  # every rank evaluates the same remaining tasks
        pred_dir = self.run_dir / "predictions"
        if self.cfg.training_mode.name == "sequential":
            pred_dir = pred_dir / f"after_{i:02d}_{stage.name}"
        todo = [t for t in stage.eval_tasks if t not in done]
        for t in tqdm(todo, desc=f"evaluate after {stage.name}",
                      disable=len(todo) < 2 or not self.is_main):
            n = None if final else self.cfg.data.max_eval_per_task_intermediate
            method.start_eval(t)
            scores, records = evaluate_task(
                model, self.tok, take(self.eval_tasks[t], n), self.eval_examples[t][:n],
                batch_size=self.cfg.trainer.eval_batch_size,
                max_new_tokens=self.cfg.data.max_new_tokens, device=self.device,
                autocast_dtype=self.autocast_dtype, loss_examples=self.eval_loss_examples[t][:n],
                before_forward=lambda batch: method.before_forward(model, batch))
            extra = self._extra_losses(model, method, t, len(records), final)
            if extra:  # the row's loss over the larger loss sample
                scores = dict(scores, loss=sum(r["loss"] for r in records + extra)
                              / len(records + extra), loss_n=len(records + extra))
            method.end_eval(t)
            done[t] = scores
            if self.is_main:
                write_jsonl(pred_dir / f"{t}.jsonl", records)
                if extra:
                    write_jsonl(pred_dir / f"{t}.losses.jsonl", extra)
                if final and pred_dir != self.run_dir / "predictions":
                    write_jsonl(self.run_dir / "predictions" / f"{t}.jsonl", records)
                atomic_write_json(partial_path, done)
            self.logger.log({f"eval/{t}/rougeL": scores["rougeL"],
                             f"eval/{t}/exact_match": scores["exact_match"], "eval/stage": i},
                            step=step)
        method.after_evaluate(stage.name)
        return done

    def _extra_losses(self, model, method, t: str, generated: int, final: bool) -> List[Dict]:
        """An intermediate row's teacher-forced losses beyond its generated examples, up to
        ``data.loss_eval_per_task_intermediate`` (``[{"id", "loss"}]``; empty when none)."""
        k = self.cfg.data.loss_eval_per_task_intermediate
        if final or not k or k <= generated:
            return []
        ex = self.eval_loss_examples[t][generated:k]
        insts = self.eval_tasks[t].instances[generated:k]
        losses = example_losses(model, ex, pad_id=self.tok.pad_token_id,
                                batch_size=self.cfg.trainer.eval_batch_size, device=self.device,
                                autocast_dtype=self.autocast_dtype,
                                before_forward=lambda batch: method.before_forward(model, batch))
        return [{"id": x.id, "loss": v} for x, v in zip(insts, losses)]

    def checkpoint_stage(self, model, method, i: int) -> None:
        self.rundir.save_stage(i, method.state_dict(model))
        D.barrier()

    # ------------------------------------------------------------------------------ run
    def run(self) -> Optional[Dict]:
        """Run (or continue) every stage, then write the results (rank 0 returns them)."""
        self.setup()
        progress = D.broadcast_object(self.rundir.load_progress() if self.is_main else None)
        model = method = None
        n = len(self.stages)
        ran = False
        for i, stage in enumerate(self.stages):
            if stage.name in progress["completed"]:
                continue
            ran = True
            if model is None or stage.fresh_model:
                first = "target_loss" not in progress and self.cfg.trainer.step0_examples > 0
                model, method = self.build_model(measure_step0=first)
                if first:
                    progress["target_loss"] = dict(self.step0)
                if not stage.fresh_model and i > 0:
                    tensors, _, _ = self.rundir.load_stage(i - 1)
                    method.load_state_dict(model, tensors)
            # single mode: every stage's evaluation is its task's only, final score (a_{t,0}),
            # so it scores the full evaluation sample, never the intermediate cap
            final = i == n - 1 or self.cfg.training_mode.name == "single"
            self._run_stage(model, method, i, stage, progress, final=final)
        self.model, self.method = model, method  # the trained adapter, for notebooks and tests
        if model is not None:
            self.rundir.export_adapter(method.state_dict(model),
                                       {"method": self.resolved["method"],
                                        "model": self.resolved["model"], "seed": self.cfg.seed,
                                        "variant": method.describe()})
        result = None
        if self.is_main:
            variant = registry.build(self.cfg.method).describe()
            result = write_results(self.cfg, self.resolved, self.stages, progress, self.run_dir,
                                   variant)
            if ran:  # a finished run started again logs nothing new
                self.logger.log({f"cl/{k}": result[k] for k in METRIC_NAMES
                                 if result.get(k) is not None}, step=progress["global_step"])
        self.logger.close()
        D.barrier()
        return result

    def _run_stage(self, model, method, i: int, stage: Stage, progress: Dict,
                   final: bool) -> None:
        data = [self.train_examples[t] for t in stage.train_tasks]
        t0 = time.perf_counter()
        sync_rng()  # a method drawing random numbers at a task boundary (a new branch's
        method.on_stage_start(model, i, stage.name, data)  # init) draws the same on all ranks
        summary = self.train_stage(model, method, i, stage, progress)
        sync_rng()
        method.on_stage_end(model, i, stage.name, data)
        t_train = time.perf_counter() - t0 + summary.get("resumed_seconds", 0.0)
        slice_loss = (self.target_loss(model, method) if self.cfg.trainer.step0_examples
                      else None)
        self.checkpoint_stage(model, method, i)
        t1 = time.perf_counter()
        scores = self.evaluate(model, method, i, stage, final=final,
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
        self.rundir.save_progress(progress)
        self.rundir.drop_stale(i)
