"""O-LoRA and GainLoRA: loss terms, subspaces, gates, end-to-end sequential runs."""

import json

import pytest
import torch
import torch.nn as nn

from badit_exp.compose import validate
from badit_exp.methods import registry
from badit_exp.methods.gainlora import grow_basis, projected_step, threshold
from badit_exp.methods.o_lora import OLoraLinear
from badit_exp.models import load_model_and_tokenizer, resolve_device
from badit_exp.training import runner as runner_mod
from conftest import CACHE, TASKS3, compose_cfg, run_tiny, tiny_overrides

SEQ = ["training_mode=sequential", "trainer.epochs=2"]


# ----------------------------------------------------------------------------- O-LoRA
def test_o_lora_loss_terms_hand_computed():
    torch.manual_seed(0)
    layer = OLoraLinear(nn.Linear(3, 2, bias=False), rank=1, alpha=1.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 2.0, 0.0]]))
        layer.lora_B.copy_(torch.tensor([[3.0], [4.0]]))
    assert float(layer.overlap(squared=False)) == 0.0  # nothing previous yet
    layer.append_and_reset()
    assert torch.equal(layer.olora_prev_A, torch.tensor([[1.0, 2.0, 0.0]]))
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[2.0, -3.0, 1.0]]))
    # A_prev A_t^T = 1*2 + 2*(-3) + 0*1 = -4
    assert float(layer.overlap(squared=False)) == pytest.approx(4.0)
    assert float(layer.overlap(squared=True)) == pytest.approx(16.0)
    assert torch.equal(layer.lora_B, torch.zeros(2, 1))  # reset after appending


def test_o_lora_previous_pair_holds_task1_unchanged(tmp_path, stage_states):
    captured = stage_states
    m = run_tiny(tmp_path / "r", tiny_overrides(tmp_path, tasks=TASKS3[:2], extra=SEQ + ["method=o_lora"]))
    s0, s1 = captured[0], captured[1]
    for k in s0:
        if k.endswith("olora_prev_A"):
            r = s0[k].shape[0]
            assert r == 4 and s1[k].shape[0] == 8
            assert torch.equal(s1[k][:r], s0[k])  # task 1's A, untouched by task 2
            kb = k.replace("prev_A", "prev_B")
            assert torch.equal(s1[kb][:, :r], s0[kb])
    assert m["forget_rate"] is not None
    ov = json.loads((tmp_path / "r" / "o_lora_overlap.json").read_text())
    assert len(ov["overlap_at_stage_end"]) == 2


# ----------------------------------------------------------------------------- GainLoRA pure
def test_threshold_schedule():
    assert threshold(0.995, 1, 15) == pytest.approx(0.995)
    assert threshold(0.995, 16, 15) == pytest.approx(1.0)
    assert threshold(0.9, 3, 4) == pytest.approx(0.9 + 0.1 * 2 / 4)


def test_grow_basis_on_hand_made_covariance():
    C = torch.diag(torch.tensor([10.0, 1.0, 0.1, 0.0]))
    # energies (squared singular values): 100, 1, 0.01 -> 100/101.01 = 0.990
    U = grow_basis(C, torch.zeros(4, 0), 0.95)
    assert U.shape == (4, 1) and abs(float(U[0, 0])) == pytest.approx(1.0)
    U2 = grow_basis(C, torch.zeros(4, 0), 0.995)
    assert U2.shape[1] == 2
    # growing an existing basis: the captured part counts, new directions are orthogonal
    assert grow_basis(C, U, 0.9999).shape[1] == 2  # (100 + 1) / 101.01 >= 0.9999
    U3 = grow_basis(C, U, 0.99995)
    assert U3.shape[1] == 3
    torch.testing.assert_close(U3.t() @ U3, torch.eye(3), atol=1e-5, rtol=0)


def test_projected_step_is_orthogonal_then_renormalised():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(6, 2))
    old, raw = torch.randn(3, 6), torch.randn(3, 6)
    new = projected_step(old, raw, U, right=True)
    torch.testing.assert_close(new.norm(dim=1), raw.norm(dim=1))
    unscaled = old + (raw - old) - ((raw - old) @ U) @ U.t()
    c = new.norm(dim=1, keepdim=True) / unscaled.norm(dim=1, keepdim=True)
    torch.testing.assert_close(((new / c) - old) @ U, torch.zeros(3, 2), atol=1e-5, rtol=0)
    k_old, k_raw = torch.randn(6), torch.randn(6)
    k_new = projected_step(k_old, k_raw, U, right=False)
    assert float(k_new.norm()) == pytest.approx(float(k_raw.norm()), rel=1e-5)


# ----------------------------------------------------------------------------- GainLoRA e2e
def _gainlora_run(tmp_path, monkeypatch):
    """Sequential 2-task run; returns the method object (spied) and metrics."""
    seen = {}
    orig = runner_mod.Runner.build_model

    def spy(self, **kw):
        model, method = orig(self, **kw)
        seen["model"], seen["method"] = model, method
        return model, method

    monkeypatch.setattr(runner_mod.Runner, "build_model", spy)
    over = tiny_overrides(tmp_path, tasks=["task363_sst2_polarity_classification",
                                           "task073_commonsenseqa_answer_generation"],
                          extra=["training_mode=sequential", "trainer.epochs=4", "method=gainlora",
                                 "data.max_train_per_task=8", "trainer.lr=1e-2"])
    m = run_tiny(tmp_path / "r", over)
    return seen["model"], seen["method"], m


