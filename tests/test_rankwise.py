"""Each rank an expert (issue 20): the rank-gated layout against a naive per-rank loop, the rank
routers, the bias balancer (update rule, padding, training only, once per forward and step),
FlyLoRA's frozen sparse seeded A, the input gradient, merge refusal, and the CLI runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from badit_exp.config import ConfigError
from badit_exp.methods.moe.rankwise import RankGatedLinear, balance_step, sparse_random_A
from badit_exp.methods.moe.routers import RANK_ROUTERS
from badit_exp.methods.moe.routing import RoutingContext
from conftest import TASKS3, run_cli, slow_unless

D_IN, D_OUT, R, K = 12, 10, 8, 3


def _layer(router: str, *, input_grad=True, bias_in_gates=True, partition=1, seed=0,
           abs_scores=False):
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT)
    base.requires_grad_(False)
    rt = RANK_ROUTERS[router](R, K, 16.0, abs_scores=abs_scores, partition=partition,
                              bias_in_gates=bias_in_gates)
    frozen = router == "implicit"
    layer = RankGatedLinear(base, R, 0.0, rt, RoutingContext(),
                            a_init="sparse_random" if frozen else "kaiming", a_frozen=frozen,
                            a_generator=torch.Generator().manual_seed(seed), input_grad=input_grad)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.rank_bias.normal_(0, 0.1)
    return layer


def _naive(layer: RankGatedLinear, x: torch.Tensor) -> torch.Tensor:
    """The per-rank loop: s * sum over the token's selected ranks of g_i b_i (a_i . x)."""
    y = layer.base(x)
    A, B, b = layer.lora_A, layer.lora_B, layer.rank_bias
    out = torch.zeros_like(y)
    for n in range(x.shape[0]):
        for t in range(x.shape[1]):
            h = torch.stack([A[i] @ x[n, t] for i in range(R)])
            if layer.router_weight is None:  # implicit: binary top-k of h + b
                s = h.detach() + b
                s = s.abs() if layer.router.abs_scores else s
                sel = s.topk(K).indices.tolist()
                g = {i: 1.0 for i in sel}
            else:
                z = torch.sigmoid(torch.stack([layer.router_weight[j] @ x[n, t]
                                               for j in range(layer.router.logit_dim)]))
                z = z.repeat_interleave(layer.router.partition)
                sb = z + b
                sel = sb.detach().topk(K).indices.tolist()
                vals = sb if layer.router.bias_in_gates else z
                tot = sum(vals[i] for i in sel)
                g = {i: K * vals[i] / tot for i in sel}
            for i in sel:
                out[n, t] = out[n, t] + g[i] * B[:, i] * h[i]
    return y + layer.scaling * out


@pytest.mark.parametrize("router,opts", [("implicit", {}), ("implicit", {"abs_scores": True}),
                                         ("rank", {}), ("rank", {"bias_in_gates": False}),
                                         ("rank", {"partition": 2})])
def test_fused_equals_naive_per_rank_loop_with_gradients(router, opts):
    layer = _layer(router, **opts)
    x = torch.randn(2, 5, D_IN, requires_grad=True)
    y = layer(x)
    params = [p for p in layer.parameters() if p.requires_grad]
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *params], gy)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = _naive(layer, x2)
    grads2 = torch.autograd.grad(y2, [x2, *params], gy)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # FlyLoRA trains B alone; SMoRA trains A, B and the router
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert names == ({"lora_B"} if router == "implicit" else {"lora_A", "lora_B", "router_weight"})


def test_scalings_and_gates():
    fly = _layer("implicit")
    assert fly.scaling == 16.0 / R
    g, idx = fly.router(torch.randn(4, R), None, torch.zeros(R))
    assert set(g.unique().tolist()) == {0.0, 1.0} and (g.sum(-1) == K).all()
    sm = _layer("rank")
    assert sm.scaling == 16.0 / K
    g, _ = sm.router(None, torch.randn(4, R), torch.zeros(R))
    torch.testing.assert_close(g.sum(-1), torch.full((4,), float(K)))  # renormalised x k
    assert ((g > 0).sum(-1) == K).all()


