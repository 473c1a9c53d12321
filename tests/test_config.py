"""Every model x method x training_mode composes and validates; bad values fail clearly."""


from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from badit_exp.compose import CONF_DIR, validate
from badit_exp.config import ConfigError
from conftest import REPO, compose_cfg, slow_unless

MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
MODES = sorted(p.stem for p in (REPO / "conf" / "training_mode").glob("*.yaml"))
# methods whose YAML is another paper's released recipe (METHODS_NEXT.md), not SPEC's budget
RELEASED_RECIPES = {"mola", "mixlora", "mixlora_k8", "mtl_lora", "lori", "mtlora", "mtlora_k8",
                    "lora_r32", "lori_k8", "mtl_lora_k8", "pissa_r32", "flylora", "flylora_k8",
                    "smora", "smora_k8"}
ORDERS = sorted(p.stem for p in (REPO / "conf" / "task_order").glob("*.yaml"))


def test_groups_present():
    assert {"qwen3-8b", "qwen3-4b", "llama3-8b", "llama3-3b", "gemma2-9b", "gemma2-2b",
            "smollm2-135m", "tiny-llama", "tiny-qwen3", "tiny-gemma2"} <= set(MODELS)
    assert {"lora", "pissa", "olora"} <= set(METHODS)
    assert {"mixed", "sequential", "single"} <= set(MODES)
    assert {f"order{i}" for i in range(1, 6)} | {"random"} <= set(ORDERS)


def _check(cfg, model, method, mode):
    assert cfg.model.name == model and cfg.method.name == method
    assert cfg.training_mode.name == mode
    if method not in RELEASED_RECIPES:  # SPEC section 4's adapter budget
        assert cfg.method.rank == 4 and cfg.method.alpha == 32
        assert "gate_proj" in cfg.method.target_modules


@pytest.mark.parametrize("model,method", [
    slow_unless(model == "tiny-llama" or method == "lora", model, method)
    for method in METHODS for model in MODELS])
def test_every_model_and_method_compose(model, method):
    """model x method (the optional method_model/preset files depend on both)."""
    cfg = validate(compose_cfg([f"model={model}", f"method={method}"]))
    _check(cfg, model, method, "mixed")


@pytest.mark.parametrize("method,mode", [
    slow_unless(mode == "sequential" or method in ("lora", "badit"), method, mode)
    for mode in MODES for method in METHODS])
def test_every_method_and_mode_compose(method, mode):
    cfg = validate(compose_cfg([f"method={method}", f"training_mode={mode}"]))
    _check(cfg, "smollm2-135m", method, mode)


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


# ---------------------------------------------------------------------- one source per default
def _schema_for(path):
    """The dataclass whose defaults a conf YAML overrides (None: a YAML inheriting another)."""
    import badit_exp.config as C
    from badit_exp.methods import registry

    group = path.parent.name
    if group == "method":
        raw = OmegaConf.load(path)
        schema = [d for d in raw.get("defaults", []) if isinstance(d, str) and d.startswith("schema_")]
        return registry.get(schema[0][len("schema_"):])[0] if schema else None
    return {"trainer": C.TrainerConfig, "distributed": C.DistributedConfig,
            "logger": C.LoggerConfig, "paths": C.PathsConfig, "model": C.ModelConfig,
            "training_mode": C.TrainingModeConfig}.get(group)


def _leaves(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


CONF_FILES = sorted(p for g in ("method", "trainer", "distributed", "logger", "paths", "model",
                                "training_mode") for p in (Path(CONF_DIR) / g).glob("*.yaml"))


@pytest.mark.parametrize("path", CONF_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_yaml_states_only_what_differs_from_its_schema(path):
    """Each default has one home, the schema dataclass: a YAML restating one would let the two
    drift apart silently."""
    cls = _schema_for(path)
    if cls is None:
        return
    defaults = _leaves(OmegaConf.to_container(OmegaConf.structured(cls), throw_on_missing=False))
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    raw.pop("defaults", None)
    same = [k for k, v in _leaves(raw).items()
            if k not in ("name", "kind") and k in defaults and defaults[k] == v]
    assert not same, f"{path.name} restates its schema's defaults: {same}"


@pytest.mark.parametrize("override,key", [("+trainer.lerning_rate=1", "trainer.lerning_rate"),
                                          ("+method.rnak=2", "method.rnak"),
                                          ("+data.max_trian_per_task=2", "data.max_trian_per_task")])
def test_keys_added_with_plus_are_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_cfg([override]))


def test_a_plus_key_is_rejected_on_the_command_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "badit_exp.train", "+trainer.lerning_rate=1",
                           f"hydra.run.dir={tmp_path}/r"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "trainer.lerning_rate is not a config key" in proc.stderr + proc.stdout
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_an_unreachable_hub_model_is_one_line_naming_hub_id(monkeypatch):
    from transformers import AutoTokenizer

    from badit_exp.models import load_tokenizer

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", offline)
    cfg = validate(compose_cfg(["model=qwen3-8b"]))
    with pytest.raises(ConfigError) as e:
        load_tokenizer(cfg.model, Path("/nonexistent"))
    msg = str(e.value)
    assert "model.hub_id='Qwen/Qwen3-8B'" in msg and "local copy" in msg and "\n" not in msg


def test_a_method_registered_after_the_first_composition_gets_its_schema(monkeypatch):
    """register_configs skips the ConfigStore when nothing changed (a fifth of a composition);
    a method registered later (a plugin, a notebook) must still get its schema stored."""
    import dataclasses

    from hydra.core.config_store import ConfigStore

    from badit_exp.compose import register_configs
    from badit_exp.methods import registry
    from badit_exp.methods.base import MethodConfig

    compose_cfg(["scale=tiny"])  # the store is current

    @dataclasses.dataclass
    class LateConfig(MethodConfig):
        late_knob: int = 3

    monkeypatch.setitem(registry._REGISTRY, "zz_late", (LateConfig, type("Late", (), {})))
    group = ConfigStore.instance().repo["method"]
    assert "schema_zz_late.yaml" not in group
    register_configs()
    node = ConfigStore.instance().repo["method"]["schema_zz_late.yaml"].node
    assert node.late_knob == 3
    register_configs()  # unchanged: stored once, still there
    assert "schema_zz_late.yaml" in ConfigStore.instance().repo["method"]