def test_gainlora_end_to_end(tmp_path, monkeypatch):
    model, method, m = _gainlora_run(tmp_path, monkeypatch)
    d = tmp_path / "r"
    assert (d / "scores.csv").exists() and m["forget_rate"] is not None
    table = json.loads((d / "gate_table.json").read_text())["stages"]
    last = table[m["stages"][-1]]
    t1, t2 = m["tasks"]
    # the task-2 gate is much smaller on task-1 inputs than on task-2 inputs
    assert last[t1][1] < 0.5 * last[t2][1]
    assert (d / "gate_table.png").exists()
    assert method.tasks_done == 2 and all(M.shape[1] > 0 for M in method.M.values())
    assert all(layer.gain_A.shape[0] == 8 for layer in method.layers.values())


def test_gainlora_inflora_rows_orthogonal_to_old_basis():
    cfg = validate(compose_cfg(["model=tiny-llama", "method=gainlora", "method.dropout=0.0"]))
    torch.manual_seed(0)
    base, tok = load_model_and_tokenizer(cfg.model, CACHE, resolve_device("cpu"))
    m = registry.build(cfg.method)
    m.task_names = ["a", "b"]
    model = m.apply(base)
    g = torch.Generator().manual_seed(0)

    def fake_task(shift):
        return [[{"input_ids": (torch.randint(5, 200, (12,), generator=g) + shift).tolist(),
                  "prompt_len": 8} for _ in range(6)]]

    t1, t2 = fake_task(0), fake_task(300)
    m.on_stage_start(model, 0, "a", t1)
    m.on_stage_end(model, 0, "a", t1)
    M1 = {n: M.clone() for n, M in m.M.items()}
    m.on_stage_start(model, 1, "b", t2)
    for n, layer in m.layers.items():
        A2 = layer.gain_A[4:8]
        proj = A2 @ M1[n]
        assert float(proj.abs().max()) < 1e-4 * float(A2.abs().max()) + 1e-6


def test_gainlora_projection_after_a_step():
    """The update of W1 after a step has no component in the stored embedding basis U1
    (up to the row rescaling)."""
    cfg = validate(compose_cfg(["model=tiny-llama", "method=gainlora"]))
    base, tok = load_model_and_tokenizer(cfg.model, CACHE, resolve_device("cpu"))
    m = registry.build(cfg.method)
    model = m.apply(base)
    d = m.gates.d
    U1, _ = torch.linalg.qr(torch.randn(d, 3))
    m.bases["U1"] = U1
    m.tasks_done = 1
    old = m.gates.W1.detach().clone()
    m.after_backward(model, None, 0, 0, 1)
    with torch.no_grad():
        m.gates.W1.add_(torch.randn_like(m.gates.W1))
    raw_norm = m.gates.W1.norm(dim=1).clone()
    m.after_optimizer_step(model, None)
    new = m.gates.W1.detach()
    torch.testing.assert_close(new.norm(dim=1), raw_norm)
    # rows = c * (old + delta_perp): their U1 components are c * old's
    c = (new @ U1) / (old @ U1)
    assert float((c - c[:, :1]).abs().max()) < 1e-3


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("method,cls", [
    pytest.param("o_lora", "badit_exp.methods.o_lora.OLora", marks=pytest.mark.slow),
    ("gainlora", "badit_exp.methods.gainlora.GainLora")])
def test_continual_resume_mid_task_equals_uninterrupted(tmp_path, monkeypatch, method, cls):
    import importlib

    mod, name = cls.rsplit(".", 1)
    klass = getattr(importlib.import_module(mod), name)
    over = tiny_overrides(tmp_path, tasks=TASKS3[:2], extra=[
        "training_mode=sequential", "trainer.epochs=2", "trainer.checkpoint_every_steps=1",
        f"method={method}", "method.dropout=0.1"])
    run_tiny(tmp_path / "ref", over)
    calls = {"n": 0}
    orig = klass.after_optimizer_step

    def crash(self, model, opt):
        orig(self, model, opt)
        calls["n"] += 1
        if calls["n"] == 6:  # stage 0: 4 steps; stage 1: step 1 checkpointed, crash in step 2
            raise Crash()

    monkeypatch.setattr(klass, "after_optimizer_step", crash)
    with pytest.raises(Crash):
        run_tiny(tmp_path / "crash", over)
    monkeypatch.setattr(klass, "after_optimizer_step", orig)
    run_tiny(tmp_path / "crash", over)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "ref" / "adapter" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "crash" / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # o_lora: bit-identical; gainlora: gate keys may differ by float rounding (~1e-8)
        if method == "o_lora":
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)
    assert (tmp_path / "crash" / "scores.csv").read_text() == (tmp_path / "ref" / "scores.csv").read_text()


@pytest.mark.parametrize("method", ["o_lora", "gainlora"])
def test_mixed_mode_is_the_one_task_form(tmp_path, method):
    m = run_tiny(tmp_path / "r", tiny_overrides(tmp_path, tasks=TASKS3[:2],
                                                extra=[f"method={method}", "trainer.epochs=2"]))
    assert m["mode"] == "mixed" and set(m["scores"]) == set(TASKS3[:2])
    t = m["timing"]["mixed"]
    assert t["last_loss"] < t["first_loss"]
