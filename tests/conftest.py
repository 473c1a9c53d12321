"""Shared fixtures: the SuperNI folder, composed configs, tiny end-to-end runs."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
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


def _keep_large_blocks_in_the_heap() -> None:
    """glibc serves every block above 32 MB with its own mmap and unmaps it on free. A tiny
    model's logits (2 x 256 x SmolLM2's 49152-token vocabulary, 100 MB) are such blocks, so each
    forward and backward faulted fresh pages in: a third of a tiny run's time was system time
    (3.6 s of 10.3 s, 1.4 M page faults; with this, 0.0 s and 3 k faults). No effect on any
    number: only where freed memory goes. This process via mallopt, its subprocesses (CLI and
    two-process runs) via glibc's environment variables."""
    if not sys.platform.startswith("linux"):
        return
    os.environ.setdefault("MALLOC_MMAP_MAX_", "0")
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(4 << 30))
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD (an int: 1 GB)
    except (OSError, AttributeError):  # not glibc (musl): nothing to tune
        pass


_keep_large_blocks_in_the_heap()
# one torch thread per pytest-xdist worker (`make test` runs two on 2 cores), else up to 2
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else
                      min(2, torch.get_num_threads()))
SLOW = pytest.mark.slow


def slow_unless(fast: bool, *values):
    """A parametrize case that runs in the fast suite when ``fast``, else only with --runslow
    (the heavier duplicates: the same code path at another size or architecture)."""
    return pytest.param(*values, marks=() if fast else SLOW)


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


@pytest.fixture
def stage_states(monkeypatch):
    """{stage index: the method's state_dict at that stage's checkpoint}, filled as a run goes."""
    from badit_exp.training import runner as runner_mod

    states = {}
    orig = runner_mod.Runner.checkpoint_stage

    def spy(self, model, method, i):
        states[i] = {k: v.clone() for k, v in method.state_dict(model).items()}
        return orig(self, model, method, i)

    monkeypatch.setattr(runner_mod.Runner, "checkpoint_stage", spy)
    return states


def run_cli(run_dir: Path, method: str, extra=(), tasks=TASKS3):
    """The issues' check command (`python -m badit_exp.train model=tiny-llama method=<m>
    data.max_train_per_task=8 data.max_eval_per_task=4 ...`) as a subprocess; its metrics."""
    import json
    import subprocess
    import sys

    over = ["model=tiny-llama", f"method={method}", "data.max_train_per_task=8",
            "data.max_eval_per_task=4", f"data.root={SUPERNI}", f"paths.cache_dir={CACHE}",
            f"data.tasks=[{','.join(tasks)}]", "data.max_new_tokens=4", "trainer.epochs=1",
            *extra, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-m", "badit_exp.train", *over], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((Path(run_dir) / "metrics.json").read_text())
