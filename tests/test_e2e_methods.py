"""The method matrix: every registered method through the same end-to-end checks."""

import json

import pytest
import torch

from badit_exp.evaluation.generate import generate
from badit_exp.training.export import load_trained
from conftest import CACHE, TASKS3, run_tiny, tiny_overrides

TASKS2 = TASKS3[:2]
MIXTURES = ["loramoe", "loramoe_original", "badit", "badit_wo_bad", "badit_wo_dog"]


@pytest.mark.parametrize("method", MIXTURES)
def test_mixture_methods_end_to_end(tmp_path, method):
    m = run_tiny(tmp_path / "r", tiny_overrides(tmp_path, tasks=TASKS2,
                                                extra=[f"method={method}", "trainer.epochs=2"]))
    d = tmp_path / "r"
    t = m["timing"]["mixed"]
    assert t["last_loss"] < t["first_loss"]
    stats = json.loads((d / "router_stats.json").read_text())
    usage = stats["stages"]["mixed"]
    assert set(usage) == set(TASKS2)
    for task in TASKS2:
        for layer, w in usage[task].items():
            assert len(w) == 8 and abs(sum(w) - 1) < 1e-4
    assert (d / "router_usage_mixed.png").exists()
    dog = d / "dog_log.jsonl"
    if method in ("badit", "badit_wo_bad"):
        rows = [json.loads(l) for l in dog.read_text().splitlines()]
        assert len(rows) == 1  # 2 epochs, reference schedule: end of epoch 1 only
        r = rows[0]
        assert r["mean_objective_after"] >= r["mean_objective_kmeans_start"] - 1e-6
        assert 0 <= r["mean_intra_angle_after"] <= 180 and 0 <= r["mean_inter_angle_after"] <= 180
        assert len(r["layers"]) == 2 and all(0 <= l["moved"] <= 32 for l in r["layers"])
        assert (d / "dog_angles.png").stat().st_size > 1000
    else:
        assert not dog.exists()
    assert m["method_variant"]["kind"] in ("loramoe", "badit")


@pytest.mark.parametrize("method", ["lora", "pissa", "badit"])
def test_reloaded_adapter_scores_identically(tmp_path, method):
    over = tiny_overrides(tmp_path, tasks=TASKS2, extra=[f"method={method}", "trainer.epochs=1",
                                                         "data.max_new_tokens=8"])
    run_tiny(tmp_path / "r", over)
    model, tok, method_obj = load_trained(tmp_path / "r", CACHE)
    # the trained state really is loaded (greedy text alone can hide a missed load on a tiny model)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "r" / "adapter" / "adapter.safetensors"))
    now = method_obj.state_dict(model)
    assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved)
    assert any(("lora_B" in k) and saved[k].abs().sum() > 0 for k in saved)
    from badit_exp.data import load_task
    from badit_exp.data.prompts import tokenize_task
    from conftest import SUPERNI

    for task in TASKS2:
        t = load_task(SUPERNI, task, "test", 2)
        ex = tokenize_task(t, tok, kind="eval", max_seq_len=256, max_new_tokens=8, seed=1)
        preds = generate(model, tok, ex, batch_size=4, max_new_tokens=8, device=torch.device("cpu"))
        saved = [json.loads(l)["prediction"] for l in
                 (tmp_path / "r" / "predictions" / f"{task}.jsonl").read_text().splitlines()]
        assert preds == saved
