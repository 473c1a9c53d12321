"""Training of one stage: AdamW + warm-up + schedule, gradient accumulation, resumable.

:class:`StageTrainer`, in named steps: ``_setup_schedule`` (this rank's micro-batches, the
number of optimizer steps), ``_setup_engine`` (AdamW alone, under DDP or under DeepSpeed ZeRO-2,
see :mod:`badit_exp.training.engine`), ``_setup_resume`` (engine, RNG and position from an
in-stage checkpoint); then :meth:`StageTrainer.train_step` for each group of micro-batches of a
seeded permutation: forward and backward of each, the method's ``after_backward`` hook (e.g. DOG,
on gradients reduced over all ranks), clipping, the optimizer step, the method's
``after_optimizer_step`` hook; ``_log`` every ``log_every`` steps and ``_checkpoint`` after every
``checkpoint_every_steps`` steps and at every epoch end, with everything needed to continue
bit for bit. The step-time benchmark calls the same ``train_step``.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from badit_exp import dist as D
from badit_exp.data.prompts import collate_train
from badit_exp.training.checkpoint import CheckpointError
from badit_exp.training.engine import Engine


@dataclass
class Position:
    """Where training stands inside a stage (what a checkpoint resumes from)."""

    epoch: int = 0
    batch: int = 0  # micro-batches of `epoch` already consumed
    step: int = 0  # optimizer steps taken in this stage


def rng_state() -> Dict:
    st = {"torch": torch.get_rng_state(), "random": random.getstate(),
          "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()  # this process's device only (one GPU per rank)
    return st


def set_rng_state(st: Dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["random"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def epoch_batches(n: int, batch_size: int, seed: int, stage: int, epoch: int,
                  rank: int = 0, world_size: int = 1) -> List[List[int]]:
    """This rank's shuffled micro-batches of one epoch, a pure function of (seed, stage, epoch).

    With ``world_size`` > 1 the permutation is padded by wrapping around (like torch's
    DistributedSampler) to a multiple of ``world_size * batch_size``, cut into micro-batches, and
    micro-batch ``b`` goes to rank ``b % world_size``: every rank takes the same number of steps,
    and one global step sees ``world_size`` consecutive micro-batches of the one-process order.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + stage * 1_009 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    if world_size > 1:
        chunk = world_size * batch_size
        pad = (-n) % chunk
        perm = perm + (perm * (pad // max(n, 1) + 1))[:pad]
    batches = [perm[i: i + batch_size] for i in range(0, len(perm), batch_size)]
    return batches[rank::world_size]


class StageTrainer:
    """Train ``model`` (its trainable parameters) on ``examples`` for ``epochs`` epochs.

    Args:
        model, method: the model with the method's adapter, and the method (its hooks).
        examples: the stage's tokenised training examples.
        make_engine: ``total_steps -> Engine`` (the runner builds it from the configs).
        epochs, batch_size, grad_accum_steps: the budget; 0 epochs = evaluation only.
        seed, stage_index, stage_name: what the data order and the RNG derive from.
        pad_id, device, autocast_dtype: collation and precision.
        log_every, checkpoint_every_steps: bookkeeping (0 = checkpoints at epoch ends only).
        logger: a :class:`badit_exp.training.logger.RunLogger`; steps are offset by
            ``global_step_offset`` (the steps of earlier stages).
        save_checkpoint: called on every rank with (position, trainer_state) at checkpoint
            points (gathering partitioned state is collective); rank 0 writes.
    """

    def __init__(self, model, method, examples: List[Dict], *,
                 make_engine: Callable[[int], Engine], epochs: int, batch_size: int,
                 grad_accum_steps: int, seed: int, stage_index: int, stage_name: str,
                 pad_id: int, device: torch.device, autocast_dtype=None, log_every: int = 10,
                 checkpoint_every_steps: int = 0, logger=None, global_step_offset: int = 0,
                 save_checkpoint: Optional[Callable[[Position, Dict], None]] = None):
        self.model, self.method, self.examples = model, method, examples
        self.make_engine = make_engine
        self.epochs, self.batch_size, self.grad_accum_steps = epochs, batch_size, grad_accum_steps
        self.seed, self.stage_index, self.stage_name = seed, stage_index, stage_name
        self.pad_id, self.device, self.autocast_dtype = pad_id, device, autocast_dtype
        self.log_every, self.checkpoint_every_steps = log_every, checkpoint_every_steps
        self.logger, self.global_step_offset = logger, global_step_offset
        self.save_checkpoint = save_checkpoint
        self.rank, self.world = D.rank(), D.world_size()
        self.pos = Position()
        self.engine: Optional[Engine] = None

    # -- setup --------------------------------------------------------------------------------
    def _batches(self, epoch: int) -> List[List[int]]:
        return epoch_batches(len(self.examples), self.batch_size, self.seed, self.stage_index,
                             epoch, self.rank, self.world)

    def _setup_schedule(self) -> None:
        n_micro = len(self._batches(0))
        self.steps_per_epoch = math.ceil(n_micro / self.grad_accum_steps)
        self.total_steps = self.steps_per_epoch * self.epochs

    def _setup_engine(self) -> None:
        self.engine = self.make_engine(self.total_steps)
        self.amp = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None and self.engine.autocast_ok
                    else contextlib.nullcontext())

    def _setup_resume(self, resume: Optional[Dict]) -> None:
        self._before: Dict = {}  # what the stage did before its checkpoint (seconds, tokens, losses)
        if resume is None:
            if self.rank > 0:  # different dropout masks on different shards; rank 0 keeps the
                torch.manual_seed(self.seed * 1_000_003 + self.stage_index * 1_009  # 1-GPU stream
                                  + 7919 * self.rank)
            return
        if resume["world_size"] != self.world and resume["position"]["batch"]:
            raise CheckpointError(
                f"the in-stage checkpoint was written by {resume['world_size']} processes and "
                f"this run has {self.world}; the data shards differ mid-epoch. Resume with "
                f"{resume['world_size']} processes (or delete checkpoints/in_stage to restart "
                "the stage).")
        self.engine.load_state_dict(resume["engine"])
        rngs = resume["rng"]
        set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])
        self.pos = Position(**resume["position"])
        before = dict(resume.get("elapsed") or {})  # older checkpoints: none (timing restarts)
        toks = before.get("tokens") or [0]
        before["tokens"] = toks[self.rank] if self.rank < len(toks) else 0
        self._before = before

    def setup(self, resume: Optional[Dict] = None) -> None:
        """Schedule, engine and (if given) the resumed state; the model in train mode. After it
        :meth:`train_step` may be called (the step-time benchmark does so directly)."""
        self._setup_schedule()
        self._setup_engine()
        self._setup_resume(resume)
        self.model.train()

    def trainer_state(self) -> Dict:
        """What a checkpoint holds besides the adapter (every rank calls it: gathering ZeRO
        partitions is collective, so the engine state comes first)."""
        t0 = getattr(self, "_t0", None)
        return {"engine": self.engine.state_dict(), "rng": D.all_gather_object(rng_state()),
                "position": self.pos.__dict__.copy(), "world_size": self.world,
                # the stage's training time, tokens (per rank) and logged losses so far: a
                # resumed stage reports its whole cost, not the part after the restart
                "elapsed": {"seconds": time.perf_counter() - t0 if t0 is not None else 0.0,
                            "tokens": D.all_gather_object(getattr(self, "_tokens", 0)),
                            "losses": list(getattr(self, "logged_losses", []))}}

    # -- the step -----------------------------------------------------------------------------
    def train_step(self, micro_batches: List[Dict], *, epoch: int, last_of_epoch: bool) -> Dict:
        """One optimizer step over ``micro_batches`` (collated, on the device): forward and
        backward of each, then the method's hooks around clipping and AdamW.

        Returns:
            ``{"loss": [task loss of each micro-batch], "tokens": [attended tokens of each]}``.
        """
        engine, method, model = self.engine, self.method, self.model
        losses, tokens = [], []
        for k, batch in enumerate(micro_batches):
            inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
            method.before_forward(model, batch)
            with self.amp:
                loss = engine.forward(**inputs).loss
                extra = method.extra_loss(model, batch)
                total_loss = loss if extra is None else loss + extra
            engine.backward(total_loss, boundary=k + 1 == len(micro_batches))
            losses.append(float(loss.detach()))
            tokens.append(int(batch["attention_mask"].sum()))
        method.after_backward(model, engine, step=self.pos.step, epoch=epoch,
                              num_epochs=self.epochs, last_of_epoch=last_of_epoch,
                              total_steps=self.total_steps)
        engine.step()
        method.after_optimizer_step(model, engine)
        return {"loss": losses, "tokens": tokens}

    def _collate(self, index_batches: List[List[int]]) -> List[Dict]:
        out = []
        for idx in index_batches:
            batch = collate_train([self.examples[i] for i in idx], self.pad_id)
            out.append({k: v.to(self.device) for k, v in batch.items()})
        return out

    # -- bookkeeping --------------------------------------------------------------------------
    def _log(self, epoch: int, window: Dict, bar) -> None:
        dt = time.perf_counter() - window["t0"]
        w_loss, w_n, w_tok = D.all_reduce_sum([window["loss"], window["n"], window["tokens"]])
        rec = {"train/loss": w_loss / w_n, "train/lr": self.engine.last_lr(),
               "train/tokens_per_s": w_tok / max(dt, 1e-9), "train/epoch": epoch,
               "train/stage": self.stage_name}
        if self.device.type == "cuda":
            rec["train/peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.logged_losses.append(rec["train/loss"])
        bar.set_postfix(loss=f"{rec['train/loss']:.3f}", tok_s=f"{rec['train/tokens_per_s']:.0f}")
        if self.logger is not None:
            self.logger.log(rec, step=self.global_step_offset + self.pos.step)

    def _checkpoint(self) -> None:
        if self.save_checkpoint:
            self.save_checkpoint(self.pos, self.trainer_state())

    # -- the stage ----------------------------------------------------------------------------
    def run(self, resume: Optional[Dict] = None) -> Dict:
        """Train the stage (from ``resume``, a :meth:`trainer_state`, if given).

        Returns:
            Summary: first/last logged loss, steps, tokens (all ranks), seconds, logged losses.
        """
        if self.epochs == 0:  # evaluation only: the model as initialised
            self.model.eval()
            return {"steps": 0, "tokens": 0, "seconds": 0.0, "first_loss": None,
                    "last_loss": None, "logged_losses": []}
        self.setup(resume)
        before = self._before
        self.logged_losses: List[float] = list(before.get("losses", []))
        window = {"loss": 0.0, "n": 0, "tokens": 0, "t0": time.perf_counter()}
        self._tokens = int(before.get("tokens", 0))
        self._t0 = time.perf_counter() - float(before.get("seconds", 0.0))
        bar = tqdm(total=self.total_steps, initial=self.pos.step, desc=f"train {self.stage_name}",
                   dynamic_ncols=True, disable=self.rank > 0)
        for epoch in range(self.pos.epoch, self.epochs):
            batches = self._batches(epoch)
            start = self.pos.batch if epoch == self.pos.epoch else 0
            for b in range(start, len(batches), self.grad_accum_steps):
                group = batches[b: b + self.grad_accum_steps]
                end = b + len(group)
                out = self.train_step(self._collate(group), epoch=epoch,
                                      last_of_epoch=end == len(batches))
                window["loss"] += sum(out["loss"])
                window["n"] += len(out["loss"])
                window["tokens"] += sum(out["tokens"])
                self._tokens += sum(out["tokens"])
                self.pos.step += 1
                self.pos.epoch, self.pos.batch = epoch, end
                bar.update(1)
                if self.pos.step % self.log_every == 0 or self.pos.step == self.total_steps:
                    self._log(epoch, window, bar)
                    window = {"loss": 0.0, "n": 0, "tokens": 0, "t0": time.perf_counter()}
                if self.checkpoint_every_steps and end < len(batches) and \
                        self.pos.step % self.checkpoint_every_steps == 0:
                    self._checkpoint()
            self.pos.epoch, self.pos.batch = epoch + 1, 0
            self._checkpoint()
        bar.close()
        self.engine.close()
        self.model.eval()
        tokens_total = int(D.all_reduce_sum([self._tokens])[0])
        losses = self.logged_losses
        return {"steps": self.pos.step, "tokens": tokens_total,
                "seconds": time.perf_counter() - self._t0,
                "resumed_seconds": float(before.get("seconds", 0.0)),
                "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None, "logged_losses": losses}
