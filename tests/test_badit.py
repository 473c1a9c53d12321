"""BAD initialisation and DOG regrouping (SPEC section 5) on hand-made and tiny models."""

import itertools

import pytest
import torch
import torch.nn as nn

from badit_exp.compose import validate
from badit_exp.config import ConfigError
from badit_exp.methods import registry
from badit_exp.methods.badit import (
    bad_init,
    dog_assign,
    dog_objective,
    group_angles,
    permutation_from_assignment,
)
from badit_exp.methods.moe.layer import MoLoRALinear, RouterSpec
from badit_exp.methods.moe.routing import RoutingContext
from badit_exp.models import load_model_and_tokenizer, resolve_device
from conftest import CACHE, compose_cfg


def _layer(router="sequence", K=4, r=2, d_in=16, d_out=12, dtype=torch.float32):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False).to(dtype)
    W0 = base.weight.detach().clone()
    return MoLoRALinear(base, K, r, 32.0, 0.0, RouterSpec(router, K), RoutingContext()), W0


# ----------------------------------------------------------------------------- BAD
def test_bad_orthogonal_experts_and_exact_reconstruction():
    layer, W0 = _layer()
    bad_init(layer, "l")
    deltas = [layer.expert_delta(k) for k in range(layer.num_experts)]
    for i, j in itertools.combinations(range(len(deltas)), 2):
        assert abs(float((deltas[i] * deltas[j]).sum())) < 1e-4  # Frobenius inner product
    recon = layer.base.weight + sum(deltas)
    torch.testing.assert_close(recon, W0, atol=1e-5, rtol=1e-5)
    # expert 0 holds the largest singular values
    norms = [float(d.norm()) for d in deltas]
    assert norms == sorted(norms, reverse=True)
    S = torch.linalg.svdvals(W0)
    torch.testing.assert_close(torch.linalg.svdvals(deltas[0])[:2], S[:2], atol=1e-5, rtol=1e-5)


def test_bad_in_bf16_base_computes_in_float32():
    layer, W0 = _layer(dtype=torch.bfloat16)
    bad_init(layer, "l")
    assert layer.base.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    recon = layer.base.weight.float() + sum(layer.expert_delta(k) for k in range(4))
    torch.testing.assert_close(recon, W0.float(), atol=2e-2, rtol=2e-2)


def test_bad_rank_too_large_is_a_clear_error():
    layer, _ = _layer(K=8, r=4, d_in=16, d_out=12)
    with pytest.raises(ConfigError, match=r"layer big.*\(12, 16\).*rank=4.*num_experts=8"):
        bad_init(layer, "big")


def _tiny(method, extra=(), model="tiny-llama"):
    cfg = validate(compose_cfg([f"model={model}", f"method={method}", "method.dropout=0.0", *extra]))
    torch.manual_seed(0)
    base, tok = load_model_and_tokenizer(cfg.model, CACHE, resolve_device("cpu"))
    ids = torch.randint(5, len(tok), (2, 9))
    with torch.no_grad():
        ref = base(input_ids=ids).logits.clone()
    m = registry.build(cfg.method)
    model = m.apply(base)
    model.eval()
    return model, m, ids, ref


FUNCTION_PRESERVING = {  # every setting that must start exactly at the pre-trained model
    "default (scaled_gates, sequence router)": ("badit", []),
    "scaled_gates, token router": ("badit", ["method.router=token"]),
    "scaled_gates, router_pool=sequence": ("badit", ["method.router_pool=sequence"]),
    "anchor, top-4 sequence router": ("badit_anchor", []),
    "anchor, top-2 token router": ("badit_anchor", ["method.router=token", "method.top_k=2"]),
    "anchor, reference routing (K=6 dense, frozen, sequence pool)": (
        "badit_reference", ["method.function_preserving=anchor"]),
    "paper (scalar Eq. 7)": ("badit_paper", []),
    "w/o BAD": ("badit_wo_bad", []),
}


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-qwen3", "tiny-gemma2"])
@pytest.mark.parametrize("setting", list(FUNCTION_PRESERVING))
def test_function_preserving_settings_start_at_the_pretrained_model(model_name, setting):
    method, extra = FUNCTION_PRESERVING[setting]
    model, m, ids, ref = _tiny(method, extra, model=model_name)
    with torch.no_grad():  # a random input-dependent router: gates differ per sequence
        torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,extra", [("badit_reference", []),
                                          ("badit", ["method.function_preserving=none",
                                                     "method.top_k=4"])])