def test_flylora_A_frozen_seeded_sparse():
    A = sparse_random_A(32, 576, 8, torch.Generator().manual_seed(3))
    nnz = (A != 0).sum(1)
    assert (nnz == round(576 * 8 / 32)).all()  # d_in * k / r per row
    assert A[A != 0].std().item() == pytest.approx(1 / 32, rel=0.1)  # N(0, (1/r)^2)
    assert torch.equal(A, sparse_random_A(32, 576, 8, torch.Generator().manual_seed(3)))
    assert not torch.equal(A, sparse_random_A(32, 576, 8, torch.Generator().manual_seed(4)))
    layer = _layer("implicit")
    assert "lora_A" in dict(layer.named_buffers()) and not any(
        n == "lora_A" for n, _ in layer.named_parameters())


def test_flylora_A_does_not_depend_on_the_global_rng():
    from badit_exp.compose import load
    from badit_exp.methods import registry

    cfg = load(["model=tiny-llama", "method=flylora_k8", "scale=tiny"])
    layers = []
    for s in (1, 2):
        torch.manual_seed(s)
        m = registry.build(cfg.method)
        model = nn.Module()
        model.layers = nn.ModuleList([nn.Module() for _ in range(2)])
        for blk in model.layers:
            blk.gate_proj = nn.Linear(16, 32)
        m.apply(model)
        layers.append([l.lora_A.clone() for l in m.layers.values()])
    assert all(torch.equal(a, b) for a, b in zip(*layers))
    assert not torch.equal(layers[0][0], layers[0][1])  # each layer its own draw


def test_input_gradient_through_the_adapter():
    x = torch.randn(2, 4, D_IN, requires_grad=True)
    base_only = torch.autograd.grad(_layer("implicit").base(x).sum(), x)[0]
    with_grad = torch.autograd.grad(_layer("implicit", input_grad=True)(x).sum(), x)[0]
    without = torch.autograd.grad(_layer("implicit", input_grad=False)(x).sum(), x)[0]
    torch.testing.assert_close(without, base_only)  # the release: h under no_grad
    assert (with_grad - base_only).abs().max() > 1e-3  # the adapter passes gradient back
    lay = _layer("implicit", input_grad=False)
    lay(x).sum().backward()
    assert lay.lora_B.grad is not None and lay.lora_B.grad.abs().sum() > 0  # B still trains


# ---------------------------------------------------------------------------- the balancer
def test_update_rule_on_hand_built_counts():
    a, b = _layer("implicit"), _layer("rank")
    for l in (a, b):
        l.rank_bias.zero_()
    a.rank_counts.copy_(torch.tensor([3., 1., 2., 2., 0., 4., 2., 2.]))  # mean 2
    b.rank_counts.zero_()  # no tokens: no update
    balance_step({"a": a, "b": b}, 0.01)
    torch.testing.assert_close(a.rank_bias, 0.01 * torch.tensor([-1., 1., 0., 0., 1., -1., 0., 0.]))
    assert torch.equal(b.rank_bias, torch.zeros(R))
    assert a.rank_counts.sum() == 0  # counts restart after each step


def test_padding_is_not_counted_and_each_forward_counts_once():
    layer = _layer("rank")
    layer.train()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    layer.ctx.sequence_mask, layer.ctx.forward_id = mask, 1
    x = torch.randn(2, 5, D_IN)
    layer(x)
    assert layer.rank_counts.sum().item() == 8 * K  # 8 real tokens x k ranks
    layer(x)  # a gradient-checkpointing recomputation: same forward id
    assert layer.rank_counts.sum().item() == 8 * K
    layer.ctx.forward_id = 2
    layer(x)
    assert layer.rank_counts.sum().item() == 16 * K


def test_bias_stays_float32_when_the_module_is_cast():
    layer = _layer("rank")
    before = layer.rank_bias.clone()
    layer.to(torch.bfloat16)
    assert layer.rank_bias.dtype == torch.float32 and torch.equal(layer.rank_bias, before)
    assert layer.lora_B.dtype == torch.bfloat16


