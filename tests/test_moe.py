"""The mixture kit: every expert layout x router, fused against a naive per-expert loop (forward
and gradients); routers, injection, the Switch loss; routing during KV-cached generation;
LoRAMoE's balancing loss."""

import pytest
import torch
import torch.nn as nn

from badit_exp.compose import validate
from badit_exp.methods import registry
from badit_exp.methods.moe import balance_loss
from badit_exp.methods.moe.layer import (
    LAYOUTS,
    MoLoRALinear,
    RouterSpec,
    layer_index,
    replace_modules,
)
from badit_exp.methods.moe.routers import ROUTERS, make_router, switch_balance_loss
from badit_exp.methods.moe.routing import RoutingContext
from badit_exp.models import load_model_and_tokenizer, resolve_device
from conftest import CACHE, compose_cfg

K, R, D_IN, D_OUT = 4, 2, 12, 10
# (router, top_k): top-k and dense variants of every router of the kit
ROUTER_CASES = [("sequence", 2), ("sequence", K), ("token", 2), ("token", K), ("dense", K),
                ("scalar", K)]


def _layer(router, top_k, layout="separate", seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT, bias=False)
    ctx = RoutingContext()
    layer = MoLoRALinear(base, K, R, alpha=8.0, dropout=0.0, router=RouterSpec(router, top_k),
                         ctx=ctx, layout=layout)
    with torch.no_grad():
        layer.lora_B.normal_()
        if router == "scalar":
            layer.router_weight.uniform_(0.5, 1.5)
    return layer, ctx


def _naive(layer, x, mask):
    """Per-expert loop over (A_k, B_k), routing recomputed from scratch."""
    s = layer.scaling
    y = layer.base(x)
    name = layer.router_type
    if name == "scalar":
        g = layer.router_weight[None, None, :].expand(x.shape[0], 1, K)
    else:
        if name == "sequence":
            m = mask.float().unsqueeze(-1)
            src = ((x * m).sum(1) / m.sum(1)).unsqueeze(1)
        else:
            src = x
        p = torch.softmax(src @ layer.router_weight.t(), -1)
        g = torch.zeros_like(p)
        top = p.topk(layer.top_k, -1)
        g.scatter_(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    for k in range(K):
        A = layer.lora_A if layer.layout == "shared_a" else layer.lora_A[k * R:(k + 1) * R]
        B = layer.lora_B[:, k * R:(k + 1) * R]
        y = y + s * g[..., k:k + 1] * (x @ A.t() @ B.t())
    return y


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("router,top_k", ROUTER_CASES)
def test_every_layout_and_router_equals_the_naive_loop(layout, router, top_k):
    layer, ctx = _layer(router, top_k, layout)
    x = torch.randn(3, 5, D_IN)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    ctx.prompt_mask = mask
    params = [layer.lora_A, layer.lora_B, layer.router_weight]
    y = layer(x)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad((y * gy).sum(), params)
    y2 = _naive(layer, x, mask)
    grads2 = torch.autograd.grad((y2 * gy).sum(), params)
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if top_k < K and router in ("sequence", "token"):
        assert (layer.gates(x) == 0).sum() > 0  # unselected experts get exact zeros
    expected_A = R if layout == "shared_a" else K * R
    assert layer.lora_A.shape == (expected_A, D_IN) and layer.lora_B.shape == (D_OUT, K * R)


def test_the_router_table_and_its_errors():
    assert set(ROUTERS) == {"sequence", "token", "dense", "scalar"}
    assert make_router("dense", 8, 4, top_k=2).top_k == 4  # dense ignores top_k
    assert make_router("token", 8, 4, top_k=2, init="zeros").weight.abs().sum() == 0
    assert abs(float(make_router("token", 64, 4, init="normal").weight.detach().std()) - 0.02) < 0.01
    with pytest.raises(ValueError, match="router='nope'"):
        make_router("nope", 8, 4)
    with pytest.raises(ValueError, match="top_k"):
        make_router("token", 8, 4, top_k=5)
    with pytest.raises(ValueError, match="scaled"):
        make_router("token", 8, 4, top_k=2, scaled=True)


def test_per_layer_experts_and_layer_index():
    torch.manual_seed(0)
    layers = [MoLoRALinear(nn.Linear(D_IN, D_OUT), k, R, 8.0, 0.0, RouterSpec("token", 2),
                           RoutingContext()) for k in (2, 6)]
    assert [l.lora_B.shape[1] for l in layers] == [2 * R, 6 * R]
    assert [l.router_weight.shape[0] for l in layers] == [2, 6]
    assert layer_index("model.layers.11.mlp.gate_proj") == 11 and layer_index("lm_head") is None


def test_replace_modules_takes_a_linear_or_a_block():
    net = nn.Sequential()
    net.add_module("mlp", nn.Sequential(nn.Linear(4, 4)))
    got = replace_modules(net, ["mlp"], lambda n, m: nn.Identity())
    assert list(got) == ["mlp"] and isinstance(net.mlp, nn.Identity)
    with pytest.raises(ValueError, match="matches no"):
        replace_modules(net, ["attn"], lambda n, m: m)


def test_switch_loss_is_one_when_balanced_and_e_when_collapsed():
    E = 4
    balanced = torch.full((8, E), 1.0 / E)
    balanced[torch.arange(8), torch.arange(8) % E] += 1e-3  # a definite top-1, evenly spread
    assert float(switch_balance_loss(balanced, 1)) == pytest.approx(1.0, abs=1e-2)
    collapsed = torch.zeros(8, E)
    collapsed[:, 0] = 1.0
    assert float(switch_balance_loss(collapsed, 1)) == pytest.approx(E)
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    mixed = torch.cat([collapsed[:4], balanced[4:]])
    assert float(switch_balance_loss(mixed, 1, mask)) == pytest.approx(E)  # padding not counted


def _moe_model(method, extra=()):
    cfg = validate(compose_cfg(["model=tiny-llama", f"method={method}", "method.dropout=0.0", *extra]))
    torch.manual_seed(0)
    base, tok = load_model_and_tokenizer(cfg.model, CACHE, resolve_device("cpu"))
    m = registry.build(cfg.method)
    model = m.apply(base)
    for l in m.layers.values():
        with torch.no_grad():
            l.lora_B.normal_(std=0.5)  # make the experts matter
    model.eval()
    return model, m, tok


def test_sequence_routing_is_computed_once_from_the_prompt_during_generation():
    model, m, tok = _moe_model("loramoe")
    ids = torch.randint(5, len(tok), (2, 7))
    am = torch.ones_like(ids)
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=5, do_sample=False,
                             use_cache=True, pad_token_id=tok.pad_token_id, eos_token_id=None)
        # no cache: recompute from the full sequence, routing from the prompt only (labels
        # mark generated tokens as targets, so the prompt mask excludes them)
        seq = ids
        for _ in range(5):
            labels = torch.full_like(seq, -100)
            labels[:, ids.shape[1]:] = seq[:, ids.shape[1]:]
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), labels=labels).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen, seq)


