"""Sequential and single modes on a tiny model: matrix, metrics, forward, resume."""

import json

import pytest

from badit_exp import metrics as M
from badit_exp.config import ConfigError
from badit_exp.data.superni import DataError
from badit_exp.methods.peft_lora import PeftLora
from badit_exp.training import runner as runner_mod
from badit_exp.training import stages as stages_mod
from badit_exp.training.checkpoint import CheckpointError
from conftest import TASKS3, compose_cfg, run_tiny, slow_unless, tiny_overrides

SEQ = ["training_mode=sequential", "trainer.epochs=1"]
# order1 restricted to TASKS3: 073 before 1687? order1 = 591 073 1687 875 ... 363 ...
ORDER1_TASKS3 = ["task073_commonsenseqa_answer_generation", "task875_emotion_classification",
                 "task363_sst2_polarity_classification"]


def test_sequential_matrix_files_and_metrics(tmp_path):
    m = run_tiny(tmp_path / "seq", tiny_overrides(tmp_path, extra=SEQ))
    d = tmp_path / "seq"
    assert m["tasks"] == ORDER1_TASKS3 and m["stages"] == ORDER1_TASKS3
    stages, tasks, A = M.read_matrix_csv(d / "scores.csv")
    assert stages == tasks == ORDER1_TASKS3 and len(A) == 3 and all(len(r) == 3 for r in A)
    saved = json.loads((d / "metrics.json").read_text())
    recomputed = M.compute_metrics(A, tasks, "sequential", None)
    for k in ("rouge", "forget_rate", "backward", "forget_rate_textbook", "backward_textbook"):
        assert saved[k] == pytest.approx(recomputed[k], abs=1e-3)
    assert saved["forward"] is None and saved["forward_missing_reason"]
    assert (d / "scores_heatmap.png").stat().st_size > 1000
    assert "\\begin{tabular}" in (d / "scores.tex").read_text()
    for i, s in enumerate(ORDER1_TASKS3):
        assert len(list((d / "predictions" / f"after_{i:02d}_{s}").glob("*.jsonl"))) == 3


def test_random_order_is_seeded(tmp_path):
    from badit_exp.compose import validate

    o1 = stages_mod.task_order(validate(compose_cfg(["task_order=random", "seed=3"])))
    o2 = stages_mod.task_order(validate(compose_cfg(["task_order=random", "seed=3"])))
    o3 = stages_mod.task_order(validate(compose_cfg(["task_order=random", "seed=4"])))
    assert o1 == o2 and sorted(o1) == sorted(o3) and o1 != o3
    assert stages_mod.task_order(validate(compose_cfg(["seed=2"])))[0] == "task1290_xsum_summarization"


@pytest.mark.parametrize("order,err", [("[363,875]", ConfigError), ("[363,875,875]", DataError),
                                       ("[363,875,999]", DataError)])
def test_bad_custom_orders(tmp_path, order, err):
    from badit_exp.compose import validate

    cfg = validate(compose_cfg(tiny_overrides(tmp_path, extra=[
        "training_mode=sequential", "task_order=custom", f"task_order.order={order}",
        "data.tasks=[task363_sst2_polarity_classification,task875_emotion_classification,"
        "task073_commonsenseqa_answer_generation]"])))
    with pytest.raises(err):
        stages_mod.plan_stages(cfg)


def test_single_then_sequential_gives_forward(tmp_path):
    # the intermediate cap never applies in single mode: each stage's evaluation is its task's
    # only, final score a_{t,0}, on the full sample (issue 26)
    single = run_tiny(tmp_path / "single", tiny_overrides(tmp_path, extra=[
        "training_mode=single", "trainer.epochs=1", "data.max_eval_per_task_intermediate=1"]))
    assert set(single["single_scores"]) == set(TASKS3)
    for t in TASKS3:
        assert len((tmp_path / "single" / "predictions" / f"{t}.jsonl").read_text()
                   .splitlines()) == 2, t
    seq = run_tiny(tmp_path / "seq", tiny_overrides(tmp_path, extra=SEQ))
    assert seq["forward"] is not None
    assert seq["single_results_source"].endswith("single/metrics.json")
    A = seq["matrix"]["summary"]
    exp = sum(A[t][t] - single["single_scores"][task] for t, task in enumerate(seq["tasks"])) / 3
    assert seq["forward"] == pytest.approx(exp)


class Crash(RuntimeError):
    pass


def _adapter(d):
    return (d / "adapter" / "adapter.safetensors").read_bytes()


def test_resume_after_crash_between_tasks_equals_uninterrupted(tmp_path, monkeypatch):
    over = tiny_overrides(tmp_path, extra=SEQ + ["method.dropout=0.1"])
    ref = run_tiny(tmp_path / "ref", over)

    orig = runner_mod.Runner.evaluate

    def crashing_evaluate(self, model, method, i, stage, final, **kw):
        if i == 1:  # task 2 trained and checkpointed, evaluation not done
            raise Crash()
        return orig(self, model, method, i, stage, final, **kw)

    monkeypatch.setattr(runner_mod.Runner, "evaluate", crashing_evaluate)
    with pytest.raises(Crash):
        run_tiny(tmp_path / "crash", over)
    progress = json.loads((tmp_path / "crash" / "progress.json").read_text())
    assert progress["completed"] == ORDER1_TASKS3[:1]
    monkeypatch.setattr(runner_mod.Runner, "evaluate", orig)

    # count the training steps the resumed run does: stage 2 must not be retrained
    seen = []
    orig_train = runner_mod.Runner.train_stage
    monkeypatch.setattr(runner_mod.Runner, "train_stage",
                        lambda self, *a, **k: seen.append(a[2]) or orig_train(self, *a, **k))
    res = run_tiny(tmp_path / "crash", over)
    assert seen == [1, 2]  # stage index 1 only resumes from its end-of-epoch checkpoint
    assert (tmp_path / "crash" / "scores.csv").read_text() == (tmp_path / "ref" / "scores.csv").read_text()
    assert _adapter(tmp_path / "crash") == _adapter(tmp_path / "ref")
    assert res["forget_rate"] == ref["forget_rate"]


