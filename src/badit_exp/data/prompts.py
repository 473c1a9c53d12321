"""Prompt format, training-target choice, tokenisation (cached) and collation (SPEC section 1).

Prompt (the reference code's, after SuperNI/SAPT)::

    {definition}

    Now complete the following example -
    Input: {input}
    Output:

Training target: one reference (chosen reproducibly from the seed and the instance id,
stripped, at most ``max_new_tokens`` tokens) followed by EOS; the loss covers only those tokens.
A prompt that does not fit ``max_seq_len`` next to its target loses tokens from its middle
(the end of the input), so the definition and the ``Output:`` cue always survive.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Dict, List, Optional

import torch

from badit_exp.data.superni import Instance, Task

TEMPLATE = "{definition}\n\nNow complete the following example -\nInput: {input}\nOutput: "


def build_prompt(definition: str, text: str) -> str:
    return TEMPLATE.format(definition=definition, input=text)


def choose_reference(inst: Instance, seed: int) -> str:
    """The training reference of an instance: reproducible from (seed, instance id)."""
    refs = [r.strip() for r in inst.outputs if r.strip()]
    return refs[0] if len(refs) == 1 else random.Random(f"{seed}:{inst.id}").choice(refs)


def _fit(ids: List[int], budget: int) -> List[int]:
    """Keep the head and the tail of a too-long prompt, dropping the middle."""
    if len(ids) <= budget:
        return ids
    head = budget // 2
    return ids[:head] + ids[len(ids) - (budget - head):]


def _cache_key(tok, task_file: Path, kind: str, ids: List[str], max_seq_len: int, max_new: int,
               seed: int) -> str:
    st = task_file.stat()
    # the instances themselves, not their number: a hold-out changes which ones a file gives
    id_hash = hashlib.sha1("\n".join(ids).encode()).hexdigest()
    blob = json.dumps([getattr(tok, "name_or_path", ""), len(tok), tok.eos_token_id,
                       str(task_file.resolve()), st.st_size, st.st_mtime_ns, kind, id_hash,
                       max_seq_len, max_new, seed, TEMPLATE], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def tokenize_task(task: Task, tok, *, kind: str, max_seq_len: int, max_new_tokens: int,
                  seed: int, cache_dir: Optional[Path] = None,
                  task_file: Optional[Path] = None) -> List[Dict[str, List[int]]]:
    """Token ids of a task's instances.

    Args:
        kind: ``train`` -> ``input_ids`` (prompt + target + EOS) and ``prompt_len``;
            ``eval`` -> ``input_ids`` of the prompt only (room left for generation).
        cache_dir: where the tokenised task is cached (a ``datasets`` Arrow file keyed by the
            tokenizer, the file's size and mtime, and these settings); None disables caching.
    Returns:
        One dict per instance, in file order.
    """
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    eos = tok.eos_token_id

    def encode(batch):
        prompts = [build_prompt(task.definition, x) for x in batch["input"]]
        p_ids = tok(prompts, add_special_tokens=True)["input_ids"]
        if kind == "eval":
            return {"input_ids": [_fit(p, max_seq_len - max_new_tokens) for p in p_ids],
                    "prompt_len": [min(len(p), max_seq_len - max_new_tokens) for p in p_ids]}
        t_ids = tok(batch["target"], add_special_tokens=False)["input_ids"]
        out_ids, plens = [], []
        for p, t in zip(p_ids, t_ids):
            t = t[:max_new_tokens] + [eos]
            p = _fit(p, max_seq_len - len(t))
            out_ids.append(p + t)
            plens.append(len(p))
        return {"input_ids": out_ids, "prompt_len": plens}

    records = {"input": [i.input for i in task.instances],
               "target": [choose_reference(i, seed) for i in task.instances]}
    ds = Dataset.from_dict(records)
    kw = {}
    if cache_dir is not None and task_file is not None:
        key = _cache_key(tok, task_file, kind, [i.id for i in task.instances], max_seq_len,
                         max_new_tokens, seed)
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        kw = dict(cache_file_name=str(Path(cache_dir) / f"{task.name}-{kind}-{key}.arrow"),
                  load_from_cache_file=True)
    ds = ds.map(encode, batched=True, remove_columns=["input", "target"], **kw)
    return [{"input_ids": r["input_ids"], "prompt_len": r["prompt_len"]} for r in ds]


def collate_train(examples: List[Dict], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 on prompt and padding (pad may equal EOS)."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        x = torch.tensor(e["input_ids"], dtype=torch.long)
        ids[i, : len(x)] = x
        mask[i, : len(x)] = 1
        labels[i, e["prompt_len"]: len(x)] = x[e["prompt_len"]:]
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if all("task_index" in e for e in examples):  # for methods that need the sample's task
        out["task_index"] = torch.tensor([e["task_index"] for e in examples], dtype=torch.long)
    return out


def collate_eval(examples: List[Dict], pad_id: int) -> Dict[str, torch.Tensor]:
    """Left-padded prompts for batched generation."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        x = torch.tensor(e["input_ids"], dtype=torch.long)
        ids[i, n - len(x):] = x
        mask[i, n - len(x):] = 1
    return {"input_ids": ids, "attention_mask": mask}
