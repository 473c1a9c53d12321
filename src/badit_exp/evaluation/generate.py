"""Batched greedy generation (KV cache, left padding) and per-task evaluation."""

from __future__ import annotations

import contextlib
from typing import Dict, List, Sequence

import torch
from tqdm.auto import tqdm

from badit_exp import dist as D
from badit_exp.data.prompts import collate_eval
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


def evaluate_task(model, tok, task, examples, *, batch_size: int, max_new_tokens: int,
                  device: torch.device, autocast_dtype=None):
    """Generate for every instance of ``task`` and score it.

    Returns:
        (aggregate scores {"rougeL", "exact_match"}, per-instance records for the jsonl file)
    """
    preds = generate(model, tok, examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     device=device, autocast_dtype=autocast_dtype, desc=f"eval {task.name}")
    records = []
    for inst, pred in zip(task.instances, preds):
        s = score_one(pred, inst.outputs)
        records.append({"id": inst.id, "prediction": pred, "references": list(inst.outputs), **s})
    return aggregate(records), records
