"""GPU-only checks (skipped without CUDA): bf16 training, BAD on a bf16 base, DOG on the device."""

import pytest
import torch

from badit_exp.methods.badit import dog_assign
from conftest import TASKS3, run_tiny, tiny_overrides

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method", ["lora", "badit"])
def test_bf16_training_on_gpu(tmp_path, method):
    m = run_tiny(tmp_path / "r", tiny_overrides(tmp_path, extra=[
        f"method={method}", "model.dtype=bfloat16", "trainer.precision=bf16", "trainer.device=cuda",
        "trainer.epochs=3"]))
    t = m["timing"]["mixed"]
    assert t["last_loss"] < t["first_loss"]
    assert m["provenance"]["device"]["type"] == "cuda"


def test_dog_assign_on_cuda_matches_cpu():
    G = torch.randn(30, 32, 2112, generator=torch.Generator().manual_seed(0))
    a_cpu = dog_assign(G, 8)
    a_gpu = dog_assign(G.cuda(), 8)
    assert a_gpu.device.type == "cuda"
    # float rounding may flip exact ties; nearly all layers must agree
    assert (a_gpu.cpu() == a_cpu).all(-1).float().mean() > 0.9


def test_flash_attention_2_if_installed(tmp_path):
    pytest.importorskip("flash_attn")
    run_tiny(tmp_path / "r", tiny_overrides(tmp_path, tasks=TASKS3[:1], extra=[
        "model.dtype=bfloat16", "model.attn_implementation=flash_attention_2",
        "trainer.device=cuda", "trainer.epochs=1"]))
