"""The cost model behind ``python -m badit_exp.study plan`` (every run a study would launch, its
command, its resources and an estimated GPU-hours figure, with the total; nothing is started).

Each run's command is composed and validated (:func:`badit_exp.compose.load`) exactly as the run
would compose it, so a plan that prints is a plan whose commands start. Before the tuning has
chosen a rate, a test or single-task run is listed at its grid's middle rate, marked
``(tuned)``: its rate is not known yet, its cost does not depend on it.

The estimate (``estimate`` in the study file):

- training: the tokens a run trains on (every training instance of every task, tokenised as the
  run tokenises it, times the epochs) times a measured time per token of the method on a
  reference model (``estimate.step_times``: a ``benchmarks/step_time.py`` result: median step
  time / (batch x sequence length)), scaled by the ratio of non-embedding parameters (the
  study's model over the reference model; both counted on PyTorch's meta device). Training
  cost grows about linearly with both (forward and backward through every layer; the
  adapters are small), so the estimate scales with tokens x parameters; it ignores the
  attention's quadratic term and ZeRO-2's communication, and per-device batch 1 uses a GPU less
  well than the benchmark's batch, so read it as a lower bound.
- evaluation: each generated example's prompt at half the training time per token (a forward
  pass) plus ``max_new_tokens`` decoding steps, each reading the model's bf16 weights once per
  batch of ``estimate.eval_examples_per_batch`` at ``estimate.hbm_tb_s``.
- a floor per optimizer step (``estimate.step_floor_s``, per GPU; kernel launches and ZeRO-2's
  reduction do not shrink with a short batch-1 sequence): training takes at least the run's
  steps times the floor. The default 0.1 s is an assumption, not a measurement; replace it with
  a step time measured on the target model (``benchmarks/step_time.py --batch-size 1``).
- GPU-hours = seconds x the run's GPUs / 3600 (training and generation are sharded over them).

Token counts use the offline SmolLM2 tokenizer when the study's model's own is not at hand
(the hub is not reachable here); the plan says which.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from badit_exp.compose import load


def run_overrides(cmd: Sequence[str]) -> List[str]:
    """The Hydra overrides of a study command (``python -m badit_exp.train ...``) that compose
    the run's config (hydra.* settings only place its files)."""
    return [c for c in cmd[3:] if not c.startswith("hydra.")]


# ---------------------------------------------------------------------------- cost model
def non_embedding_params(cfg) -> int:
    """Parameters of ``cfg.model`` outside the embeddings and the output head (meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    from badit_exp.params import architecture

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(architecture(cfg))
    return sum(p.numel() for n, p in m.named_parameters()
               if "embed_tokens" not in n and "lm_head" not in n)


def reference(path: Path) -> Dict:
    """A step-time benchmark: seconds per token per method, the device and the reference
    model's non-embedding parameters."""
    d = json.loads(path.read_text())
    cfg = load([f"model={d['model']}", *d.get("overrides", [])])
    tokens = int(d["batch_size"]) * int(d["seq_len"])
    return {"s_per_token": {m: v["median_s"] / tokens for m, v in d["step_time"].items()},
            "params": non_embedding_params(cfg), "device": d["provenance"]["device"]["name"],
            "path": str(path), "model": d["model"], "tokens_per_step": tokens}


def _tokenizer(cfg):
    """The run's tokenizer when it is on this machine (a hub model in the local Hugging Face
    cache, or a local model), else SmolLM2's (a proxy); (tok, name). Never waits on the hub."""
    from transformers import AutoTokenizer

    from badit_exp.models import load_tokenizer

    cache = Path(cfg.paths.cache_dir).expanduser()
    if cfg.model.source != "hub":
        return load_tokenizer(cfg.model, cache), cfg.model.name
    try:
        return AutoTokenizer.from_pretrained(cfg.model.hub_id, local_files_only=True), \
            cfg.model.name
    except Exception:  # noqa: BLE001 - not cached here: the proxy is stated in the plan
        return load_tokenizer(load(["model=smollm2-135m"]).model, cache), "smollm2-135m (proxy)"