def test_generation_differs_if_routing_followed_the_growing_sequence():
    """Guard: the reuse matters (otherwise the previous test proves nothing)."""
    model, m, tok = _moe_model("loramoe")
    ids = torch.randint(5, len(tok), (1, 6))
    with torch.no_grad():
        model(input_ids=ids)
        g_prompt = next(iter(m.layers.values())).router._cached.clone()
        model(input_ids=torch.cat([ids, ids[:, :3]], 1))
        g_longer = next(iter(m.layers.values())).router._cached
    assert not torch.allclose(g_prompt, g_longer)


def test_balance_loss_hand_computed():
    # K = 2: expert 0 = knowledge group, expert 1 = downstream
    gates = torch.tensor([[[0.5, 0.5], [1.0, 0.0]], [[0.25, 0.75], [0.0, 1.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])
    stype = torch.tensor([1, 0])
    # Q = [[1.5, 0.5], [0.25, 0.75]]; I = [[1.1, 0.9], [0.9, 1.1]]
    Z = torch.tensor([1.65, 0.45, 0.225, 0.825])
    expected = Z.var(unbiased=True) / Z.mean() ** 2
    torch.testing.assert_close(balance_loss(gates, mask, stype, 0.1), expected)


def test_loramoe_original_targets_and_balance_loss_enters_training():
    model, m, tok = _moe_model("loramoe_original")
    names = list(m.layers)
    assert sum(n.endswith("gate_proj") for n in names) == 2 and len(names) == 6
    assert all(l.router_type == "token" and l.top_k == 8 for l in m.layers.values())
    model.train()
    ids = torch.randint(5, len(tok), (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    model(**batch)
    extra = m.extra_loss(model, batch)
    assert extra is not None and extra.requires_grad and float(extra) >= 0
