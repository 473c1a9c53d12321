"""Every model x method x training_mode composes and validates; bad values fail clearly."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from badit_exp.config import ConfigError, validate
from conftest import REPO, compose_cfg

MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
MODES = sorted(p.stem for p in (REPO / "conf" / "training_mode").glob("*.yaml"))
ORDERS = sorted(p.stem for p in (REPO / "conf" / "task_order").glob("*.yaml"))


def test_groups_present():
    assert {"qwen3-8b", "qwen3-4b", "llama3-8b", "llama3-3b", "gemma2-9b", "gemma2-2b",
            "smollm2-135m", "tiny-llama", "tiny-qwen3", "tiny-gemma2"} <= set(MODELS)
    assert {"lora", "pissa", "olora"} <= set(METHODS)
    assert {"mixed", "sequential", "single"} <= set(MODES)
    assert {f"order{i}" for i in range(1, 6)} | {"random"} <= set(ORDERS)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", MODES)
def test_grid_composes(model, method, mode):
    cfg = validate(compose_cfg([f"model={model}", f"method={method}", f"training_mode={mode}"]))
    assert cfg.model.name == model and cfg.method.name == method
    assert cfg.training_mode.name == mode
    assert cfg.method.rank == 4 and cfg.method.alpha == 32 and "gate_proj" in cfg.method.target_modules


@pytest.mark.parametrize("order", ORDERS)
def test_task_orders_compose(order):
    cfg = validate(compose_cfg([f"task_order={order}"]))
    assert cfg.task_order.name == order


def test_paper_defaults_on_hub_models():
    cfg = validate(compose_cfg(["model=qwen3-8b", "method=lora"]))
    assert cfg.model.hub_id == "Qwen/Qwen3-8B"
    assert (cfg.data.max_train_per_task, cfg.data.max_eval_per_task) == (1000, 100)
    assert (cfg.data.max_seq_len, cfg.data.max_new_tokens) == (1024, 50)
    t = cfg.trainer
    assert (t.epochs, t.lr, t.lr_scheduler, t.warmup_ratio, t.weight_decay) == (10, 2e-4, "cosine", 0.03, 0.0)
    assert (t.per_device_batch_size, t.grad_accum_steps) == (1, 1)


def test_cpu_default_is_small():
    cfg = validate(compose_cfg([]))
    assert cfg.model.name == "smollm2-135m" and cfg.training_mode.name == "mixed"
    assert cfg.data.max_train_per_task <= 16 and cfg.trainer.epochs == 1
    # the command line still wins over the preset
    cfg = validate(compose_cfg(["data.max_train_per_task=1000"]))
    assert cfg.data.max_train_per_task == 1000


@pytest.mark.parametrize("override", ["trainer.bogus=1", "data.nope=2", "method.rankk=4"])
def test_unknown_keys_rejected(override):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_cfg([override])


@pytest.mark.parametrize("override", ["trainer.epochs=ten", "method.rank=abc"])
def test_wrong_types_rejected(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_cfg([override])


@pytest.mark.parametrize("override,needle", [
    ("trainer.lr=-1", "trainer.lr"),
    ("method.init=bogus", "method.init"),
    ("method.rank=0", "method.rank"),
    ("model.attn_implementation=magic", "model.attn_implementation"),
    ("trainer.lr_scheduler=step", "trainer.lr_scheduler"),
    ("data.max_seq_len=40", "data.max_seq_len"),
    ("data.tasks=[a,a]", "data.tasks"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate(compose_cfg([override]))


def test_every_experiment_composes():
    for p in sorted((REPO / "conf" / "experiment").glob("*.yaml")):
        validate(compose_cfg([f"experiment={p.stem}"]))
