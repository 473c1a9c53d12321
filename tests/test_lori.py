"""LoRI: seeded frozen A, global magnitude mask after calibration, masked entries that never
move, disjoint masks for sequential tasks, the two-run form, the issue's CLI runs."""


import json
import math

import pytest
import torch
from safetensors.torch import load_file

from badit_exp import metrics as M
from badit_exp.config import ConfigError
from conftest import CACHE, run_cli, run_tiny, tiny_overrides


def _layers(state):
    return sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".lora_B")})


def test_masked_entries_are_exactly_zero_and_the_mask_is_the_global_top_k(tmp_path, stage_states,
                                                                          superni):
    states = stage_states
    run_tiny(tmp_path / "r", tiny_overrides(tmp_path, extra=[
        "method=lori", "method.sparsity=0.75", "trainer.epochs=3", "trainer.log_every=1"]))
    # the masked part runs its own warm-up + cosine at 10x the rate (the released LoRI-S)
    log = [json.loads(x) for x in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()]
    lrs = [r["train/lr"] for r in log if "train/lr" in r]  # the rate after each step: k = 1..n
    n, lr = len(lrs), 5e-3  # conf/scale/tiny.yaml
    assert n == 18
    half = [_lr_at(k, n // 2) for k in range(n // 2)] + [0.0]  # its rate after the last step: 0
    assert lrs == pytest.approx([lr * x for x in half[1:n // 2]]
                                + [10 * lr * x for x in half], abs=1e-12)
    st = states[0]
    names = _layers(st)
    total = sum(st[f"{n}.lori_mask"].numel() for n in names)
    kept = sum(int(st[f"{n}.lori_mask"].sum()) for n in names)
    assert kept == round(0.25 * total)  # one threshold over all layers together
    per_layer = {int(st[f"{n}.lori_mask"].sum()) for n in names}
    assert len(per_layer) > 1  # global, not per layer
    for n in names:
        B, m = st[f"{n}.lora_B"], st[f"{n}.lori_mask"]
        assert torch.equal(B * (1 - m), torch.zeros_like(B))  # bit-identical to their reset 0
        assert (B * m).abs().sum() > 0  # the masked-in entries trained
    saved = load_file(str(tmp_path / "r" / "lori_mask.safetensors"))
    assert all(torch.equal(saved[n], st[f"{n}.lori_mask"]) for n in names)
    assert int(st["lori_a_seed"]) == 0 and int(st["lori_masked"]) == 1


def _lr_at(step: int, n: int, warmup_ratio: float = 0.03) -> float:
    """transformers' cosine with linear warm-up over ``n`` steps, by hand."""
    w = math.ceil(warmup_ratio * n)
    if step < w:
        return step / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / (n - w)))


def test_the_masked_part_restarts_the_schedule_at_ten_times_the_rate():
    """The released LoRI-S is a run of its own at 10x LoRI-D's rate (5e-4 against 5e-5), so
    its masked part restarts warm-up + schedule; before issue 26 it ran in the stage's cosine
    tail at the dense rate (a mean factor of 0.31 over the 4 masked steps of an 8-step stage,
    against 10 x 0.5 now)."""
    from badit_exp.compose import load
    from badit_exp.methods import registry
    from badit_exp.training.engine import make_scheduler

    def phases(*extra, steps=8):
        return registry.build(load(["model=tiny-llama", "method=lori", *extra]).method).lr_phases(steps)

    assert phases() == [(0, 1.0), (4, 10.0)]
    assert phases("method.calibration_steps=3") == [(0, 1.0), (3, 10.0)]
    assert phases("method.calibration_steps=8") is None  # the mask would come after the end
    assert phases("method.mask_path=m.safetensors") is None  # LoRI-S alone: one schedule
    assert phases("method.restart_schedule=false", "method.masked_lr_scale=1") is None
    with pytest.raises(ConfigError, match="masked_lr_scale=10.0 needs method.restart_schedule=true"):
        phases("method.restart_schedule=false")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sch = make_scheduler(opt, "cosine", 0.03, 8, phases())
    lrs = []
    for _ in range(8):
        lrs.append(sch.get_last_lr()[0])
        opt.step()
        sch.step()
    assert lrs == pytest.approx([0, 1e-3, 0.75e-3, 0.25e-3, 0, 1e-2, 0.75e-2, 0.25e-2])
    old = [_lr_at(k, 8) for k in range(4, 8)]  # the former masked part: the cosine's tail
    assert sum(old) / 4 == pytest.approx(0.3094, abs=1e-4)
    with pytest.raises(ValueError, match="rise from 0"):
        make_scheduler(opt, "cosine", 0.03, 8, [(0, 1.0), (8, 10.0)])


def test_a_is_seeded_and_a_wrong_seed_is_refused():
    from badit_exp.compose import load
    from badit_exp.methods import registry
    from badit_exp.models import load_model_and_tokenizer, resolve_device

    def build(seed):
        cfg = load(["model=tiny-llama", "method=lori", f"method.a_seed={seed}", "scale=tiny"])
        torch.manual_seed(123 + seed)  # the global RNG must not matter
        base, _ = load_model_and_tokenizer(cfg.model, CACHE, resolve_device("cpu"))
        m = registry.build(cfg.method)
        return m, m.apply(base)

    (m1, mod1), (m2, _), (m3, _) = build(0), build(0), build(5)
    A = {n: l.lori_A for n, l in m1.layers.items()}
    assert all(torch.equal(A[n], l.lori_A) for n, l in m2.layers.items())
    assert not torch.equal(A[next(iter(A))], next(iter(m3.layers.values())).lori_A)
    assert not any(p.requires_grad for n, p in mod1.named_parameters() if "lori_A" in n)
    with pytest.raises(ConfigError, match="a_seed=0"):
        m3.load_state_dict(None, m1.state_dict(mod1))


def test_sequential_tasks_get_disjoint_masks_and_keep_earlier_entries(tmp_path, stage_states,
                                                                       superni):
    states = stage_states
    run_tiny(tmp_path / "seq", tiny_overrides(tmp_path, extra=[
        "method=lori", "training_mode=sequential", "method.sparsity=0.7", "trainer.epochs=2"]))
    names = _layers(states[0])
    for i in (1, 2):
        prev, now = states[i - 1], states[i]
        for n in names:
            mp, mn = prev[f"{n}.lori_mask"], now[f"{n}.lori_mask"]
            assert torch.equal(mn * now[f"{n}.lori_used"], torch.zeros_like(mn))  # disjoint
            assert torch.equal(now[f"{n}.lori_used"] * mp, mp)  # earlier masks are now used
            # the earlier tasks' entries: frozen as their stage left them
            frozen = prev[f"{n}.lori_B_prev"] + prev[f"{n}.lora_B"] * mp
            assert torch.equal(now[f"{n}.lori_B_prev"], frozen)
    stages, tasks, A = M.read_matrix_csv(tmp_path / "seq" / "scores.csv")
    assert len(stages) == 3 and all(len(r) == 3 for r in A)


def test_a_sparsity_that_cannot_give_disjoint_masks_names_the_minimum(tmp_path, superni):
    with pytest.raises(ConfigError, match=r"sparsity >= 0\.6667"):
        run_tiny(tmp_path / "x", tiny_overrides(tmp_path, extra=[
            "method=lori", "training_mode=sequential", "method.sparsity=0.5"]))


def test_the_two_run_form_masks_from_the_first_step(tmp_path, stage_states, superni):
    run_tiny(tmp_path / "d", tiny_overrides(tmp_path, extra=["method=lori"]))
    mask = tmp_path / "d" / "lori_mask.safetensors"
    states = stage_states
    run_tiny(tmp_path / "s", tiny_overrides(tmp_path, extra=[
        "method=lori", f"method.mask_path={mask}", "seed=2"]))
    saved = load_file(str(mask))
    for n in _layers(states[0]):
        assert torch.equal(states[0][f"{n}.lori_mask"], saved[n])
        B = states[0][f"{n}.lora_B"]
        assert torch.equal(B * (1 - saved[n]), torch.zeros_like(B))


@pytest.mark.slow  # the CLI path is in the fast suite once (test_e2e_mixed); the method table covers LoRI
def test_the_issue_cli_run(tmp_path):
    m = run_cli(tmp_path / "r", "lori")
    assert m["method_variant"]["sparsity"] == 0.9
