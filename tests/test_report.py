"""`python -m badit_exp.report`: grouping, mean/std by hand, never averaging different configs;
Hydra multirun sweeps over seeds."""

import json
import subprocess
import sys

import pytest

from badit_exp import report
from badit_exp.compose import validate
from conftest import CACHE, REPO, SUPERNI, TASKS3, compose_cfg


def _fake(tmp, name, seed, rouge, forget, cfg_extra=None, model="qwen3-8b", mode="sequential",
          method="badit"):
    cfg = {"data": {"max_train_per_task": 1000, "max_eval_per_task": 100, "max_seq_len": 1024,
                    "max_new_tokens": 50, "tasks": [f"t{i}" for i in range(15)]},
           "trainer": {"epochs": 10, "per_device_batch_size": 1, "lr": 2e-4}, "seed": seed,
           "run_name": name, "scale": {"name": "paper"},
           "method": {"name": method}, "task_order": {"name": f"order{seed}"}}
    if cfg_extra:
        cfg["trainer"].update(cfg_extra)
    m = {"mode": mode, "model": model, "method": method, "seed": seed, "config": cfg,
         "rouge": rouge, "forward": None, "forget_rate": forget, "backward": -1.0,
         "forget_rate_textbook": 1.0, "backward_textbook": -2.0}
    d = tmp / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(m))


def test_global_batch_splits_rows_and_the_engine_does_not(tmp_path):
    """Same config on 8 GPUs vs 1 GPU = another global batch: two rows. ZeRO-2 vs DDP on the
    same number of GPUs: one row."""
    for name, seed, engine, world in [("a", 1, "zero2", 8), ("b", 2, "ddp", 8), ("c", 3, "none", 1)]:
        _fake(tmp_path, name, seed, 50.0 + seed, 6.0)
        f = tmp_path / name / "metrics.json"
        m = json.loads(f.read_text())
        m["config"]["distributed"] = {"name": engine}
        m["parallel"] = {"engine": engine, "world_size": world, "global_batch": world}
        f.write_text(json.dumps(m))
    rows = report.group(report.collect([tmp_path]))
    assert sorted(r["seeds"] for r in rows) == [[1, 2], [3]]
    assert {r["variant"] for r in rows} == {"global_batch=1", "global_batch=8"}


def test_mean_std_by_hand_and_paper_numbers(tmp_path):
    _fake(tmp_path, "s1", 1, 50.0, 6.0)
    _fake(tmp_path, "s2", 2, 52.0, 8.0)
    _fake(tmp_path, "s3", 3, 54.0, 7.0)
    rows = report.group(report.collect([tmp_path]))
    assert len(rows) == 1
    r = rows[0]
    assert r["seeds"] == [1, 2, 3]
    assert r["rouge"]["mean"] == pytest.approx(52.0)
    assert r["rouge"]["std"] == pytest.approx(2.0)  # sample std of 50, 52, 54
    assert r["forget_rate"]["mean"] == pytest.approx(7.0) and r["forget_rate"]["std"] == pytest.approx(1.0)
    assert r["forward"]["mean"] is None
    assert r["rouge"]["paper"] == 50.86 and r["forget_rate"]["paper"] == 6.95


def test_different_configs_are_not_averaged(tmp_path):
    _fake(tmp_path, "a1", 1, 50.0, 6.0)
    _fake(tmp_path, "a2", 2, 52.0, 6.0)
    _fake(tmp_path, "b1", 1, 10.0, 6.0, cfg_extra={"lr": 1e-3})
    rows = report.group(report.collect([tmp_path]))
    assert len(rows) == 2
    by_var = {r["variant"]: r for r in rows}
    assert any("trainer.lr=0.001" in v for v in by_var)
    assert sorted(r["rouge"]["mean"] for r in rows) == [10.0, 51.0]


