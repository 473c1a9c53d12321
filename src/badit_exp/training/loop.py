"""Training of one stage: AdamW + warm-up + schedule, gradient accumulation, resumable.

Read top to bottom: build the engine (AdamW alone, under DDP or under DeepSpeed ZeRO-2, see
:mod:`badit_exp.training.engine`), then for each epoch a seeded permutation of the stage's
examples, this rank's micro-batches, backward, and at each accumulation boundary the method's
``after_backward`` hook (e.g. DOG, on gradients reduced over all ranks), clipping, the optimizer
step, the method's ``after_optimizer_step`` hook. A checkpoint after every ``checkpoint_every_steps`` optimizer
steps and at every epoch end holds everything needed to continue bit-for-bit.
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

from badit_exp.config import DistributedConfig
from badit_exp.data.prompts import collate_train
from badit_exp.training import distributed as D
from badit_exp.training.checkpoint import CheckpointError
from badit_exp.training.engine import build_engine


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
        if isinstance(st["cuda"], (list, tuple)):  # checkpoints before one-device states
            torch.cuda.set_rng_state_all(st["cuda"])
        else:
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


def train_stage(model, method, examples: List[Dict], *, tcfg, pad_id: int, seed: int,
                stage_index: int, stage_name: str, device: torch.device, autocast_dtype,
                logger, global_step_offset: int = 0,
                resume: Optional[Dict] = None,
                save_checkpoint: Optional[Callable[[Position, Dict], None]] = None,
                dcfg=None, run_dir=None) -> Dict:
    """Train ``model`` (its trainable parameters) on ``examples`` for ``tcfg.epochs`` epochs.

    Args:
        resume: a trainer state saved by this function (engine, RNG, position).
        save_checkpoint: called on every rank with (position, trainer_state) at checkpoint
            points (gathering partitioned state is collective); rank 0 writes.
        dcfg: ``distributed`` config (None = one process).
    Returns:
        Summary: first/last logged loss, steps, tokens (all ranks), seconds.
    """
    dcfg = dcfg or DistributedConfig()
    if tcfg.epochs == 0:  # evaluation only: the model as initialised
        model.eval()
        return {"steps": 0, "tokens": 0, "seconds": 0.0, "first_loss": None, "last_loss": None,
                "logged_losses": []}
    rank, world = D.rank(), D.world_size()
    n_micro = len(epoch_batches(len(examples), tcfg.per_device_batch_size, seed, stage_index, 0,
                                rank, world))
    steps_per_epoch = math.ceil(n_micro / tcfg.grad_accum_steps)
    total = steps_per_epoch * tcfg.epochs
    engine = build_engine(model, tcfg, dcfg, total, device, bf16=autocast_dtype == torch.bfloat16,
                          config_path=(run_dir / "deepspeed_config.json") if run_dir else None)
    pos = Position()
    if resume is not None:
        if resume.get("world_size", 1) != world and resume["position"]["batch"]:
            raise CheckpointError(
                f"the in-stage checkpoint was written by {resume.get('world_size', 1)} processes "
                f"and this run has {world}; the data shards differ mid-epoch. Resume with "
                f"{resume.get('world_size', 1)} processes (or delete checkpoints/in_stage to "
                "restart the stage).")
        engine.load_state_dict(resume.get("engine") or {"optimizer": resume["optimizer"],
                                                        "scheduler": resume["scheduler"]})
        rngs = resume["rng"] if isinstance(resume["rng"], list) else [resume["rng"]]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        pos = Position(**resume["position"])
    elif rank > 0:  # different dropout masks on different shards; rank 0 keeps the 1-GPU stream
        torch.manual_seed(seed * 1_000_003 + stage_index * 1_009 + 7919 * rank)
    amp = (torch.autocast(device.type, dtype=autocast_dtype)
           if autocast_dtype is not None and engine.autocast_ok else contextlib.nullcontext())

    def trainer_state() -> Dict:
        # engine state first: gathering ZeRO partitions is collective, every rank calls it
        return {"engine": engine.state_dict(), "rng": D.all_gather_object(rng_state()),
                "position": pos.__dict__.copy(), "world_size": world}

    model.train()
    losses: List[float] = []
    window_loss, window_n, window_tokens, t_window = 0.0, 0, 0, time.perf_counter()
    tokens_total, t0 = 0, time.perf_counter()
    bar = tqdm(total=total, initial=pos.step, desc=f"train {stage_name}", dynamic_ncols=True,
               disable=rank > 0)
    for epoch in range(pos.epoch, tcfg.epochs):
        batches = epoch_batches(len(examples), tcfg.per_device_batch_size, seed, stage_index,
                                epoch, rank, world)
        start = pos.batch if epoch == pos.epoch else 0
        for b in range(start, len(batches)):
            batch = collate_train([examples[i] for i in batches[b]], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
            boundary = (b + 1) % tcfg.grad_accum_steps == 0 or b + 1 == len(batches)
            with amp:
                loss = engine.forward(**inputs).loss
                extra = method.extra_loss(model, batch)
                total_loss = loss if extra is None else loss + extra
            engine.backward(total_loss, boundary)
            ntok = int(batch["attention_mask"].sum())
            window_loss += float(loss.detach())
            window_n += 1
            window_tokens += ntok
            tokens_total += ntok
            if not boundary:
                continue
            method.after_backward(model, engine, step=pos.step, epoch=epoch,
                                  num_epochs=tcfg.epochs, last_of_epoch=b + 1 == len(batches),
                                  total_steps=total)
            engine.step()
            method.after_optimizer_step(model, engine)
            pos.step += 1
            pos.epoch, pos.batch = epoch, b + 1
            bar.update(1)
            if pos.step % tcfg.log_every == 0 or pos.step == total:
                dt = time.perf_counter() - t_window
                w_loss, w_n, w_tok = D.all_reduce_sum([window_loss, window_n, window_tokens])
                rec = {"train/loss": w_loss / w_n, "train/lr": engine.last_lr(),
                       "train/tokens_per_s": w_tok / max(dt, 1e-9), "train/epoch": epoch,
                       "train/stage": stage_name}
                if device.type == "cuda":
                    rec["train/peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                losses.append(rec["train/loss"])
                bar.set_postfix(loss=f"{rec['train/loss']:.3f}",
                                tok_s=f"{rec['train/tokens_per_s']:.0f}")
                logger.log(rec, step=global_step_offset + pos.step)
                window_loss, window_n, window_tokens, t_window = 0.0, 0, 0, time.perf_counter()
            if save_checkpoint and tcfg.checkpoint_every_steps and \
                    pos.step % tcfg.checkpoint_every_steps == 0 and b + 1 < len(batches):
                save_checkpoint(pos, trainer_state())
        pos.epoch, pos.batch = epoch + 1, 0
        if save_checkpoint:
            save_checkpoint(pos, trainer_state())
    bar.close()
    engine.close()
    model.eval()
    tokens_total = int(D.all_reduce_sum([tokens_total])[0])
    return {"steps": pos.step, "tokens": tokens_total, "seconds": time.perf_counter() - t0,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "logged_losses": losses}
