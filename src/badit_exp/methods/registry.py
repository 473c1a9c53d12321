"""Registry of adapter methods: one module plus one YAML per method.

A method module defines a config dataclass (subclass of :class:`MethodConfig`) and a
:class:`Method` subclass, and registers them under a *kind* with :func:`register`. Its YAML in
``conf/method/`` starts with ``defaults: [schema_<kind>, _self_]`` so Hydra validates it against
the dataclass. Several YAMLs may share one kind (e.g. ablations with other settings).

This module imports no method: ``badit_exp/methods/__init__.py`` imports every method module
(which registers itself here), so the registry is full as soon as the package is imported.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

from hydra.core.config_store import ConfigStore

_REGISTRY: Dict[str, Tuple[type, type]] = {}


def register(kind: str, config_cls: type) -> Callable[[type], type]:
    """Class decorator: register ``cls`` as the implementation of ``kind``."""

    def deco(cls: type) -> type:
        if kind in _REGISTRY and _REGISTRY[kind][1] is not cls:
            raise ValueError(f"method kind {kind!r} is registered twice "
                             f"({_REGISTRY[kind][1].__name__} and {cls.__name__})")
        _REGISTRY[kind] = (config_cls, cls)
        cls.kind = kind
        return cls

    return deco


def kinds() -> list:
    return sorted(_REGISTRY)


def get(kind: str) -> Tuple[type, type]:
    """(config dataclass, method class) of ``kind``; a clear error for an unknown one."""
    if kind not in _REGISTRY:
        raise KeyError(f"method.kind={kind!r} is not registered; known kinds: {sorted(_REGISTRY)}. "
                       "A new method's module must be imported in "
                       "badit_exp/methods/__init__.py.")
    return _REGISTRY[kind]


def store_schemas() -> None:
    """Store every method's schema as ``method/schema_<kind>`` in Hydra's ConfigStore."""
    cs = ConfigStore.instance()
    for kind, (config_cls, _) in _REGISTRY.items():
        cs.store(group="method", name=f"schema_{kind}", node=config_cls)


def build(cfg) -> "object":
    """Instantiate the method object from its typed config."""
    _, cls = get(cfg.kind)
    return cls(cfg)