def test_bad_without_function_preservation_changes_the_output_at_step0(method, extra):
    model, m, ids, ref = _tiny(method, extra)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, ref, atol=1e-3)


def test_reference_config_is_the_released_code():
    model, m, _, _ = _tiny("badit_reference", model="tiny-llama")
    c = m.cfg
    assert (c.num_experts, c.top_k, c.router, c.router_pool) == (6, 6, "sequence", "sequence")
    for l in m.layers.values():
        assert not l.router_weight.requires_grad  # frozen at its random init
        assert isinstance(l.dropout, nn.Identity)  # dropout 0.05 configured, never applied
        assert float(l.router_weight.abs().sum()) > 0
    state = m.state_dict(model)
    assert any(k.endswith("router.weight") for k in state)  # the frozen router is checkpointed


@pytest.mark.parametrize("bad,msg", [
    (["method.function_preserving=scaled_gates", "method.top_k=4"], "needs dense routing"),
    (["method.router=scalar", "method.function_preserving=anchor"], "already exact"),
    (["method.router_pool=tokens"], "router_pool"),
    (["method.function_preserving=exact"], "function_preserving"),
    (["method.dog.solver=hungarian"], "dog.solver"),
])
def test_bad_badit_options_are_clear_errors(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        validate(compose_cfg(["model=tiny-llama", "method=badit", *bad]))


def test_router_pool_sequence_averages_every_non_padding_token():
    layer, _ = _layer(router="sequence")
    layer.router.pool = "sequence"
    x = torch.randn(2, 5, 16)
    am = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    layer.ctx.prompt_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    layer.ctx.sequence_mask = am
    pooled = (x * am[..., None]).sum(1) / am.sum(1, keepdim=True)
    want = torch.softmax(pooled @ layer.router_weight.t(), -1)
    torch.testing.assert_close(layer.gates(x), want)
    layer.router.pool = "prompt"
    pm = layer.ctx.prompt_mask
    want = torch.softmax(((x * pm[..., None]).sum(1) / pm.sum(1, keepdim=True)) @ layer.router_weight.t(), -1)
    torch.testing.assert_close(layer.gates(x), want)


# ----------------------------------------------------------------------------- DOG (pure)
def _grads(L=3, K=4, r=2, D=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, K * r, D, generator=g)


def test_dog_assign_is_balanced_and_deterministic():
    G = _grads()
    a = dog_assign(G, 4)
    assert a.shape == (3, 8) and a.dtype == torch.long
    for row in a:
        assert torch.bincount(row, minlength=4).tolist() == [2, 2, 2, 2]
    assert torch.equal(a, dog_assign(G.clone(), 4))


def test_dog_objective_not_below_kmeans_start_and_current():
    G = _grads(L=5, K=8, r=4, D=64, seed=3)
    a, info = dog_assign(G, 8, return_info=True)
    assert (info["final"] >= info["start"] - 1e-5).all()
    u = G / G.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(dog_objective(u, a, 8), info["final"])


def test_dog_recovers_planted_groups():
    """Components built around K orthogonal directions are grouped by direction."""
    K, r, D = 4, 3, 16
    dirs = torch.eye(D)[:K]
    labels = torch.arange(K * r) % K  # interleaved: the current grouping is wrong
    G = (dirs[labels] + 0.05 * torch.randn(K * r, D)).unsqueeze(0)
    a = dog_assign(G, K)[0]
    for k in range(K):
        assert len(set(a[labels == k].tolist())) == 1
    u = G / G.norm(dim=-1, keepdim=True)
    intra, inter = group_angles(u, a.unsqueeze(0), K)
    assert float(intra) < 25 and abs(float(inter) - 90) < 5


def test_dog_zero_gradients_are_guarded():
    G = torch.zeros(1, 8, 5)
    a = dog_assign(G, 4)
    assert torch.bincount(a[0], minlength=4).tolist() == [2, 2, 2, 2]


def test_permutation_places_each_expert_in_its_slots():
    a = torch.tensor([[1, 0, 1, 0]])
    perm = permutation_from_assignment(a, 2)
    assert perm.tolist() == [[1, 3, 0, 2]]


# ----------------------------------------------------------------------------- DOG (applied)
def _train_setup(method="badit", extra=()):
    model, m, ids, _ = _tiny(method, extra)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    return model, m, opt, batch


def _step(model, opt, batch):
    opt.zero_grad()
    model(**batch).loss.backward()


def test_regroup_keeps_the_sum_of_components_and_balance():
    model, m, opt, batch = _train_setup()
    _step(model, opt, batch)
    before = {n: (l.lora_B @ l.lora_A).detach().clone() for n, l in m.layers.items()}
    info = m.regroup(opt)
    assert info["mean_moved"] > 0
    for n, l in m.layers.items():
        torch.testing.assert_close(l.lora_B @ l.lora_A, before[n], atol=1e-5, rtol=1e-5)


def test_regroup_with_scalar_router_preserves_the_function():
    model, m, opt, batch = _train_setup(extra=["method.router=scalar", "method.top_k=8",
                                               "method.function_preserving=none"])
    with torch.no_grad():  # make the scalar weights differ between experts
        for l in m.layers.values():
            l.router_weight.copy_(torch.linspace(0.5, 2.0, 8))
    _step(model, opt, batch)
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"]).logits.clone()
    info = m.regroup(opt)
    assert info["mean_moved"] > 0
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, ref, atol=1e-4, rtol=1e-4)