def _tiny(method: str):
    from badit_exp.compose import load
    from badit_exp.methods import registry
    from badit_exp.models import load_model_and_tokenizer, resolve_device
    from conftest import CACHE, SUPERNI

    cfg = load(["model=tiny-llama", f"method={method}", "scale=tiny", f"data.root={SUPERNI}",
                f"paths.cache_dir={CACHE}"])
    torch.manual_seed(1)
    base, tok = load_model_and_tokenizer(cfg.model, CACHE, resolve_device("cpu"))
    m = registry.build(cfg.method)
    return m, m.apply(base), tok


@pytest.mark.parametrize("method", ["flylora_k8", "smora_k8"])
def test_bias_bit_identical_through_evaluation_and_generation(method):
    m, model, tok = _tiny(method)
    for l in m.layers.values():
        l.rank_bias.normal_(0, 0.1)
    before = {n: l.rank_bias.clone() for n, l in m.layers.items()}
    ids = torch.randint(5, 100, (2, 12))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                       do_sample=False, pad_token_id=tok.pad_token_id)
    m.after_backward(model, None, 0, 0, 1)  # even a stray step after evaluation: no counts
    for n, l in m.layers.items():
        assert torch.equal(l.rank_bias, before[n]) and l.rank_counts.sum() == 0
    model.train()
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
    m.after_backward(model, None, 0, 0, 1)
    assert any(not torch.equal(l.rank_bias, before[n]) for n, l in m.layers.items())


@pytest.mark.parametrize("method", ["flylora_k8", "smora_k8"])
def test_gradient_checkpointing_recomputation_counts_once(method):
    """With the model's own gradient checkpointing, the backward pass recomputes every layer;
    the counts still hold each real token's k selections once."""
    m, model, _ = _tiny(method)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(5, 100, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    calls = []
    for l in m.layers.values():
        l.register_forward_hook(lambda *a: calls.append(1))
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    n_forward = len(calls)
    out.loss.backward()
    assert len(calls) == 2 * n_forward  # the backward did recompute every layer
    for l in m.layers.values():
        assert l.rank_counts.sum().item() == int(mask.sum()) * l.top_k


@pytest.mark.parametrize("method", ["flylora", "smora_k8"])
def test_not_mergeable_and_merge_is_refused(method):
    m, model, _ = _tiny(method)
    assert not m.mergeable()
    with pytest.raises(ConfigError, match="not mergeable"):
        m.merge(model)
    state = m.state_dict(model)
    assert any(k.endswith("rank_bias") for k in state)  # in checkpoints and the export


def test_config_errors():
    from badit_exp.compose import load

    with pytest.raises(ConfigError, match="top_k"):
        load(["method=flylora", "method.top_k=64"])
    with pytest.raises(ConfigError, match="a_frozen"):
        load(["method=flylora", "method.a_frozen=false"])
    with pytest.raises(ConfigError, match="rank_partition"):
        load(["method=smora", "method.rank_partition=3"])


@pytest.mark.parametrize("method", [slow_unless(False, "flylora"), slow_unless(False, "flylora_k8"),
                                    slow_unless(False, "smora"), slow_unless(False, "smora_k8")])
def test_issue_cli_run(method, tmp_path):
    m = run_cli(tmp_path / "run", method)
    assert m["method"] == method and set(m["scores"]) == set(TASKS3)
    assert m["target_loss"]["step0"] == pytest.approx(m["target_loss"]["pretrained"])


@pytest.mark.slow  # the sequential CLI is in test_e2e_sequential; these four runs, ~20 s each
@pytest.mark.parametrize("method", ["flylora_k8", "smora_k8", "flylora", "smora"])
def test_issue_cli_run_sequential(method, tmp_path):
    m = run_cli(tmp_path / "run", method, extra=["training_mode=sequential"])
    assert len(m["matrix"]["summary"]) == 3 and all(len(r) == 3 for r in m["matrix"]["summary"])
    assert (tmp_path / "run" / "scores.csv").exists()
