"""mtLoRA: the fine-grained fused block adapter against a naive loop, the spectral regulariser in
both forms (the released one's exact zero at step 0), the cv^2 balance, the issue's CLI run."""


import pytest
import torch
import torch.nn as nn

from badit_exp.compose import load
from badit_exp.methods import registry
from badit_exp.methods.moe.routing import RoutingContext
from badit_exp.methods.mtlora import MtLoRABlock, spectral_term
from badit_exp.models import load_model_and_tokenizer, resolve_device
from conftest import CACHE, run_cli


def _block(d=8, K=3, r=2, group=4, seed=0):
    torch.manual_seed(seed)
    mlp = nn.Linear(d, d, bias=False).requires_grad_(False)
    blk = MtLoRABlock(mlp, d, K, r, 4.0, 0.0, group, RoutingContext())
    with torch.no_grad():
        blk.lora_B.normal_()
        blk.router.weight.normal_()
    return blk


def test_fine_grained_routing_equals_a_naive_loop_forward_and_gradients():
    blk = _block()
    x = torch.randn(2, 5, 8)
    y = blk(x)
    params = [blk.lora_A, blk.lora_B, blk.router.weight]
    gy = torch.randn_like(y)
    grads = torch.autograd.grad((y * gy).sum(), params)
    g = torch.softmax((x @ blk.router.weight.t()).view(2, 5, 2, 3), -1)  # (b, t, G, K)
    h = x @ blk.lora_A.t()
    y2 = blk.mlp(x).clone()
    cols = [slice(0, 4), slice(4, 8)]
    parts = []
    for gi, c in enumerate(cols):  # each output group with its own K gates
        parts.append(sum(g[..., gi, k:k + 1] * (h @ blk.lora_B[k, c].t()) for k in range(3)))
    y2 = y2 + blk.scaling * torch.cat(parts, -1)
    grads2 = torch.autograd.grad((y2 * gy).sum(), params)
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception, match="group_size=3 does not divide"):
        _block(group=3)


def test_spectral_term_on_a_hand_built_b_both_forms_and_gradient():
    B = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    S = torch.tensor([3.0, 1.0], dtype=torch.float64)
    w = torch.exp(-S / S.mean())  # [e^-1.5, e^-0.5]
    c2 = (9.0 + 1.0) / 2  # ||B||_F^2 / r
    want = ((S ** 2 - c2) ** 2 * w ** 4).sum()  # (4^2 w1^4 + 4^2 w2^4)
    got = spectral_term(B, "as_described")
    assert float(got) == pytest.approx(float(want), rel=1e-6) and float(got) > 0
    # B^T B is diagonal here, so the column-index form gives the same value
    assert float(spectral_term(B, "as_released")) == pytest.approx(float(want), rel=1e-6)
    # the gradient (w and c detached) is that of sum_i w_i^4 (S_i^2 - c^2)^2 through S
    (g,) = torch.autograd.grad(got, B)
    want_g = torch.zeros_like(B)
    want_g[0, 0] = w[0] ** 4 * 2 * (9 - c2) * 2 * 3.0  # d/dS_1 * dS_1/dB_00 (= 1)
    want_g[1, 1] = w[1] ** 4 * 2 * (1 - c2) * 2 * 1.0
    torch.testing.assert_close(g, want_g)
    # rotated columns: the two forms now differ (the released one weights column indices)
    Q = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)
    Br = (B @ Q).detach()
    assert float(spectral_term(Br, "as_described")) == pytest.approx(float(want), rel=1e-6)
    assert float(spectral_term(Br, "as_released")) != pytest.approx(float(want), rel=1e-3)


def _method(*extra):
    cfg = load(["model=tiny-llama", "method=mtlora", "scale=tiny", *extra])
    torch.manual_seed(0)
    base, _ = load_model_and_tokenizer(cfg.model, CACHE, resolve_device("cpu"))
    m = registry.build(cfg.method)
    return m, m.apply(base)


def test_as_released_is_exactly_zero_at_step_0_and_silent_until_its_trigger():
    m, model = _method("method.spectral.mode=as_released", "method.balance_coef=0")
    ids = torch.randint(0, 100, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.train()
    model(**batch)
    loss = m.extra_loss(model, batch)
    assert loss is not None and float(loss) == 0.0  # fires at step 0, when every B is 0
    m._step = 1
    assert m.extra_loss(model, batch) is None  # ... then not again before step 500
    m._step = 500
    assert m.spectral_active()


def test_as_described_is_nonzero_after_step_0_and_the_balance_is_cv2():
    m, model = _method("method.balance_coef=1.0")
    with torch.no_grad():
        for l in m.layers.values():
            l.lora_B.normal_(std=0.1)
    ids = torch.randint(0, 100, (2, 7))
    am = torch.ones_like(ids)
    model.train()
    model(input_ids=ids, attention_mask=am)
    assert float(m.spectral_loss()) > 0 and m.spectral_active()
    total = m.extra_loss(model, {"input_ids": ids, "attention_mask": am})
    cvs = []
    for l in m.layers.values():
        mean = l.last_gates.mean((0, 1)).mean(0)
        cvs.append(mean.var(unbiased=False) / mean.mean() ** 2)
    want = torch.stack(cvs).mean() + m.cfg.spectral.coef * m.spectral_loss()
    torch.testing.assert_close(total, want)


@pytest.mark.slow  # the CLI path is in the fast suite once (test_e2e_mixed); the method table covers mtLoRA
def test_the_issue_cli_run(tmp_path):
    d = tmp_path / "r"
    m = run_cli(d, "mtlora", ["method.group_size=32"])
    assert m["method_variant"]["spectral"]["mode"] == "as_described"
    assert (d / "router_usage_mixed.png").exists()
