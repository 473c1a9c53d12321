"""One table of methods, one row per ``conf/method/*.yaml``, through the same checks (as PEFT's
``tests/test_custom_models.py``): trainable-parameter count, only the adapter changes in a
step, apply + forward on the three tiny architectures, save/reload, mid-stage resume.

A new method adds its row here (README, "Adding a method"); a YAML without a row fails
:func:`test_every_method_yaml_has_a_row`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from badit_exp.compose import CONF_DIR, load
from badit_exp.data import load_task
from badit_exp.data.prompts import collate_train, tokenize_task
from badit_exp.methods import registry
from badit_exp.models import load_model, load_tokenizer, resolve_device
from badit_exp.training import engine as E
from badit_exp.training.loop import StageTrainer
from conftest import CACHE, SUPERNI, TASKS3, slow_unless


@dataclass(frozen=True)
class Row:
    continual: bool  # grows or protects state at task boundaries (sequential mode)
    exact_at_init: bool  # the adapted model computes the base model's function at step 0
    router: bool  # a mixture with a router (writes router statistics)
    # trainable parameters on tiny-llama (2 layers, d=64, ffn=128), by hand: a rank-4 LoRA on
    # gate_proj is 2 x (4*64 + 128*4) = 1536; K=8 experts + a 64->8 router 2 x (8*768 + 512);
    # Eq. 7's scalar router 8 alphas; badit_reference K=6, router frozen; loramoe_original also
    # on up/down with token routers; gainlora B (128x4) + its gate MLP (64->100->64) + key;
    # hydralora one A per linear (gate/up/down, N=4); mola 2 and 6 experts (depth rule on 2
    # layers) of r=8 on the 7 projections; mixlora 8 x r=8 LoRAs on gate/up/down + q/v LoRA;
    # mtl_lora on q/k/v/o, r=8, 3 tasks: A 8*in + 3 Lambdas 8x8 + 3x3 mixing + 3 B's out x 8;
    # lori: only B (A frozen), r=32 on the 7 projections: 32 x (64+32+32+64+128+128+64) x 2;
    # mtlora beside each MLP (d=64, one group): A 16x64 + 16 B's 64x16 + router 64x16, x 2;
    # flylora only B (A frozen), r=32 on the 7 projections: 32 x 512 out x 2 (as lori);
    # smora r=64 on the 7: A 64 x in + router 64 x in + B out x 64, in = out = 512 summed, x 2;
    # flylora_k8 B 128x32 x 2; smora_k8 r=32 on gate: A 32x64 + router 32x64 + B 128x32, x 2
    trainable_tiny_llama: int


METHODS: Dict[str, Row] = {
    "lora": Row(False, True, False, 1536),
    "pissa": Row(False, True, False, 1536),
    "olora": Row(False, True, False, 1536),
    "o_lora": Row(True, True, False, 1536),
    "gainlora": Row(True, True, False, 13888),
    "loramoe": Row(False, True, True, 13312),
    "loramoe_original": Row(False, True, True, 40960),
    "badit": Row(False, True, True, 13312),
    "badit_paper": Row(False, True, True, 12304),
    "badit_reference": Row(False, False, True, 9216),
    "badit_anchor": Row(False, True, True, 13312),
    "badit_wo_bad": Row(False, True, True, 13312),
    "badit_wo_dog": Row(False, True, True, 13312),
    "hydralora": Row(False, True, True, 14336),
    "hydralora_k8": Row(False, True, True, 9728),
    "mola": Row(False, True, True, 69632),
    "mola_k8": Row(False, True, True, 9984),
    "mixlora": Row(False, True, True, 78336),
    "mixlora_k8": Row(False, True, True, 10240),
    "mtl_lora": Row(True, True, False, 14920),
    "lori": Row(True, True, False, 32768),
    "mtlora": Row(False, True, True, 36864),
    "mtlora_k8": Row(False, True, True, 16000),
    "lora_r32": Row(False, True, False, 12288),
    "pissa_r32": Row(False, True, False, 12288),
    "lori_k8": Row(True, True, False, 8192),
    "mtl_lora_k8": Row(True, True, False, 12680),
    "flylora": Row(False, True, False, 32768),
    "flylora_k8": Row(False, True, False, 8192),
    "smora": Row(False, True, False, 196608),
    "smora_k8": Row(False, True, False, 16384),
}
ARCHS = ["tiny-llama", "tiny-qwen3", "tiny-gemma2"]
CPU = resolve_device("cpu")
# rows that run another row's code at another size (BADIT's budget): their reload, resume and
# other-architecture checks are slow (--runslow); their count and training step stay fast
SIZE_VARIANTS = {"lora_r32": "lora", "pissa_r32": "pissa", "hydralora_k8": "hydralora",
                 "mola_k8": "mola", "mixlora_k8": "mixlora", "mtl_lora_k8": "mtl_lora",
                 "lori_k8": "lori", "mtlora_k8": "mtlora", "flylora_k8": "flylora",
                 "smora_k8": "smora"}
# on Qwen3 and Gemma-2 the fast suite runs one row per layer kind and init (every row runs on
# tiny-llama); the others there with --runslow
ARCH_FAST = {"lora", "pissa", "badit", "mixlora", "mtlora", "smora"}
FULL = [slow_unless(n not in SIZE_VARIANTS, n) for n in sorted(METHODS)]


def test_every_method_yaml_has_a_row():
    yamls = {p.stem for p in (Path(CONF_DIR) / "method").glob("*.yaml")}
    assert yamls == set(METHODS), f"rows missing: {yamls - set(METHODS)}, stale: {set(METHODS) - yamls}"


@functools.lru_cache(maxsize=None)
def _cfg(method: str, model: str, seed: int):
    return load([f"model={model}", f"method={method}", "scale=tiny", f"data.root={SUPERNI}",
                 f"paths.cache_dir={CACHE}", f"seed={seed}"])


@functools.lru_cache(maxsize=None)
def _tok(model: str):
    return load_tokenizer(_cfg("lora", model, 1).model, CACHE)


def _base(model: str, seed: int):
    """A fresh tiny base model (built from the seed) and the shared tokenizer."""
    tok = _tok(model)
    torch.manual_seed(seed)
    return load_model(_cfg("lora", model, seed).model, CACHE, CPU, vocab_size=len(tok)), tok


def _build(method: str, model: str = "tiny-llama", seed: int = 1):
    cfg = copy.deepcopy(_cfg(method, model, seed))
    base, tok = _base(model, seed)
    m = registry.build(cfg.method)
    m.task_names = list(cfg.data.tasks)
    model_ = m.apply(base)
    return cfg, model_, m, tok


_EXAMPLES: Dict = {}


def _examples(tok, n=4) -> List[Dict]:
    """n tokenised training examples of each of TASKS3 (tokenised once per tokenizer and n)."""
    key = (getattr(tok, "name_or_path", ""), len(tok), n)
    if key not in _EXAMPLES:
        out = []
        for i, t in enumerate(TASKS3):
            task = load_task(SUPERNI, t, "train", n)
            ex = tokenize_task(task, tok, kind="train", max_seq_len=128, max_new_tokens=6, seed=1)
            for e in ex:
                e["task_index"] = i
            out += ex
        _EXAMPLES[key] = out
    return copy.deepcopy(_EXAMPLES[key])


def _trainer(cfg, model, method, examples, save=None):
    t = cfg.trainer
    optim = E.Optim(lr=t.lr, weight_decay=t.weight_decay, lr_scheduler=t.lr_scheduler,
                    warmup_ratio=t.warmup_ratio, grad_accum_steps=1, max_grad_norm=t.max_grad_norm)
    return StageTrainer(model, method, examples, epochs=2, batch_size=2, grad_accum_steps=1,
                        seed=cfg.seed, stage_index=0, stage_name="mixed", pad_id=0, device=CPU,
                        make_engine=lambda n: E.build_engine(  # with the method's phases
                            model, "none", dataclasses.replace(
                                optim, phases=tuple(method.lr_phases(n) or ())), n, device=CPU),
                        checkpoint_every_steps=2, save_checkpoint=save)


def _logits(model, tok, examples, method=None):
    model.eval()
    batch = collate_train(examples[:3], tok.pad_token_id)
    if method is not None:
        method.before_forward(model, batch)  # e.g. the task id (MTL-LoRA)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("name", sorted(METHODS))
def test_trainable_count_and_only_the_adapter_changes(name, superni):
    row = METHODS[name]
    cfg, model, method, tok = _build(name)
    examples = _examples(tok)
    method.on_stage_start(model, 0, "mixed", [examples])
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == row.trainable_tiny_llama
    tr = _trainer(cfg, model, method, examples)
    tr.setup()
    for k in range(2):  # the first step runs at the warm-up's lr 0
        batch = collate_train(examples[2 * k: 2 * k + 2], tok.pad_token_id)
        tr.train_step([batch], epoch=0, last_of_epoch=False)
        tr.pos.step += 1
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in frozen.items()), "a frozen parameter moved"
    assert any(not torch.equal(now[n], v) for n, v in trainable.items()), "nothing trained"


@pytest.mark.parametrize("name,arch", [slow_unless(a == "tiny-llama" or n in ARCH_FAST, n, a)
                                       for n in sorted(METHODS) for a in ARCHS])
def test_apply_and_forward_on_every_tiny_architecture(name, arch, superni):
    row = METHODS[name]
    base, tok = _base(arch, 1)
    examples = _examples(tok, n=2)
    ref = _logits(base, tok, examples)
    _, model, method, _ = _build(name, arch)
    method.on_stage_start(model, 0, "mixed", [examples])
    out = _logits(model, tok, examples, method)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    if row.exact_at_init:
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    else:
        assert not torch.allclose(out, ref, atol=1e-4)


@pytest.mark.parametrize("name", FULL)
def test_save_and_reload_gives_the_same_function(name, superni):
    cfg, model, method, tok = _build(name)
    examples = _examples(tok)
    method.on_stage_start(model, 0, "mixed", [examples])
    tr = _trainer(cfg, model, method, examples)
    tr.setup()
    for k in range(2):
        tr.train_step([collate_train(examples[2 * k: 2 * k + 2], tok.pad_token_id)], epoch=0,
                      last_of_epoch=False)
        tr.pos.step += 1
    state = method.state_dict(model)
    trained = _logits(model, tok, examples, method)
    # rebuilt as training.export.load_trained does: the same seed, then the saved state
    _, model2, method2, _ = _build(name)
    method2.on_stage_start(model2, 0, "mixed", [examples])
    assert not torch.equal(_logits(model2, tok, examples, method2), trained)  # the load matters
    method2.load_state_dict(model2, state)
    torch.testing.assert_close(_logits(model2, tok, examples, method2), trained, atol=0, rtol=0)


@pytest.mark.parametrize("name", FULL)
def test_mid_stage_resume_is_bit_identical(name, superni):
    """Train 2 epochs; separately, stop at the step-2 checkpoint, rebuild and resume."""
    cfg, model, method, tok = _build(name)
    examples = _examples(tok, n=2)  # 6 examples: 3 steps an epoch
    method.on_stage_start(model, 0, "mixed", [examples])
    saved = {}

    def save(pos, tstate):
        if pos.step == 2 and "state" not in saved:
            # as the runner's torch.save does: a copy (the optimizer's state_dict holds live tensors)
            saved["state"] = (method.state_dict(model), copy.deepcopy(tstate))

    _trainer(cfg, model, method, examples, save).run()
    full = method.state_dict(model)
    _, model2, method2, _ = _build(name)
    method2.on_stage_start(model2, 0, "mixed", [examples])
    tensors, tstate = saved["state"]
    method2.load_state_dict(model2, tensors)
    method2.on_resume("mixed", tstate["position"]["step"])
    _trainer(cfg, model2, method2, examples).run(tstate)
    resumed = method2.state_dict(model2)
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


# one method of each kind of adapter in the fast suite; every row in the slow one
PARAMS_FAST = ("lora", "badit", "gainlora", "lori_k8", "mtl_lora", "smora_k8")


@pytest.mark.parametrize("rows", [PARAMS_FAST, pytest.param(tuple(METHODS), marks=pytest.mark.slow)],
                         ids=["one_per_kind", "every_row"])
def test_the_params_tool_counts_on_the_meta_device_what_a_run_trains(rows):
    """`python -m badit_exp.params` builds on the meta device: the same counts as the real
    tiny model (the table's hand counts, which the real-model test checks for every row), and
    LoRA on Qwen3-8B by hand: 36 x 4 x (4096 + 12288)."""
    from badit_exp.params import count

    for name in rows:
        assert count("tiny-llama", name, ["scale=tiny"])["trainable"] == \
            METHODS[name].trainable_tiny_llama, name
    q = count("qwen3-8b", "lora")
    assert q["trainable"] == 36 * 4 * (4096 + 12288) and q["mergeable"] and not q["needs_task_id"]
    assert count("qwen3-8b", "badit_paper")["mergeable"] and not count("tiny-llama", "badit")["mergeable"]
