"""Entry point: ``python -m badit_exp.train [overrides]``.

Composes the Hydra config (``conf/config.yaml``), validates it against the typed schemas,
then hands over to :class:`badit_exp.training.runner.Runner`. Examples::

    python -m badit_exp.train                                  # SmolLM2, mixed, small caps (CPU)
    python -m badit_exp.train method=pissa model=qwen3-8b       # the paper's setting on a GPU
    python -m badit_exp.train training_mode=sequential seed=2   # task order 2
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import InterpolationResolutionError

from badit_exp.compose import CONF_DIR, register_configs, validate
from badit_exp.config import ConfigError
from badit_exp.data.superni import DataError
from badit_exp.metrics import METRIC_NAMES
from badit_exp.training.checkpoint import CheckpointError

log = logging.getLogger("badit_exp")

register_configs()


def print_table(result: dict) -> None:
    """Per-task score table and the summary metrics, to stdout."""
    tasks = result["tasks"]
    w = max(len(t) for t in tasks)
    print(f"\n{'task':<{w}}  {'rougeL':>7}  {'exact_match':>11}")
    for t in tasks:
        s = result["scores"][t]
        print(f"{t:<{w}}  {s['rougeL']:7.2f}  {s['exact_match']:11.2f}")
    keys = METRIC_NAMES
    print("  ".join(f"{k}={result[k]:.2f}" if result.get(k) is not None else f"{k}=n/a"
                    for k in keys if k in result))
    if result.get("forward_missing_reason"):
        print(f"forward: {result['forward_missing_reason']}")


def run(cfg: DictConfig, run_dir: Path) -> dict:
    typed = validate(cfg)
    # imported once the config is valid: the runner pulls in transformers and peft (several
    # seconds on a small machine), which a mistyped override should not wait for
    from badit_exp.training.runner import Runner

    return Runner(typed, run_dir).run()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = run(cfg, run_dir)
    except (ConfigError, DataError, CheckpointError) as e:
        log.error("%s: %s", type(e).__name__, e)
        sys.exit(2)
    except InterpolationResolutionError as e:  # a resolver's ConfigError (a tuned rate missing)
        if "ConfigError raised while resolving" not in str(e):
            raise
        log.error("ConfigError: %s", str(e).split("interpolation: ", 1)[-1].splitlines()[0])
        sys.exit(2)
    if result is None:  # a rank other than 0 of a data-parallel run: rank 0 reports
        return 0.0
    print_table(result)
    print(f"\nresults: {run_dir}  (metrics.json, scores.csv, predictions/)")
    return float(result["rouge"])


if __name__ == "__main__":
    main()
