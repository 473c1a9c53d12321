"""End-to-end mixed runs on a tiny model: files, numbers, determinism, the CLI."""

import json
import subprocess
import sys

import pytest

from conftest import CACHE, REPO, SUPERNI, TASKS3, run_tiny, tiny_overrides


def _check_run_files(run_dir, tasks):
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["tasks"] == list(tasks) and set(m["scores"]) == set(tasks)
    for t in tasks:
        assert set(m["scores"][t]) == {"rougeL", "exact_match", "loss"}
        assert m["scores"][t]["loss"] > 0  # teacher-forced target loss on the evaluated split
        rows = [json.loads(l) for l in (run_dir / "predictions" / f"{t}.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and {"id", "prediction", "references", "rougeL", "exact_match"} <= set(rows[0])
    assert m["rouge"] == pytest.approx(sum(m["scores"][t]["rougeL"] for t in tasks) / len(tasks))
    prov = m["provenance"]
    assert {"git_commit", "git_dirty", "packages", "device"} <= set(prov)
    assert prov["packages"]["torch"]
    if prov["device"]["type"] == "cpu":  # which CPU and kernels: floats differ between them
        assert prov["device"]["isa"] and "model" in prov["device"]
    assert (run_dir / "config.yaml").exists() and (run_dir / "scores.csv").exists()
    assert (run_dir / "scores.png").stat().st_size > 1000
    assert (run_dir / "adapter" / "adapter.safetensors").exists()
    log = [json.loads(l) for l in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in log)
    return m


@pytest.mark.parametrize("method", ["lora", "pissa", "olora"])
def test_mixed_run_each_method(tmp_path, method):
    m = run_tiny(tmp_path / "run", tiny_overrides(tmp_path, extra=[f"method={method}", "trainer.epochs=3"]))
    _check_run_files(tmp_path / "run", TASKS3)
    t = m["timing"]["mixed"]
    assert t["last_loss"] < t["first_loss"], "training loss did not go down"
    assert m["forward"] is None and m["forward_missing_reason"]


def test_same_seed_same_numbers(tmp_path):
    a = run_tiny(tmp_path / "a", tiny_overrides(tmp_path))
    b = run_tiny(tmp_path / "b", tiny_overrides(tmp_path))
    assert a["timing"]["mixed"]["last_loss"] == b["timing"]["mixed"]["last_loss"]
    la = (tmp_path / "a" / "adapter" / "adapter.safetensors").read_bytes()
    assert la == (tmp_path / "b" / "adapter" / "adapter.safetensors").read_bytes()
    # a finished run started again reports its results and logs nothing new
    log = (tmp_path / "a" / "train_log.jsonl").read_text()
    assert sum('"cl/rouge"' in line for line in log.splitlines()) == 1
    again = run_tiny(tmp_path / "a", tiny_overrides(tmp_path))
    assert (tmp_path / "a" / "train_log.jsonl").read_text() == log
    assert again["rouge"] == a["rouge"] and again["scores"] == a["scores"]


def test_other_benchmark_root(tmp_path):
    root = tmp_path / "bench"
    for name in ("taskA_echo", "taskB_upper"):
        for split, ids in (("train", range(6)), ("test", range(6, 12))):  # disjoint splits
            inst = [{"id": f"{name}-{i}", "input": f"word{i}",
                     "output": [f"word{i}".upper() if "upper" in name else f"word{i}"]} for i in ids]
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / name / f"{split}.json").write_text(json.dumps(
                {"Definition": [f"Do {name}."], "Instances": inst}))
    over = tiny_overrides(tmp_path, tasks=["taskA_echo", "taskB_upper"])
    over = [o for o in over if not o.startswith("data.root")] + [f"data.root={root}"]
    run_tiny(tmp_path / "run", over)
    _check_run_files(tmp_path / "run", ["taskA_echo", "taskB_upper"])


def test_bad_task_is_clear(tmp_path):
    """(The CLI maps DataError to one line and exit 2: tests/test_logger.py, test_tuning.py.)"""
    from badit_exp.data import DataError

    with pytest.raises(DataError, match="unknown task 'task999_nothing'"):
        run_tiny(tmp_path / "r", tiny_overrides(tmp_path, tasks=["task999_nothing"]))


def test_cli_end_to_end(tmp_path):
    """The issue's check command, shortened: writes the files of a run and prints a table."""
    out = subprocess.run([sys.executable, "-m", "badit_exp.train", "model=tiny-llama", "method=lora",
                          f"data.root={SUPERNI}", f"data.tasks=[{','.join(TASKS3[:2])}]",
                          "data.max_train_per_task=4", "data.max_eval_per_task=2",
                          "data.max_new_tokens=4", "trainer.epochs=1",
                          f"paths.cache_dir={CACHE}", f"hydra.run.dir={tmp_path}/r"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rouge=" in out.stdout and f"results: {tmp_path}/r" in out.stdout
    _check_run_files(tmp_path / "r", TASKS3[:2])


def test_step0_loss_is_recorded_and_a_far_start_is_warned(tmp_path, monkeypatch, caplog):
    import logging

    from badit_exp.training import runner as runner_mod

    losses = iter([1.0, 2.0, 1.5])  # pre-trained, step 0, after training
    monkeypatch.setattr(runner_mod.Runner, "target_loss", lambda self, model, method=None: next(losses))
    with caplog.at_level(logging.WARNING, logger="badit_exp.training.runner"):
        m = run_tiny(tmp_path / "r", tiny_overrides(tmp_path, extra=[
            "trainer.epochs=1", "trainer.step0_examples=16"]))
    assert m["target_loss"] == {"pretrained": 1.0, "step0": 2.0, "final": 1.5,
                                "examples": 12}  # 3 tasks x 4 examples < 16
    assert "starts 100% above the pre-trained model's target loss" in caplog.text