def test_every_row_states_its_rate_and_one_seed_has_no_spread(tmp_path):
    """A lone lora_r32 run at 1e-3 beside badit at 2e-4 (two seeds): both rows name their rate,
    and the single seed's spread is unknown, not 0."""
    _fake(tmp_path, "b1", 1, 50.0, 6.0)
    _fake(tmp_path, "b2", 2, 52.0, 8.0)
    _fake(tmp_path, "l1", 1, 48.0, 9.0, cfg_extra={"lr": 1e-3}, method="lora_r32")
    rows = report.group(report.collect([tmp_path]))
    by = {r["method"]: r for r in rows}
    assert by["lora_r32"]["lr"] == 1e-3 and by["badit"]["lr"] == 2e-4
    assert by["lora_r32"]["rouge"]["std"] is None
    md = report.markdown(rows)
    assert "| qwen3-8b | lora_r32 | sequential |  | 1e-3 | 1 | 48.00 ± ? |" in md, md
    assert "| qwen3-8b | badit | sequential |  | 2e-4 | 1,2 | 51.00 ± 1.41 (50.86) |" in md
    assert "± 0.00" not in next(l for l in md.splitlines() if "lora_r32" in l)
    assert "1e-3" in report.latex(rows)
    runs = report.collect([tmp_path])
    for r in runs:
        r["timing"] = {"s": {"train_s": 60.0, "eval_s": 0.0}}
    st = report.study_markdown(report.study(runs, reference="badit"), report.study_setting(runs))
    assert "| lora_r32 | 1e-3 | 48.00 ± ? |" in st and "lr per row" in st


def test_cli_writes_files(tmp_path):
    _fake(tmp_path, "s1", 1, 50.0, 6.0)
    out = subprocess.run([sys.executable, "-m", "badit_exp.report", str(tmp_path)],
                         capture_output=True, text=True, check=True)
    assert "| qwen3-8b | badit | sequential |" in out.stdout
    assert (tmp_path / "report.tex").read_text().startswith("\\begin{tabular}")
    assert json.loads((tmp_path / "report.json").read_text())[0]["seeds"] == [1]


def test_multirun_seed_sweep_then_report(tmp_path):
    out = subprocess.run([sys.executable, "-m", "badit_exp.train", "-m", "seed=1,2", "model=tiny-llama",
                          f"data.root={SUPERNI}", f"data.tasks=[{','.join(TASKS3[:2])}]",
                          "data.max_train_per_task=2", "data.max_eval_per_task=1", "data.max_new_tokens=2",
                          "trainer.epochs=1", f"paths.cache_dir={CACHE}", f"paths.output_dir={tmp_path}",
                          f"hydra.sweep.dir={tmp_path}/sweep"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if (p / "metrics.json").exists())
    assert runs == ["tiny-llama-lora-mixed-seed1", "tiny-llama-lora-mixed-seed2"]
    rows = report.group(report.collect([tmp_path / "sweep"]))
    assert len(rows) == 1 and rows[0]["seeds"] == [1, 2] and not rows[0]["paper_scale"]


def test_timing_ratios(tmp_path):
    for i, (method, secs) in enumerate([("loramoe", 10.0), ("loramoe", 14.0), ("lora", 9.0), ("badit", 15.0)]):
        d = tmp_path / f"r{i}"
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({
            "mode": "sequential", "model": "m", "method": method, "seed": i, "config": {},
            "timing": {"t1": {"train_s": secs / 2}, "t2": {"train_s": secs / 2}}}))
    rows = {r["method"]: r for r in report.timing(report.collect([tmp_path]))}
    assert rows["loramoe"]["train_s"] == pytest.approx(12.0)
    assert rows["lora"]["ratio_vs_loramoe"] == pytest.approx(0.75)
    assert rows["badit"]["ratio_vs_loramoe"] == pytest.approx(1.25)


