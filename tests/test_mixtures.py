"""HydraLoRA, MoLA and MixLoRA on the kit: structure, exact start, MixLoRA's sparse dispatch
and balancing loss, and the CLI runs the issue names."""

import json

import pytest
import torch
import torch.nn as nn

from badit_exp.compose import load
from badit_exp.methods import registry
from badit_exp.methods.moe.mixlora import MixLoRA, MixLoRAMLP
from badit_exp.methods.moe.routing import RoutingContext
from badit_exp.models import load_model_and_tokenizer, resolve_device
from conftest import CACHE, TASKS3, run_cli, slow_unless

CPU = resolve_device("cpu")


def _build(method, *extra, model="tiny-llama"):
    cfg = load([f"model={model}", f"method={method}", "scale=tiny", *extra])
    torch.manual_seed(0)
    base, tok = load_model_and_tokenizer(cfg.model, CACHE, CPU)
    m = registry.build(cfg.method)
    return cfg, m.apply(base), m


class _MLP(nn.Module):
    def __init__(self, d=6, f=10):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj, self.act_fn = nn.Linear(f, d, bias=False), nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _mix(seed=0):
    torch.manual_seed(seed)
    mlp = _MLP()
    for p in mlp.parameters():
        p.requires_grad_(False)
    layer = MixLoRAMLP(mlp, num_experts=4, top_k=2, rank=2, alpha=4.0, dropout=0.0,
                       ctx=RoutingContext())
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if "lora_B" in n:
                p.normal_()
            if n == "router.weight":
                p.normal_()
    return mlp, layer


def test_mixlora_sparse_dispatch_equals_the_dense_computation():
    _, layer = _mix()
    x = torch.randn(3, 7, 6)
    y = layer(x)
    gy = torch.randn_like(y)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * gy).sum(), params, allow_unused=True)
    y2 = layer.forward_dense(x)
    grads2 = torch.autograd.grad((y2 * gy).sum(), params, allow_unused=True)
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_mixlora_expert_is_the_ffn_plus_its_loras():
    mlp, layer = _mix()
    x = torch.randn(5, 6)
    s = layer.scaling
    e = 1
    dW = {w: s * getattr(layer, f"{w}_lora_B")[e] @ getattr(layer, f"{w}_lora_A")[e]
          for w in ("gate", "up", "down")}
    g = x @ (mlp.gate_proj.weight + dW["gate"]).t()
    u = x @ (mlp.up_proj.weight + dW["up"]).t()
    want = (torch.nn.functional.silu(g) * u) @ (mlp.down_proj.weight + dW["down"]).t()
    got = layer.expert(e, x, mlp.gate_proj(x), mlp.up_proj(x))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mixlora_is_the_base_model_at_step_0_and_balances_per_layer():
    cfg, model, m = _build("mixlora")
    assert isinstance(m, MixLoRA) and len(m.layers) == 2 and len(m.attention) == 4
    torch.manual_seed(0)
    base, _ = load_model_and_tokenizer(cfg.model, CACHE, CPU)
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
    model.train()
    am = torch.ones(2, 9, dtype=torch.long)
    model(input_ids=ids, attention_mask=am)
    per_layer = m.extra_loss(model, {"attention_mask": am, "input_ids": ids})
    m.cfg.balance_scope = "global"
    glob = m.extra_loss(model, {"attention_mask": am, "input_ids": ids})
    assert per_layer > 0 and glob > 0 and float(per_layer) != pytest.approx(float(glob), abs=0)
    per_layer.backward()
    assert all(l.router.weight.grad is not None for l in m.layers.values())


def test_mixlora_layers_disagreeing_cancel_in_the_global_loss_only():
    """Two layers collapsed on different experts: each is maximally imbalanced (E = 8 per
    layer), but concatenated they look balanced across two experts (the released defect)."""
    from badit_exp.methods.moe.routers import switch_balance_loss

    E, n = 8, 16
    a, b = torch.zeros(n, E), torch.zeros(n, E)
    a[:, 0] = b[:, 1] = 1.0
    per_layer = (switch_balance_loss(a, 1) + switch_balance_loss(b, 1)) / 2
    glob = switch_balance_loss(torch.cat([a, b]), 1)
    assert float(per_layer) == pytest.approx(E) and float(glob) == pytest.approx(E / 2)


