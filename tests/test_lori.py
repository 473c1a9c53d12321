"""LoRI: seeded frozen A, global magnitude mask after calibration, masked entries that never
move, disjoint masks for sequential tasks, the two-run form, the issue's CLI runs."""


import pytest
import torch
from safetensors.torch import load_file

from badit_exp import metrics as M
from badit_exp.config import ConfigError
from conftest import CACHE, run_cli, run_tiny, tiny_overrides


def _layers(state):
    return sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".lora_B")})


def test_masked_entries_are_exactly_zero_and_the_mask_is_the_global_top_k(tmp_path, stage_states,
                                                                          superni):
    states = stage_states
    run_tiny(tmp_path / "r", tiny_overrides(tmp_path, extra=[
        "method=lori", "method.sparsity=0.75", "trainer.epochs=3"]))
    st = states[0]
    names = _layers(st)
    total = sum(st[f"{n}.lori_mask"].numel() for n in names)
    kept = sum(int(st[f"{n}.lori_mask"].sum()) for n in names)
    assert kept == round(0.25 * total)  # one threshold over all layers together
    per_layer = {int(st[f"{n}.lori_mask"].sum()) for n in names}
    assert len(per_layer) > 1  # global, not per layer
    for n in names:
        B, m = st[f"{n}.lora_B"], st[f"{n}.lori_mask"]
        assert torch.equal(B * (1 - m), torch.zeros_like(B))  # bit-identical to their reset 0
        assert (B * m).abs().sum() > 0  # the masked-in entries trained
    saved = load_file(str(tmp_path / "r" / "lori_mask.safetensors"))
    assert all(torch.equal(saved[n], st[f"{n}.lori_mask"]) for n in names)
    assert int(st["lori_a_seed"]) == 0 and int(st["lori_masked"]) == 1


def test_a_is_seeded_and_a_wrong_seed_is_refused():
    from badit_exp.compose import load
    from badit_exp.methods import registry
    from badit_exp.models import load_model_and_tokenizer, resolve_device

    def build(seed):
        cfg = load(["model=tiny-llama", "method=lori", f"method.a_seed={seed}", "scale=tiny"])
        torch.manual_seed(123 + seed)  # the global RNG must not matter
        base, _ = load_model_and_tokenizer(cfg.model, CACHE, resolve_device("cpu"))
        m = registry.build(cfg.method)
        return m, m.apply(base)

    (m1, mod1), (m2, _), (m3, _) = build(0), build(0), build(5)
    A = {n: l.lori_A for n, l in m1.layers.items()}
    assert all(torch.equal(A[n], l.lori_A) for n, l in m2.layers.items())
    assert not torch.equal(A[next(iter(A))], next(iter(m3.layers.values())).lori_A)
    assert not any(p.requires_grad for n, p in mod1.named_parameters() if "lori_A" in n)
    with pytest.raises(ConfigError, match="a_seed=0"):
        m3.load_state_dict(None, m1.state_dict(mod1))


def test_sequential_tasks_get_disjoint_masks_and_keep_earlier_entries(tmp_path, stage_states,
                                                                       superni):
    states = stage_states
    run_tiny(tmp_path / "seq", tiny_overrides(tmp_path, extra=[
        "method=lori", "training_mode=sequential", "method.sparsity=0.7", "trainer.epochs=2"]))
    names = _layers(states[0])
    for i in (1, 2):
        prev, now = states[i - 1], states[i]
        for n in names:
            mp, mn = prev[f"{n}.lori_mask"], now[f"{n}.lori_mask"]
            assert torch.equal(mn * now[f"{n}.lori_used"], torch.zeros_like(mn))  # disjoint
            assert torch.equal(now[f"{n}.lori_used"] * mp, mp)  # earlier masks are now used
            # the earlier tasks' entries: frozen as their stage left them
            frozen = prev[f"{n}.lori_B_prev"] + prev[f"{n}.lora_B"] * mp
            assert torch.equal(now[f"{n}.lori_B_prev"], frozen)
    stages, tasks, A = M.read_matrix_csv(tmp_path / "seq" / "scores.csv")
    assert len(stages) == 3 and all(len(r) == 3 for r in A)


def test_a_sparsity_that_cannot_give_disjoint_masks_names_the_minimum(tmp_path, superni):
    with pytest.raises(ConfigError, match=r"sparsity >= 0\.6667"):
        run_tiny(tmp_path / "x", tiny_overrides(tmp_path, extra=[
            "method=lori", "training_mode=sequential", "method.sparsity=0.5"]))


def test_the_two_run_form_masks_from_the_first_step(tmp_path, stage_states, superni):
    run_tiny(tmp_path / "d", tiny_overrides(tmp_path, extra=["method=lori"]))
    mask = tmp_path / "d" / "lori_mask.safetensors"
    states = stage_states
    run_tiny(tmp_path / "s", tiny_overrides(tmp_path, extra=[
        "method=lori", f"method.mask_path={mask}", "seed=2"]))
    saved = load_file(str(mask))
    for n in _layers(states[0]):
        assert torch.equal(states[0][f"{n}.lori_mask"], saved[n])
        B = states[0][f"{n}.lora_B"]
        assert torch.equal(B * (1 - saved[n]), torch.zeros_like(B))


@pytest.mark.slow  # the CLI path is in the fast suite once (test_e2e_mixed); the method table covers LoRI
def test_the_issue_cli_run(tmp_path):
    m = run_cli(tmp_path / "r", "lori")
    assert m["method_variant"]["sparsity"] == 0.9
