"""Analysis building blocks in closed form, and each analysis end to end on a tiny model."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from badit_exp import analysis as A
from conftest import CACHE, REPO, SUPERNI, TASKS3, run_tiny, tiny_overrides


class HandMLP(nn.Module):
    """gate_proj with identity weights, act = ReLU: activations are relu(x)."""

    def __init__(self, d=3):
        super().__init__()
        self.gate_proj = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.gate_proj.weight.copy_(torch.eye(d))
        self.act_fn = nn.ReLU()

    def forward(self, x):
        return self.act_fn(self.gate_proj(x))


def test_gate_activation_means_closed_form():
    mlp = HandMLP()
    acts = A.GateActivations({"m": mlp})
    # two examples, 2 tokens each, the second token of example 2 is padding
    x = torch.tensor([[[1.0, -1.0, 2.0], [3.0, 1.0, -2.0]],
                      [[-1.0, 4.0, 0.0], [9.0, 9.0, 9.0]]])
    acts.set_batch(torch.tensor([[1, 1], [1, 0]]))
    mlp(x)
    acts.close()
    # example 1: mean(relu) over tokens = [2, 0.5, 1]; example 2: [0, 4, 0]; mean = [1, 2.25, 0.5]
    np.testing.assert_allclose(acts.means()["m"], [1.0, 2.25, 0.5])


def test_activation_mask_and_sharing():
    means = np.array([[0.5, 0.0, -0.2, 0.01], [0.3, 0.0, 0.0, 0.02], [0.0, 0.0, 0.3, 0.5]])
    mask = A.activation_mask(means, 0.015)
    assert mask.tolist() == [[True, False, True, False], [True, False, False, True],
                             [False, False, True, True]]
    assert A.sharing_counts(mask).tolist() == [0, 3, 0]  # three neurons shared by two tasks


def test_fisher_closed_form():
    """y = w . x, L = 0.5 (y - t)^2  ->  dL/dw = (y - t) x."""
    w = nn.Parameter(torch.tensor([[1.0, -1.0]]))
    acc = A.FisherAccumulator({"w": w})
    data = [(torch.tensor([2.0, 1.0]), 0.0), (torch.tensor([0.0, 3.0]), 1.0)]
    grads = []
    for x, t in data:
        w.grad = None
        loss = 0.5 * ((w @ x).squeeze() - t) ** 2
        loss.backward()
        acc.update()
        grads.append(((w @ x).item() - t) * x.numpy())
    g = np.stack(grads)  # [[2, 1], [0, 12]]
    np.testing.assert_allclose(acc.fisher()["w"][0], (g ** 2).mean(0))
    np.testing.assert_allclose(acc.mean_grad()["w"][0], g.mean(0))


def test_fisher_mask_semantics():
    F = np.array([[0.1, 0.5], [0.3, 0.9]])
    assert A.fisher_mask(F, 0.5, None).tolist() == [[False, True], [False, True]]
    assert A.fisher_mask(F, 0.25, None).sum() == 1
    assert A.fisher_mask(F, 0.25, 0.2).tolist() == [[False, True], [True, True]]


def test_sign_counts():
    g = np.array([[[1.0, -1.0]], [[2.0, 1.0]], [[-1.0, 0.0]]])  # 3 tasks, 1 row, 2 params
    s = A.sign_counts(g)
    np.testing.assert_allclose(s["positive_per_row"], [1.5])  # (2 + 1) / 2
    np.testing.assert_allclose(s["negative_per_row"], [1.0])  # (1 + 1) / 2
    np.testing.assert_allclose(s["conflict_fraction_per_row"], [1.0])


def test_layer_selection():
    assert A.resolve_layers(None, 30) == [0, 15, 29]
    assert A.resolve_layers([-1, 2], 4) == [3, 2]
    with pytest.raises(ValueError, match="4 layers"):
        A.resolve_layers([4], 4)


def _analyze(tmp_path, name, *extra):
    out = subprocess.run([sys.executable, "-m", "badit_exp.analyze", name, "model=tiny-llama",
                          f"data.root={SUPERNI}", f"data.tasks=[{','.join(TASKS3[:2])}]",
                          "analysis.max_examples_per_task=3", f"paths.cache_dir={CACHE}",
                          f"hydra.run.dir={tmp_path}/{name}", *extra],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    return tmp_path / name


@pytest.mark.slow  # the same CLI, hooks and files as fisher's end-to-end test; its math is unit-tested
def test_neurons_end_to_end(tmp_path):
    d = _analyze(tmp_path, "neurons")
    z = np.load(d / "neurons.npz")
    assert z["layer0_mask"].shape == (2, 128) and z["layer1_shared_by_k_tasks"].shape == (2,)
    assert (d / "neurons_mask.png").exists() and (d / "neurons_sharing.png").exists()
    res = json.loads((d / "neurons.json").read_text())
    assert res["layers"] == [0, 1]


def test_fisher_end_to_end(tmp_path):
    d = _analyze(tmp_path, "fisher", "analysis.matrices=[gate_proj,q_proj]", "analysis.layers=[1]")
    z = np.load(d / "fisher.npz")
    assert z["layer1.gate_proj.activated_per_row"].shape == (2, 128)
    assert z["layer1.q_proj.activated_per_row"].shape == (2, 64)
    # top 1% of 128*64 = 82 parameters per task and matrix (ties may add a few)
    assert all(n >= 82 for n in z["layer1.gate_proj.activated_per_row"].sum(1))
    assert (d / "fisher_rows.png").exists() and (d / "fisher_shared_by_k.csv").exists()


def test_experts_end_to_end(tmp_path):
    """A trained mixture's routing per task, in-process (fisher's test runs the CLI)."""
    from omegaconf import OmegaConf

    from badit_exp import analyze
    from badit_exp.compose import compose

    run_tiny(tmp_path / "moe", tiny_overrides(tmp_path, tasks=TASKS3[:2],
                                              extra=["method=loramoe", "trainer.epochs=1"]))
    cfg = OmegaConf.to_object(compose([
        "analysis.name=experts", "model=tiny-llama", f"data.root={SUPERNI}",
        f"data.tasks=[{','.join(TASKS3[:2])}]", "analysis.max_examples_per_task=3",
        f"paths.cache_dir={CACHE}", f"analysis.run_dir={tmp_path}/moe"], config_name="analyze"))
    d = tmp_path / "experts"
    analyze.run(cfg, d)
    z = np.load(d / "experts.npz")
    assert z["weights"].shape == (2, 8) and z["top_k"].shape == (2, 4)
    np.testing.assert_allclose(z["weights"].sum(1), 1.0, atol=1e-5)
    assert (d / "experts.png").exists()


@pytest.mark.slow
def test_experts_on_a_lora_run_is_a_clear_error(tmp_path):
    run_tiny(tmp_path / "lora", tiny_overrides(tmp_path, tasks=TASKS3[:1], extra=["trainer.epochs=1"]))
    out = subprocess.run([sys.executable, "-m", "badit_exp.analyze", "experts", "model=tiny-llama",
                          f"data.root={SUPERNI}", f"data.tasks=[{TASKS3[0]}]", f"paths.cache_dir={CACHE}",
                          f"analysis.run_dir={tmp_path}/lora", f"hydra.run.dir={tmp_path}/x"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "needs loramoe or badit" in out.stdout + out.stderr
