"""Composition: where ``conf/`` is, the schemas in Hydra's ConfigStore, and validation.

The one place that knows the config directory (:data:`CONF_DIR`, overridable with the
``BADIT_CONF_DIR`` environment variable for an installed copy of the package) and that joins the
typed schemas of :mod:`badit_exp.config` with the methods' own schemas from the registry.
Entry points (train, analyze), tests and benchmarks compose through here.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any, Iterator, List, Sequence, Tuple

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from badit_exp.config import AnalyzeConfig, Config, ConfigError
from badit_exp.methods import registry
from badit_exp.tuning import tuned_lr

CONF_DIR = str(Path(os.environ.get("BADIT_CONF_DIR",
                                   Path(__file__).resolve().parents[2] / "conf")).resolve())


# what register_configs last stored: (the ConfigStore, each registered kind with its schema)
_STORED: Tuple[Any, Tuple[Any, ...]] = (None, ())


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent; the store itself runs only when the
    ConfigStore or the set of registered methods changed, since converting every schema costs
    ~0.2 s, a fifth of a composition)."""
    global _STORED
    # "" on rank 0 / single process, ".rank<N>" otherwise: per-process Hydra log files
    OmegaConf.register_new_resolver(
        "badit_rank_suffix", lambda: "" if int(os.environ.get("RANK", "0")) == 0
        else f".rank{os.environ['RANK']}", replace=True)
    # a study's tuned learning rate from its committed choices file (badit_exp.tuning)
    OmegaConf.register_new_resolver(
        "badit_tuned_lr", lambda path, method, mode: tuned_lr(path, method, mode,
                                                              root=str(Path(CONF_DIR).parent)),
        replace=True)
    cs = ConfigStore.instance()
    key = (cs, tuple((k, registry.get(k)[0]) for k in registry.kinds()))
    if _STORED[0] is key[0] and _STORED[1] == key[1]:
        return
    cs.store(name="config_schema", node=Config)
    cs.store(name="analyze_schema", node=AnalyzeConfig)
    registry.store_schemas()
    _STORED = key


def unknown_keys(node: Any, prefix: str = "") -> Iterator[Tuple[str, List[str]]]:
    """(dotted key, the schema's keys at that level) for every key that no schema declares.

    Hydra's struct mode rejects a misspelt ``key=value`` override, but ``+key=value`` adds the
    key on purpose, and ``OmegaConf.to_object`` then drops it silently: this finds such keys
    (free-form dict fields, e.g. ``model.tiny``, are not checked)."""
    if not isinstance(node, DictConfig):
        return
    typ = OmegaConf.get_type(node)
    names = [f.name for f in dataclasses.fields(typ)] if dataclasses.is_dataclass(typ) else None
    for key in node.keys():
        if names is not None and key not in names:
            yield f"{prefix}{key}", names
        elif names is not None:
            yield from unknown_keys(node._get_node(key), f"{prefix}{key}.")


def validate(cfg: DictConfig) -> Config:
    """Build the typed config (runs every ``__post_init__``); raise ConfigError on a bad value.

    Args:
        cfg: a composed ``config`` (``conf/config.yaml`` with overrides).

    Returns:
        The typed :class:`badit_exp.config.Config`, ``method`` typed by its method's schema.
    """
    for key, known in unknown_keys(cfg):
        leaf = key.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(leaf, known, n=1)
        hint = f"did you mean {key.rsplit('.', 1)[0]}.{close[0]}? " if close and "." in key \
            else (f"did you mean {close[0]}? " if close else "")
        raise ConfigError(f"{key} is not a config key ({hint}no schema declares it); remove it "
                          "or fix its spelling (`python -m badit_exp.train --cfg job` shows the "
                          "keys).")
    obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    if isinstance(obj.method, dict):
        raise ConfigError("method config has no schema: its YAML must start with "
                          "`defaults: [schema_<kind>, _self_]`.")
    registry.get(obj.method.kind)  # unknown kind -> clear error
    return obj


def compose(overrides: Sequence[str] = (), config_name: str = "config",
            return_hydra_config: bool = False) -> DictConfig:
    """``conf/<config_name>.yaml`` composed with ``overrides`` (outside a Hydra app: tests,
    notebooks, benchmarks); :func:`validate` then rejects keys no schema knows.

    Args:
        overrides: Hydra overrides, e.g. ``["method=badit", "scale=tiny"]``.
        config_name: the primary config (``config`` for training, ``analyze``).
        return_hydra_config: keep the ``hydra`` node (sweeper params, run dirs).
    """
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides),
                             return_hydra_config=return_hydra_config)


def load(overrides: Sequence[str] = ()) -> Config:
    """:func:`compose` then :func:`validate`."""
    return validate(compose(overrides))


__all__: List[str] = ["CONF_DIR", "register_configs", "validate", "compose", "load"]
