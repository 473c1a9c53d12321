"""Training of one stage: AdamW + warm-up + schedule, gradient accumulation, resumable.

Read top to bottom: build the optimizer, then for each epoch a seeded permutation of the
stage's examples, micro-batches, backward, and at each accumulation boundary the method's
``after_backward`` hook (e.g. DOG), clipping, the optimizer step, the method's
``after_optimizer_step`` hook. A checkpoint after every ``checkpoint_every_steps`` optimizer
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
from transformers import get_scheduler

from badit_exp.data.prompts import collate_train


@dataclass
class Position:
    """Where training stands inside a stage (what a checkpoint resumes from)."""

    epoch: int = 0
    batch: int = 0  # micro-batches of `epoch` already consumed
    step: int = 0  # optimizer steps taken in this stage


def rng_state() -> Dict:
    st = {"torch": torch.get_rng_state(), "random": random.getstate(),
          "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["random"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def epoch_batches(n: int, batch_size: int, seed: int, stage: int, epoch: int) -> List[List[int]]:
    """The shuffled micro-batches of one epoch, a pure function of (seed, stage, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + stage * 1_009 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i: i + batch_size] for i in range(0, n, batch_size)]


def train_stage(model, method, examples: List[Dict], *, tcfg, pad_id: int, seed: int,
                stage_index: int, stage_name: str, device: torch.device, autocast_dtype,
                logger, global_step_offset: int = 0,
                resume: Optional[Dict] = None,
                save_checkpoint: Optional[Callable[[Position, Dict], None]] = None) -> Dict:
    """Train ``model`` (its trainable parameters) on ``examples`` for ``tcfg.epochs`` epochs.

    Args:
        resume: a trainer state saved by this function (optimizer, scheduler, RNG, position).
        save_checkpoint: called with (position, trainer_state) at checkpoint points.
    Returns:
        Summary: first/last logged loss, steps, tokens, seconds.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    n_micro = math.ceil(len(examples) / tcfg.per_device_batch_size)
    steps_per_epoch = math.ceil(n_micro / tcfg.grad_accum_steps)
    total = steps_per_epoch * tcfg.epochs
    warmup = math.ceil(tcfg.warmup_ratio * total)
    name = "constant_with_warmup" if tcfg.lr_scheduler == "constant" else tcfg.lr_scheduler
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    pos = Position()
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        set_rng_state(resume["rng"])
        pos = Position(**resume["position"])
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())

    def trainer_state() -> Dict:
        return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state(), "position": pos.__dict__.copy()}

    model.train()
    losses: List[float] = []
    window_loss, window_n, window_tokens, t_window = 0.0, 0, 0, time.perf_counter()
    tokens_total, t0 = 0, time.perf_counter()
    bar = tqdm(total=total, initial=pos.step, desc=f"train {stage_name}", dynamic_ncols=True)
    for epoch in range(pos.epoch, tcfg.epochs):
        batches = epoch_batches(len(examples), tcfg.per_device_batch_size, seed, stage_index,
                                epoch)
        start = pos.batch if epoch == pos.epoch else 0
        for b in range(start, len(batches)):
            batch = collate_train([examples[i] for i in batches[b]], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
            with amp:
                loss = model(**inputs).loss
                extra = method.extra_loss(model, batch)
                total_loss = loss if extra is None else loss + extra
            (total_loss / tcfg.grad_accum_steps).backward()
            ntok = int(batch["attention_mask"].sum())
            window_loss += float(loss.detach())
            window_n += 1
            window_tokens += ntok
            tokens_total += ntok
            boundary = (b + 1) % tcfg.grad_accum_steps == 0 or b + 1 == len(batches)
            if not boundary:
                continue
            method.after_backward(model, optimizer, step=pos.step, epoch=epoch,
                                  num_epochs=tcfg.epochs, last_of_epoch=b + 1 == len(batches))
            if tcfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            method.after_optimizer_step(model, optimizer)
            optimizer.zero_grad(set_to_none=True)
            pos.step += 1
            pos.epoch, pos.batch = epoch, b + 1
            bar.update(1)
            if pos.step % tcfg.log_every == 0 or pos.step == total:
                dt = time.perf_counter() - t_window
                rec = {"train/loss": window_loss / window_n, "train/lr": scheduler.get_last_lr()[0],
                       "train/tokens_per_s": window_tokens / max(dt, 1e-9), "train/epoch": epoch,
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
    model.eval()
    return {"steps": pos.step, "tokens": tokens_total, "seconds": time.perf_counter() - t0,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "logged_losses": losses}
