"""Run logging: the jsonl file always, wandb (offline by default) or tensorboard on one switch."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest

from badit_exp.compose import validate
from badit_exp.config import ConfigError
from badit_exp.training.logger import RunLogger
from conftest import compose_cfg


def test_logger_switch_composes():
    cfg = validate(compose_cfg(["logger=wandb"]))
    assert (cfg.logger.name, cfg.logger.project, cfg.logger.mode) == ("wandb", "badit_exp", "offline")
    if importlib.util.find_spec("tensorboard") is not None:
        assert validate(compose_cfg(["logger=tensorboard"])).logger.name == "tensorboard"


def test_tensorboard_missing_is_one_line_before_any_work(monkeypatch):
    """Without the package, validation stops the run with the install command."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[tensorboard\]'"):
        validate(compose_cfg(["logger=tensorboard"]))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None,
                    reason="tensorboard is installed")
def test_tensorboard_missing_on_the_cli_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "badit_exp.train", "logger=tensorboard",
                           "model=tiny-llama", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "pip install -e '.[tensorboard]'" in proc.stderr + proc.stdout
    assert not (tmp_path / "train_log.jsonl").exists()


def test_wandb_gets_names_config_and_numeric_values(tmp_path, monkeypatch):
    calls = {"log": []}

    class Run:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finished"] = True

    def init(**kw):
        calls["init"] = kw
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    lg = RunLogger(tmp_path, "wandb", "proj", "qwen3-8b-badit-mixed-seed1", "offline", {"seed": 1})
    lg.log({"train/loss": 1.5, "train/stage": "mixed"}, step=3)
    lg.log({"eval/t/rougeL": 40.0}, step=5)
    lg.close()
    assert calls["init"]["project"] == "proj" and calls["init"]["name"] == "qwen3-8b-badit-mixed-seed1"
    assert calls["init"]["mode"] == "offline" and calls["init"]["config"] == {"seed": 1}
    assert calls["log"] == [(3, {"train/loss": 1.5}), (5, {"eval/t/rougeL": 40.0})]
    assert calls["finished"]
    rows = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 3, "train/loss": 1.5, "train/stage": "mixed"}


def test_wandb_offline_for_real(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    lg = RunLogger(tmp_path, "wandb", "badit_exp", "r", "offline", {"seed": 1})
    lg.log({"train/loss": 1.0}, step=1)
    lg.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))


def test_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    lg = RunLogger(tmp_path, "tensorboard")
    lg.log({"train/loss": 1.0}, step=1)
    lg.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_other_ranks_log_nothing(tmp_path):
    lg = RunLogger(tmp_path, "wandb", enabled=False)  # never touches wandb
    lg.log({"train/loss": 1.0}, step=1)
    lg.close()
    assert not (tmp_path / "train_log.jsonl").exists()


def test_eval_rows_carry_the_training_step(tmp_path, superni):
    """Evaluation is logged at the global step it follows (wandb drops steps that go back)."""
    from conftest import run_tiny, tiny_overrides

    run_tiny(tmp_path / "r", tiny_overrides(tmp_path, extra=["trainer.epochs=1"]))
    rows = [json.loads(x) for x in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    eval_steps = {r["step"] for r in rows if any(k.startswith("eval/") for k in r)}
    assert eval_steps == {max(train_steps)}
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps)
