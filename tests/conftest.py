"""Shared fixtures: the SuperNI folder, composed configs, tiny end-to-end runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List

import pytest
import torch

from badit_exp.compose import CONF_DIR, compose, register_configs, validate  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SUPERNI = Path(os.environ.get("SUPERNI_ROOT", REPO.parent / "shared" / "data" / "superni")).resolve()
CACHE = Path(os.environ.get("BADIT_CACHE_DIR", REPO / ".cache" / "badit_exp")).resolve()

# three short tasks for quick runs
TASKS3 = ["task363_sst2_polarity_classification", "task875_emotion_classification",
          "task073_commonsenseqa_answer_generation"]

register_configs()
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
    for it in items:
        if "gpu" in it.keywords and not torch.cuda.is_available():
            it.add_marker(skip_gpu)
        if "slow" in it.keywords and not config.getoption("--runslow"):
            it.add_marker(skip_slow)


@pytest.fixture(scope="session")
def superni() -> Path:
    if not SUPERNI.is_dir():
        pytest.skip(f"SuperNI data not found at {SUPERNI} (set SUPERNI_ROOT)")
    return SUPERNI


def compose_cfg(overrides: List[str]):
    return compose(overrides)


def tiny_overrides(run_root: Path, tasks=TASKS3, extra=()) -> List[str]:
    """A fast run: tiny-llama at ``scale=tiny`` (conf/scale/tiny.yaml), on ``tasks``."""
    return ["model=tiny-llama", "scale=tiny", f"data.root={SUPERNI}",
            f"data.tasks=[{','.join(tasks)}]", f"paths.output_dir={run_root}",
            f"paths.cache_dir={CACHE}", *extra]


def run_tiny(run_dir: Path, overrides: List[str]):
    """Compose, validate and run in-process; returns the metrics dict."""
    from badit_exp.training.runner import Runner

    cfg = compose_cfg(overrides)
    return Runner(validate(cfg), run_dir).run()
