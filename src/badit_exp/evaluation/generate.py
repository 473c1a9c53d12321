"""Batched greedy generation (KV cache, left padding) and per-task evaluation."""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from badit_exp import dist as D
from badit_exp.data.prompts import collate_eval, collate_train
from badit_exp.evaluation.scoring import aggregate, score_one


@torch.no_grad()
def generate(model, tok, examples: Sequence[Dict], *, batch_size: int, max_new_tokens: int,
             device: torch.device, autocast_dtype=None, desc: str = "generate") -> List[str]:
    """Greedy continuations of tokenised prompts, decoded without the prompt.

    Prompts are batched by length (longest first) to limit padding; results come back in the
    input order. Under data parallelism the *batches* are dealt to ranks (batch b to rank
    b % world) and the texts gathered: every batch is the one a single process would run, so
    the predictions are identical to a one-process evaluation.
    """
    model.eval()
    rank, world = D.rank(), D.world_size()
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    starts = list(range(0, len(order), batch_size))[rank::world]
    mine: List = []
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    for start in tqdm(starts, desc=desc, leave=False, disable=len(starts) <= 1 or rank > 0):
        idx = order[start: start + batch_size]
        batch = collate_eval([examples[i] for i in idx], tok.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with amp:
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 num_beams=1, use_cache=True, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, temperature=None, top_p=None,
                                 top_k=None)
        cont = gen[:, batch["input_ids"].shape[1]:]
        mine += [(i, text.strip()) for i, text in
                 zip(idx, tok.batch_decode(cont, skip_special_tokens=True))]
    out: List[str] = [""] * len(examples)
    for part in D.all_gather_object(mine):
        for i, text in part:
            out[i] = text
    return out


@torch.no_grad()
def example_losses(model, examples: Sequence[Dict], *, pad_id: int, batch_size: int,
                   device: torch.device, autocast_dtype=None,
                   before_forward: Optional[Callable[[Dict], None]] = None) -> List[float]:
    """Teacher-forced mean cross-entropy of each example's target tokens (nats per token).

    Args:
        examples: tokenised with ``kind="train"`` (prompt + target + EOS, ``prompt_len``).
        before_forward: called with each collated batch first (a method's task id hook).
    Returns:
        One loss per example, in order. Every rank computes all of them (cheap next to
        generation), so the values do not depend on the number of processes.
    """
    was_training = model.training
    model.eval()
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    out: List[float] = []
    for i in range(0, len(examples), batch_size):
        full = {k: v.to(device) for k, v in
                collate_train(list(examples[i: i + batch_size]), pad_id).items()}
        if before_forward is not None:
            before_forward(full)
        with amp:
            logits = model(input_ids=full["input_ids"],
                           attention_mask=full["attention_mask"]).logits
        labels = full["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels,
                              ignore_index=-100, reduction="none")
        n = (labels != -100).sum(1).clamp(min=1)
        out += (nll.sum(1) / n).tolist()
    model.train(was_training)
    return out


def evaluate_task(model, tok, task, examples, *, batch_size: int, max_new_tokens: int,
                  device: torch.device, autocast_dtype=None,
                  loss_examples: Optional[Sequence[Dict]] = None,
                  before_forward: Optional[Callable[[Dict], None]] = None):
    """Generate for every instance of ``task`` and score it.

    Args:
        loss_examples: the same instances tokenised with their target (``kind="train"``); when
            given, each record also holds its teacher-forced target ``loss``.
    Returns:
        (aggregate scores {"rougeL", "exact_match"[, "loss"]}, per-instance records for the
        jsonl file)
    """
    preds = generate(model, tok, examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     device=device, autocast_dtype=autocast_dtype, desc=f"eval {task.name}")
    losses = (example_losses(model, loss_examples, pad_id=tok.pad_token_id,
                             batch_size=batch_size, device=device, autocast_dtype=autocast_dtype,
                             before_forward=before_forward)
              if loss_examples is not None else [None] * len(preds))
    records = []
    for inst, pred, loss in zip(task.instances, preds, losses):
        s = score_one(pred, inst.outputs)
        records.append({"id": inst.id, "prediction": pred, "references": list(inst.outputs), **s})
        if loss is not None:
            records[-1]["loss"] = loss
    return aggregate(records), records