def _log_rows(path, keys):
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return [{k: r.get(k) for k in keys} for r in rows]


@pytest.mark.parametrize("method", [slow_unless(False, "lora"), "badit",
                                    slow_unless(False, "badit_ema"),
                                    slow_unless(False, "badit_overlap")])
def test_resume_mid_epoch_equals_uninterrupted(tmp_path, monkeypatch, method):
    """Killed mid-epoch and restarted = uninterrupted, bit for bit (with DOG's EMA gradient
    buffers, which the checkpoint must carry, for badit_ema)."""
    from badit_exp.methods.badit import Badit

    klass = {"lora": PeftLora, "badit": Badit, "badit_ema": Badit, "badit_overlap": Badit}[method]
    extra = ["method.dog.every_n_steps=1", "method.dog.until_fraction=1.0"] if method != "lora" else []
    if method == "badit_ema":
        extra += ["method.dog.grad_source=ema", "method.dog.ema_beta=0.5"]
    if method == "badit_overlap":  # a solved regroup waiting for its step is checkpointed
        extra += ["method.dog.overlap=on"]
    over = tiny_overrides(tmp_path, extra=SEQ + ["trainer.epochs=2", "trainer.checkpoint_every_steps=1",
                                                  "method.dropout=0.1",
                                                  f"method={method.split('_')[0]}", *extra])
    run_tiny(tmp_path / "ref", over)
    calls = {"n": 0}
    orig = klass.after_optimizer_step

    def crash_on_6th(self, model, opt):
        calls["n"] += 1
        if calls["n"] == 6:  # stage 0: 2 steps x 2 epochs; stage 1: step 1 checkpointed, crash in step 2
            raise Crash()
        return orig(self, model, opt)

    monkeypatch.setattr(klass, "after_optimizer_step", crash_on_6th)
    with pytest.raises(Crash):
        run_tiny(tmp_path / "crash", over)
    monkeypatch.setattr(klass, "after_optimizer_step", orig)
    meta = json.loads((tmp_path / "crash" / "checkpoints" / "in_stage" / "meta.json").read_text())
    assert meta["stage"] == 1
    run_tiny(tmp_path / "crash", over)
    assert _adapter(tmp_path / "crash") == _adapter(tmp_path / "ref")
    assert (tmp_path / "crash" / "scores.csv").read_text() == (tmp_path / "ref" / "scores.csv").read_text()
    # the logs hold each step once, with the same numbers
    keys = ["step", "train/loss", "train/stage"]
    ref_rows = [r for r in _log_rows(tmp_path / "ref" / "train_log.jsonl", keys) if r["train/loss"] is not None]
    new_rows = [r for r in _log_rows(tmp_path / "crash" / "train_log.jsonl", keys) if r["train/loss"] is not None]
    assert new_rows == ref_rows
    # the resumed stage reports its whole cost and losses, not the part after the restart
    timing = [json.loads((tmp_path / d / "metrics.json").read_text())["timing"]
              for d in ("ref", "crash")]
    for stage, ref_t in timing[0].items():
        got = timing[1][stage]
        assert [got[k] for k in ("train_tokens", "first_loss", "last_loss")] == \
            [ref_t[k] for k in ("train_tokens", "first_loss", "last_loss")], stage
    if method != "lora":
        keys = ["regroup", "step", "stage", "mean_objective_after", "mean_moved"]
        assert _log_rows(tmp_path / "crash" / "dog_log.jsonl", keys) == \
            _log_rows(tmp_path / "ref" / "dog_log.jsonl", keys)


def test_corrupted_checkpoint_is_reported(tmp_path, monkeypatch):
    over = tiny_overrides(tmp_path, extra=SEQ)
    orig = runner_mod.Runner.evaluate

    def crash(self, model, method, i, stage, final, **kw):
        raise Crash()

    monkeypatch.setattr(runner_mod.Runner, "evaluate", crash)
    with pytest.raises(Crash):
        run_tiny(tmp_path / "r", over)
    monkeypatch.setattr(runner_mod.Runner, "evaluate", orig)
    f = tmp_path / "r" / "checkpoints" / "in_stage" / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:-7] + b"garbage")
    with pytest.raises(CheckpointError, match="corrupted"):
        run_tiny(tmp_path / "r", over)


def test_resume_refuses_a_different_config(tmp_path):
    run_tiny(tmp_path / "r", tiny_overrides(tmp_path, extra=["trainer.epochs=1"]))
    with pytest.raises(ConfigError, match="trainer.lr"):
        run_tiny(tmp_path / "r", tiny_overrides(tmp_path, extra=["trainer.epochs=1", "trainer.lr=1e-3"]))