def test_optimizer_moments_follow_their_parameters():
    """A step after a regroup equals the step on a model permuted before it."""
    model, m, opt, batch = _train_setup()
    for _ in range(2):  # Adam moments exist
        _step(model, opt, batch)
        opt.step()
    _step(model, opt, batch)
    # snapshot everything, regroup (permutes params, grads, moments), step
    snap = {n: (l.lora_A.detach().clone(), l.lora_B.detach().clone(),
                {k: v.clone() for k, v in opt.state[l.lora_A].items()},
                {k: v.clone() for k, v in opt.state[l.lora_B].items()},
                l.lora_A.grad.clone(), l.lora_B.grad.clone()) for n, l in m.layers.items()}
    # the permutation DOG will choose, from the same gradients
    grads = {n: torch.cat([l.lora_A.grad, l.lora_B.grad.t()], 1) for n, l in m.layers.items()}
    G = torch.stack(list(grads.values()))
    perms = permutation_from_assignment(dog_assign(G, 8), 8)
    m.regroup(opt)
    opt.step()
    # reference: permute the snapshot by hand, take the same Adam step
    for (n, l), perm in zip(m.layers.items(), perms):
        A, B, sA, sB, gA, gB = snap[n]
        pA = nn.Parameter(A[perm].clone())
        pB = nn.Parameter(B[:, perm].clone())
        ref_opt = torch.optim.AdamW([pA, pB], lr=1e-2)
        ref_opt.state[pA] = {"step": sA["step"].clone(), "exp_avg": sA["exp_avg"][perm].clone(),
                             "exp_avg_sq": sA["exp_avg_sq"][perm].clone()}
        ref_opt.state[pB] = {"step": sB["step"].clone(), "exp_avg": sB["exp_avg"][:, perm].clone(),
                             "exp_avg_sq": sB["exp_avg_sq"][:, perm].clone()}
        pA.grad, pB.grad = gA[perm].clone(), gB[:, perm].clone()
        ref_opt.step()
        torch.testing.assert_close(l.lora_A.detach(), pA.detach())
        torch.testing.assert_close(l.lora_B.detach(), pB.detach())


def test_regroup_before_any_optimizer_step_works():
    model, m, opt, batch = _train_setup()
    _step(model, opt, batch)
    assert not opt.state
    info = m.regroup(opt)
    assert info["regroup"] == 1
    opt.step()


def _regroup_steps(m, epochs, spe=3):
    total = epochs * spe
    return [t for t in range(total) if m._due(t, total, last_of_epoch=(t + 1) % spe == 0)]


