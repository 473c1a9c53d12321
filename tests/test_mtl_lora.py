"""MTL-LoRA: the task id in the forward pass, the per-example computation against a naive loop,
sequential resets and frozen past tasks, the issue's CLI runs."""


import pytest
import torch
import torch.nn as nn

from badit_exp import metrics as M
from badit_exp.methods.mtl_lora import MTLLoRALinear, TaskContext
from conftest import TASKS3, run_cli, run_tiny, tiny_overrides


def _layer(T=3, r=2, n_b=3, seed=0):
    torch.manual_seed(seed)
    ctx = TaskContext()
    layer = MTLLoRALinear(nn.Linear(6, 5, bias=False), T, r, 4.0, 0.0, n_b, 0.5, ctx)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_lambda.add_(0.3 * torch.randn_like(layer.lora_lambda))
        layer.lora_mix.normal_()
    return layer, ctx


def test_every_example_uses_its_own_task_forward_and_gradients():
    layer, ctx = _layer()
    x = torch.randn(4, 3, 6)
    ctx.task_ids = torch.tensor([0, 2, 1, 2])
    y = layer(x)
    params = [layer.lora_A, layer.lora_lambda, layer.lora_mix, layer.lora_B]
    gy = torch.randn_like(y)
    grads = torch.autograd.grad((y * gy).sum(), params)
    rows = []
    for i, t in enumerate(ctx.task_ids.tolist()):  # naive: one example, one task at a time
        mix = torch.softmax(layer.lora_mix[t] / 0.5, -1)
        B = sum(mix[j] * layer.lora_B[j] for j in range(3))
        rows.append(layer.base(x[i]) + layer.scaling * x[i] @ layer.lora_A.t()
                    @ layer.lora_lambda[t].t() @ B.t())
    y2 = torch.stack(rows)
    grads2 = torch.autograd.grad((y2 * gy).sum(), params)
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ctx.eval_task = 2  # evaluation names one task for the whole batch
    torch.testing.assert_close(layer(x)[1], y[1])


def test_no_task_id_is_a_clear_error_and_init_is_exact():
    torch.manual_seed(0)
    layer = MTLLoRALinear(nn.Linear(6, 5), 2, 2, 4.0, 0.0, 3, 0.1, TaskContext())
    x = torch.randn(2, 3, 6)
    with pytest.raises(RuntimeError, match="task id"):
        layer(x)
    layer.ctx.task_ids = torch.tensor([0, 1])
    torch.testing.assert_close(layer(x), layer.base(x))  # B = 0 at init


@pytest.mark.parametrize("freeze", [True, False])
def test_sequential_resets_the_new_task_and_can_freeze_the_past(tmp_path, monkeypatch, freeze,
                                                                stage_states, superni):
    """With weight decay, only freeze_past_tasks keeps task 1's Lambda as its stage left it."""
    states = stage_states
    from badit_exp.methods.mtl_lora import MTLLoRA

    starts = {}
    orig_start = MTLLoRA.on_stage_start

    def spy_start(self, model, i, name, data):
        orig_start(self, model, i, name, data)
        starts[i] = next(iter(self.layers.values())).lora_lambda.detach().clone()

    monkeypatch.setattr(MTLLoRA, "on_stage_start", spy_start)
    run_tiny(tmp_path / "r", tiny_overrides(tmp_path, tasks=TASKS3[:2], extra=[
        "method=mtl_lora", "training_mode=sequential", "task_order=custom",
        f"task_order.order=[{','.join(TASKS3[:2])}]", "trainer.weight_decay=0.5",
        f"method.freeze_past_tasks={str(freeze).lower()}"]))
    key = next(k for k in states[0] if k.endswith("lora_lambda"))
    lam0, lam1 = states[0][key], states[1][key]
    # task 2 gets no gradient while task 1 trains (only weight decay shrinks it) ...
    torch.testing.assert_close(lam0[1], torch.eye(8) * lam0[1][0, 0])
    assert float(lam0[1][0, 0]) < 1
    assert torch.equal(starts[1][1], torch.eye(8))  # ... is reset to its init at its stage
    assert not torch.equal(lam1[1], torch.eye(8))  # ... and trained from there
    assert torch.equal(lam1[0], lam0[0]) == freeze
    assert states[1]["_mtl_trained"].tolist() == [True, True]


@pytest.mark.slow  # the CLI path is in the fast suite once (test_e2e_mixed); the method table covers MTL-LoRA
def test_the_issue_cli_runs(tmp_path):
    assert run_cli(tmp_path / "mixed", "mtl_lora")["method_variant"]["task_id"]


@pytest.mark.slow
def test_the_issue_cli_runs_sequential(tmp_path):
    run_cli(tmp_path / "seq", "mtl_lora", ["training_mode=sequential"])
    stages, tasks, A = M.read_matrix_csv(tmp_path / "seq" / "scores.csv")
    assert len(stages) == 3 and all(len(r) == 3 for r in A)


@pytest.mark.parametrize("method", ["mtl_lora", "lori"])
def test_single_mode_runs(tmp_path, method, superni):
    m = run_tiny(tmp_path / "single", tiny_overrides(tmp_path, tasks=TASKS3[:2], extra=[
        f"method={method}", "training_mode=single", "trainer.epochs=1"]))
    assert set(m["single_scores"]) == set(TASKS3[:2])
