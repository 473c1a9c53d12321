"""PEFT baselines on a tiny model: parameter counts and step-0 invariants."""

import pytest
import torch

from badit_exp.compose import validate
from badit_exp.methods import registry
from badit_exp.models import load_model_and_tokenizer, resolve_device
from conftest import CACHE, compose_cfg


def _build(method, model="tiny-llama"):
    cfg = validate(compose_cfg([f"model={model}", f"method={method}", "method.dropout=0.0"]))
    torch.manual_seed(0)
    base, tok = load_model_and_tokenizer(cfg.model, CACHE, resolve_device("cpu"))
    ids = torch.randint(0, len(tok), (2, 12))
    with torch.no_grad():
        ref = base(input_ids=ids).logits.clone()
    model_ = registry.build(cfg.method).apply(base)
    model_.eval()
    return cfg, model_, ids, ref


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen3", "tiny-gemma2"])
def test_lora_trainable_count_and_identity(model):
    cfg, m, ids, ref = _build("lora", model)
    n = sum(p.numel() for p in m.parameters() if p.requires_grad)
    h, f, L, r = 64, 128, 2, 4  # gate_proj: (f x h); A: r x h, B: f x r
    assert n == L * (r * h + f * r)
    names = [k for k, p in m.named_parameters() if p.requires_grad]
    assert all("gate_proj" in k and ("lora_A" in k or "lora_B" in k) for k in names)
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, ref)  # B = 0


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_svd_qr_inits_keep_outputs_at_step0(method):
    cfg, m, ids, ref = _build(method)
    with torch.no_grad():
        out = m(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # ... and the adapter is not zero: the base weight became a residual
    lora_B = [p for k, p in m.named_parameters() if "lora_B" in k]
    assert all(b.abs().sum() > 0 for b in lora_B)


def test_registry_rejects_unknown_and_duplicates():
    with pytest.raises(KeyError, match="not registered"):
        registry.get("nope")
    cfg_cls, cls = registry.get("peft_lora")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("peft_lora", cfg_cls)(type("Other", (), {}))