def test_dog_schedule():
    _, m, _, _ = _tiny("badit_reference")
    assert _regroup_steps(m, 4) == [2, 5]  # epoch ends while epoch <= E // 2 (1-based)
    assert _regroup_steps(m, 3) == [2]  # E // 2 = 1: the released code's rule, not 1.5
    assert _regroup_steps(m, 2) == [2]
    assert _regroup_steps(m, 1) == []  # E // 2 = 0; and never after a stage's last step
    _, m, _, _ = _tiny("badit", ["method.dog.every_n_steps=1", "method.dog.until_fraction=1.0"])
    assert _regroup_steps(m, 4) == list(range(11))  # every step but the stage's last
    _, m, _, _ = _tiny("badit", ["method.dog.until_fraction=1.0"])
    assert _regroup_steps(m, 1) == []  # a 1-epoch run does not regroup at its very end
    assert _regroup_steps(m, 2) == [2]
    _, m, _, _ = _tiny("badit_wo_dog")
    assert _regroup_steps(m, 4) == []


def test_anchor_moves_with_its_components():
    model, m, opt, batch = _train_setup("badit_anchor")
    _step(model, opt, batch)
    opt.step()
    _step(model, opt, batch)
    before = {n: (l.lora_A.detach().clone(), l.lora_A0.clone(), l.lora_B0.clone(), l.lora_B.detach().clone())
              for n, l in m.layers.items()}
    info = m.regroup(opt)
    assert info["mean_moved"] > 0
    for n, l in m.layers.items():
        A, A0, B0, B = before[n]
        # slot j now holds old component perm[j]: A, A0 rows and B, B0 columns moved together
        perm = torch.tensor([int((A == l.lora_A[j]).all(1).nonzero()[0]) for j in range(A.shape[0])])
        torch.testing.assert_close(l.lora_A0, A0[perm], atol=0, rtol=0)
        torch.testing.assert_close(l.lora_B0, B0[:, perm], atol=0, rtol=0)
        torch.testing.assert_close(l.lora_B.detach(), B[:, perm], atol=0, rtol=0)


def test_overlapped_regroup_is_applied_at_the_next_step_from_the_earlier_gradients():
    model, m, opt, batch = _train_setup("badit", ["method.dog.overlap=on",
                                                  "method.dog.every_n_steps=1",
                                                  "method.dog.until_fraction=1.0"])
    _step(model, opt, batch)
    grads_t = torch.stack([torch.cat([l.lora_A.grad, l.lora_B.grad.t()], 1) for l in m.layers.values()])
    before = {n: l.lora_A.detach().clone() for n, l in m.layers.items()}
    m.after_backward(model, opt, step=0, epoch=0, num_epochs=1, total_steps=10)
    assert m._pending is not None  # solved in the worker, nothing moved yet
    for n, l in m.layers.items():
        assert torch.equal(l.lora_A, before[n])
    opt.step()
    _step(model, opt, batch)
    after_update = {n: l.lora_A.detach().clone() for n, l in m.layers.items()}
    info = m._apply(m._take_pending()["solved"], opt, step=1, epoch=0, gradient_step=0)
    m._pending = None
    assert info["step"] == 1 and info["gradient_step"] == 0 and m.regroups == 1
    perms = permutation_from_assignment(dog_assign(grads_t, 8), 8)
    for (n, l), perm in zip(m.layers.items(), perms):
        torch.testing.assert_close(l.lora_A.detach(), after_update[n][perm], atol=0, rtol=0)


def test_overlap_auto_is_off_on_cpu():
    _, m, _, _ = _tiny("badit")
    assert m.cfg.dog.overlap == "auto" and not m._overlap()


def test_gram_angles_equal_vector_angles():
    from badit_exp.methods.badit import gram_angles

    G = _grads(L=4, K=4, r=3, D=30, seed=5)
    u = G / G.norm(dim=-1, keepdim=True)
    a = dog_assign(G, 4)
    for x, y in zip(group_angles(u, a, 4), gram_angles((u @ u.transpose(1, 2)).double(), a, 4)):
        torch.testing.assert_close(x.double(), y, atol=1e-3, rtol=1e-4)
