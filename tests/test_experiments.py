"""Every experiment file (conf/experiment/*.yaml, what the Makefile's tables run) is tested: each
point of its sweep composes and validates, and (slow) the whole sweep runs at ``scale=tiny``."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from badit_exp.compose import CONF_DIR, compose, validate
from conftest import CACHE, REPO, SUPERNI

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
TINY = ["model=tiny-llama", "scale=tiny"]
# settings of an experiment that only a GPU has, replaced on CPU
CPU_SAFE = {"paper_8gpu": ["model.attn_implementation=sdpa", "trainer.precision=fp32"],
            "one_gpu_paper_batch": ["trainer.precision=fp32"],
            # scale=tiny keeps no hold-out; the study's rate comes from its committed choices
            # file, which a fresh clone may not hold yet for every method (tests/test_tuning.py
            # checks the resolver)
            "tune_cpu": ["data.holdout_per_task=2", "data.max_eval_per_task=2"],
            "study2_cpu": ["trainer.lr=1e-3"]}


def sweep_points(name: str, extra=(), all_seeds: bool = True):
    """The override lists of every job of ``experiment=name``'s sweep (one if it has none);
    ``all_seeds=False`` keeps the first seed (the seed changes no composition)."""
    base = [f"experiment={name}", *TINY, *CPU_SAFE.get(name, []), *extra]
    cfg = compose(base, return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    params = OmegaConf.to_container(params) if params else {}
    given = {o.split("=", 1)[0] for o in base}  # a key given on the command line is not swept
    params = {k: v for k, v in params.items() if k not in given}
    if not all_seeds and "seed" in params:
        params["seed"] = str(params["seed"]).split(",")[0]
    keys = sorted(params)
    values = [str(params[k]).split(",") for k in keys]
    return base, [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*values)]


def covering(points):
    """A subset of a sweep's points in which every value of every swept key appears at least
    once (the full product is the slow test's): composing each value is what can fail; a
    product of two valid values rarely fails where each alone composes."""
    seen, keep = set(), []
    for p in points:
        if not p or any(o not in seen for o in p):
            keep.append(p)
            seen.update(p)
    return keep


def test_the_makefile_targets_have_experiment_files():
    assert {"table1", "table2", "table_mixtures", "table_interference", "table_rankwise", "fig4",
            "fig12", "study_cpu", "tune_cpu", "study2_cpu"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["every_value", "full_product"])
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_sweep_point_composes_and_validates(name, full):
    base, points = sweep_points(name, all_seeds=False)
    assert points
    if not full:
        points = covering(points)
        assert {o for p in points for o in p} == {o for p in sweep_points(name, all_seeds=False)[1]
                                                   for o in p}
    for point in points:
        cfg = validate(compose([*base, *point]))
        assert cfg.scale.name == "tiny" and cfg.model.name == "tiny-llama"
        for o in point:
            key, value = o.split("=", 1)
            node = OmegaConf.select(OmegaConf.structured(cfg), key)
            got = node if not hasattr(node, "name") or key == "seed" else node.name
            if isinstance(got, float):  # 1e-4 on the command line, 0.0001 in the config
                assert got == float(value), (name, o, got)
            else:
                assert str(got) == value, (name, o, got)


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_runs_at_tiny_scale(tmp_path, name):
    """The sweep as the Makefile starts it (one seed), every job to its metrics.json."""
    extra = ["seed=1", "data.max_new_tokens=4", f"data.root={SUPERNI}",
             f"paths.cache_dir={CACHE}", f"paths.output_dir={tmp_path}",
             f"hydra.sweep.dir={tmp_path}/sweep"]
    base, points = sweep_points(name, ["seed=1"])
    proc = subprocess.run([sys.executable, "-m", "badit_exp.train", "-m", *base, *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(p.read_text()) for p in (tmp_path / "sweep").rglob("metrics.json")]
    assert len(metrics) == len(points)
    assert all(m["scale"] == "tiny" and m["rouge"] is not None for m in metrics)