TARGETS = ["table1", "table2", "table_mixtures", "table_interference", "fig4", "fig12"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("scale,ngpus", [("smoke", 1), ("paper", 1), ("paper", 8)])
def test_makefile_targets_compose(target, scale, ngpus):
    """Dry run: every training command of the target composes (first value of each sweep);
    NGPUS=8 launches each job with the deepspeed launcher and distributed=zero2."""
    import shlex

    out = subprocess.run(["make", "-n", "-o", ".venv/.installed", target, f"SCALE={scale}",
                          "MODEL=smollm2-135m", "PY=python", f"NGPUS={ngpus}"],
                         capture_output=True, text=True, cwd=REPO, check=True)
    cmds = [l for l in out.stdout.splitlines() if "badit_exp.train" in l and " -m " in l]
    assert cmds, out.stdout
    for c in cmds:
        args = shlex.split(c)
        if ngpus > 1:
            assert args[0].endswith("deepspeed") and args[1:5] == ["--num_gpus", "8",
                                                                    "--no_local_rank", "--module"]
        args = [a for a in args[args.index("badit_exp.train") + 1:] if a != "-m"]
        first = [a.split("=", 1)[0] + "=" + a.split("=", 1)[1].split(",")[0]
                 if "=" in a and "," in a.split("=", 1)[1] and not a.split("=", 1)[1].startswith("[")
                 else a for a in args]
        cfg = validate(compose_cfg([a for a in first if not a.startswith("hydra.")]))
        assert cfg.model.name == "smollm2-135m" and cfg.scale.name == scale
        assert cfg.distributed.name == ("zero2" if ngpus > 1 else "none")
        if scale == "paper":
            assert cfg.data.max_train_per_task == 1000 and cfg.trainer.epochs == 10


def _study_run(tmp, method, seed, rouge, step0):
    d = tmp / f"{method}-{seed}"
    d.mkdir(parents=True)
    cfg = {"data": {"max_train_per_task": 8, "max_eval_per_task": 5, "max_seq_len": 256},
           "trainer": {"epochs": 2, "lr": 2e-4, "per_device_batch_size": 2}, "seed": seed,
           "method": {"name": method}}
    m = {"mode": "mixed", "model": "smollm2-135m", "method": method, "seed": seed, "config": cfg,
         "rouge": rouge, "tasks": ["a", "b"],
         "target_loss": {"pretrained": 3.0, "step0": step0, "final": 2.0, "examples": 16},
         "timing": {"mixed": {"train_s": 60.0, "eval_s": 30.0}},
         "provenance": {"device": {"type": "cpu", "name": "x86_64", "threads": 2},
                        "git_commit": "abc"}}
    (d / "metrics.json").write_text(json.dumps(m))


def test_study_table_per_seed_losses_and_spread(tmp_path):
    for seed, (a, b, c) in enumerate([(20.0, 21.0, 10.0), (22.0, 21.5, 12.0)], start=1):
        _study_run(tmp_path, "lora", seed, a, 3.0)
        _study_run(tmp_path, "badit", seed, b, 3.0)
        _study_run(tmp_path, "badit_reference", seed, c, 15.0)
    out = tmp_path / "out"
    assert report.main(["--study", str(tmp_path), "--out", str(out), "--name", "st"]) == 0
    data = json.loads((out / "st.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert [r["method"] for r in data["rows"]] == ["lora", "badit_reference", "badit"]
    assert rows["lora"]["rouge"] == 21.0 and rows["lora"]["rouge_per_seed"] == [20.0, 22.0]
    assert rows["lora"]["rouge_std"] == pytest.approx(2 ** 0.5)
    # badit: +0.25 against a spread of sqrt(2) + 0.35: no measurable difference
    assert rows["badit"]["vs_reference"]["measurable"] is False
    assert rows["badit_reference"]["vs_reference"]["measurable"] is True  # -10 vs 2.8
    assert rows["badit_reference"]["loss_step0"] == 15.0 and rows["lora"]["loss_final"] == 2.0
    assert rows["lora"]["wall_s"] == 90.0
    md = (out / "st.md").read_text()
    assert "within seed spread" in md and "(measurable)" in md and "2 epochs" in md
    assert data["setting"]["total_wall_min"] == pytest.approx(6 * 1.5)