def data_tokens(cfg) -> Dict:
    """Per task: training tokens of one epoch, evaluation examples and their prompt tokens,
    tokenised as a run does (hold-out carved, caps applied)."""
    from badit_exp.data.prompts import tokenize_task
    from badit_exp.data.superni import load_task, split_holdout, take

    d = cfg.data
    tok, name = _tokenizer(cfg)
    root = Path(d.root).expanduser()
    out = {"tokenizer": name, "tasks": {}}
    kw = dict(max_seq_len=d.max_seq_len, max_new_tokens=d.max_new_tokens, seed=0)
    for t in d.tasks:
        pool, held = split_holdout(load_task(root, t, d.train_split), d.holdout_per_task,
                                   d.holdout_seed)
        tr = take(pool, d.max_train_per_task)
        ev = (take(held, d.max_eval_per_task) if d.eval_split == "holdout"
              else load_task(root, t, d.eval_split, d.max_eval_per_task))
        train = tokenize_task(tr, tok, kind="train", **kw)
        evx = tokenize_task(ev, tok, kind="eval", **kw)
        out["tasks"][t] = {"train_tokens": sum(len(x["input_ids"]) for x in train),
                           "train_n": len(train),
                           "eval_n": len(evx),
                           "eval_prompt_tokens": [len(x["input_ids"]) for x in evx]}
    return out


def run_cost(cfg, mode: str, data: Dict, ref: Dict, method: str, params: int, gpus: int,
             est) -> Dict:
    """Seconds of training and of evaluation of one run (all its GPUs together), see the
    module docstring."""
    s_tok = ref["s_per_token"].get(method, ref["s_per_token"][est.fallback_method])
    scale = params / ref["params"]
    tasks = data["tasks"]
    train_tok = sum(v["train_tokens"] for v in tasks.values()) * cfg.trainer.epochs
    # optimizer steps: mixed = all tasks at once; sequential / single = one stage per task
    batch = cfg.trainer.per_device_batch_size * cfg.trainer.grad_accum_steps * max(gpus, 1)
    n_ex = [v["train_n"] for v in tasks.values()]
    steps = (-(-sum(n_ex) * cfg.trainer.epochs // batch) if mode == "mixed"
             else sum(-(-n * cfg.trainer.epochs // batch) for n in n_ex))
    compute_s = train_tok * s_tok * scale  # all GPUs together
    # a step cannot be faster than the floor (kernel launches, ZeRO-2's reduction): per GPU
    train_s = max(compute_s, steps * est.step_floor_s * max(gpus, 1))
    weights_bytes = 2 * params  # bf16; the embeddings' reads are left out like their FLOPs
    decode_s = cfg.data.max_new_tokens * weights_bytes / (est.hbm_tb_s * 1e12) \
        / est.eval_examples_per_batch

    def gen(task: str, n: Optional[int]) -> float:
        p = tasks[task]["eval_prompt_tokens"][:n] if n else tasks[task]["eval_prompt_tokens"]
        return sum(p) * s_tok * scale / 2 + len(p) * decode_s

    names = list(tasks)
    if mode == "mixed":
        eval_s = sum(gen(t, None) for t in names)
    elif mode == "single":
        eval_s = sum(gen(t, None) for t in names)
    else:  # T rows; the ones before the last on the intermediate sample
        k = cfg.data.max_eval_per_task_intermediate
        eval_s = (len(names) - 1) * sum(gen(t, k) for t in names) + sum(gen(t, None)
                                                                         for t in names)
    return {"train_s": train_s, "compute_s": compute_s, "eval_s": eval_s,
            "train_tokens": train_tok, "steps": steps, "s_per_token": s_tok,
            "param_scale": scale}