def test_hydralora_shares_a_and_starts_at_zero():
    _, model, m = _build("hydralora")
    assert len(m.layers) == 6  # gate, up, down x 2 layers
    for l in m.layers.values():
        assert l.layout == "shared_a" and l.router_type == "dense" and l.num_experts == 4
        assert l.lora_A.shape[0] == 4 and l.lora_B.shape[1] == 16 and l.lora_B.abs().sum() == 0
    _, _, m8 = _build("hydralora_k8")
    assert [n.split(".")[-1] for n in m8.layers] == ["gate_proj"] * 2
    assert all(l.num_experts == 8 for l in m8.layers.values())


def test_mola_experts_grow_with_depth():
    _, model, m = _build("mola", "model.tiny.num_hidden_layers=4")
    ks = {n: l.num_experts for n, l in m.layers.items()}
    assert {ks[f"model.layers.{i}.mlp.gate_proj"] for i in range(4)} == {2, 4, 6, 8}
    assert [ks[f"model.layers.{i}.self_attn.q_proj"] for i in range(4)] == [2, 4, 6, 8]
    _, _, m2 = _build("mola", "method.experts_by_depth=[]", "method.experts_per_layer=[3,5]")
    assert sorted({l.num_experts for l in m2.layers.values()}) == [3, 5]
    with pytest.raises(Exception, match="experts_per_layer has 3 values"):
        _build("mola", "method.experts_by_depth=[]", "method.experts_per_layer=[3,5,7]")


@pytest.mark.parametrize("method", [slow_unless(False, "hydralora"), slow_unless(False, "hydralora_k8"),
                                    slow_unless(False, "mola"), slow_unless(False, "mixlora")])
def test_the_issue_cli_run_writes_metrics(tmp_path, method):
    d = tmp_path / "r"
    m = run_cli(d, method, tasks=TASKS3[:2])
    assert m["method"] == method and m["rouge"] is not None
    text = (d / "router_stats.json").read_text()
    assert text.count("\n") == 1  # one compact line: it is committed with every study run
    stats = json.loads(text)
    for layer, w in stats["stages"]["mixed"][TASKS3[0]].items():
        assert len(w) == stats["num_experts_per_layer"][layer] and abs(sum(w) - 1) < 1e-4
        assert all(x == round(x, 6) for x in w)  # shares to 6 decimals
    assert (d / "router_usage_mixed.png").exists()


@pytest.mark.parametrize("method", [slow_unless(False, "hydralora"),
                                    slow_unless(False, "hydralora_k8"), "mola", "mixlora"])
def test_sequential_on_three_tasks_writes_the_3x3_matrix(tmp_path, method, superni):
    from badit_exp import metrics as M
    from conftest import run_tiny, tiny_overrides

    m = run_tiny(tmp_path / "seq", tiny_overrides(tmp_path, extra=[
        f"method={method}", "training_mode=sequential", "trainer.epochs=1"]))
    stages, tasks, A = M.read_matrix_csv(tmp_path / "seq" / "scores.csv")
    assert len(stages) == len(tasks) == 3 and all(len(r) == 3 for r in A)
    assert m["forget_rate"] is not None and m["method"] == method
    stats = json.loads((tmp_path / "seq" / "router_stats.json").read_text())
    assert set(stats["stages"]) == set(stages)  # router statistics after every stage


def test_single_mode_runs_a_mixture(tmp_path, superni):
    from conftest import TASKS3 as T
    from conftest import run_tiny, tiny_overrides

    m = run_tiny(tmp_path / "single", tiny_overrides(tmp_path, tasks=T[:2], extra=[
        "method=mixlora", "training_mode=single", "trainer.epochs=1"]))
    assert set(m["single_scores"]) == set(T[:2])
