"""Data parallelism: DDP and DeepSpeed ZeRO-2 with two CPU processes (gloo), DOG under both.

The two-process tests launch ``tests/dist_worker.py`` with torchrun, exactly as a user launches
``badit_exp.train``: different data shards per rank, DOG regrouping at every optimizer step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from badit_exp import dist as D
from badit_exp.compose import validate
from badit_exp.config import ConfigError, DistributedConfig, TrainerConfig
from badit_exp.training.loop import epoch_batches
from badit_exp.training.runner import ds_config_for as deepspeed_config
from conftest import CACHE, REPO, SUPERNI, compose_cfg, tiny_overrides

try:
    import deepspeed  # noqa: F401
    HAS_DS = True
except Exception:  # noqa: BLE001 - any import failure means: no ZeRO here
    HAS_DS = False

TASKS2 = ["task363_sst2_polarity_classification", "task875_emotion_classification"]


# -- pieces ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,bs,world", [(10, 2, 2), (7, 2, 2), (9, 1, 4), (3, 2, 2), (8, 3, 1)])
def test_epoch_batches_shard_every_example_to_equal_step_counts(n, bs, world):
    shards = [epoch_batches(n, bs, seed=1, stage=0, epoch=0, rank=r, world_size=world)
              for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank takes the same number of steps
    seen = [i for s in shards for b in s for i in b]
    assert set(seen) == set(range(n))  # nothing left out (padding repeats a few examples)
    assert len(seen) - n < world * bs
    if world == 1:  # one process: the historical order, last batch short
        assert shards[0] == epoch_batches(n, bs, seed=1, stage=0, epoch=0)
    else:
        assert shards[0] != shards[1]


def test_deepspeed_json_comes_from_trainer_and_distributed():
    t = TrainerConfig(epochs=1, per_device_batch_size=2, grad_accum_steps=4, max_grad_norm=0.5)
    d = DistributedConfig(name="zero2", deepspeed={"zero_optimization": {"overlap_comm": False},
                                                   "communication_data_type": "fp32"})
    js = deepspeed_config(t, d, world_size=8, bf16=True)
    assert js["train_batch_size"] == 2 * 4 * 8
    assert js["train_micro_batch_size_per_gpu"] == 2 and js["gradient_accumulation_steps"] == 4
    assert js["gradient_clipping"] == 0.5 and js["bf16"]["enabled"] is True
    z = js["zero_optimization"]
    assert z["stage"] == 2 and z["overlap_comm"] is False and z["contiguous_gradients"] is True
    assert z["offload_optimizer"]["device"] == "none"  # the paper: no CPU offload
    assert js["communication_data_type"] == "fp32" and "optimizer" not in js


@pytest.mark.parametrize("name", ["none", "ddp", "zero2"])
def test_every_distributed_option_composes(name, tmp_path):
    cfg = validate(compose_cfg([f"distributed={name}", "method=badit", "model=qwen3-8b"]))
    assert cfg.distributed.name == name
    if name == "zero2":
        js = deepspeed_config(cfg.trainer, cfg.distributed, 8, bf16=True)
        assert js["train_batch_size"] == 8  # the paper: 8 GPUs x batch 1


def test_distributed_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="distributed.name"):
        validate(compose_cfg(["distributed.name=fsdp"]))
    with pytest.raises(ConfigError, match="distributed.deepspeed.optimizer"):
        validate(compose_cfg(["distributed=zero2", "+distributed.deepspeed.optimizer.type=Adam"]))


def test_multiprocess_launch_without_distributed_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="distributed=ddp"):
        D.init(DistributedConfig(name="none"), torch.device("cpu"))


def test_local_gradients_would_regroup_differently(tmp_path, superni):
    """Why DOG must use reduced gradients: the two shards' own gradients give two groupings
    (the reference code's multi-GPU bug, SPEC section 8)."""
    from badit_exp.data.prompts import collate_train
    from badit_exp.methods.badit import dog_assign
    from badit_exp.training.runner import Runner

    cfg = validate(compose_cfg(_over(tmp_path, "none")))
    runner = Runner(cfg, tmp_path / "run")
    runner.setup()
    model, method = runner.build_model()
    examples = [ex for t in TASKS2 for ex in runner.train_examples[t]]
    assigns = []
    for rank in range(2):
        batch = epoch_batches(len(examples), 2, 1, 0, 0, rank, 2)[0]
        b = collate_train([examples[i] for i in batch], runner.tok.pad_token_id)
        model.zero_grad()
        model(**{k: b[k] for k in ("input_ids", "attention_mask", "labels")}).loss.backward()
        g = torch.stack([method.component_grads(n, l) for n, l in method.layers.items()])
        assigns.append(dog_assign(g, cfg.method.num_experts))
    assert not torch.equal(assigns[0], assigns[1])


@pytest.mark.skipif(not HAS_DS, reason="deepspeed is not installed (pip install -e .[dist])")
def test_cpu_zero_skips_deepspeeds_jit_built_shm_op(tmp_path, monkeypatch):
    """DeepSpeed's CPU backend JIT-builds a shared-memory op behind a lock file; one left by a
    killed process hung every later CPU ZeRO run (a CI run, 600 s). Marked incompatible, the op is
    neither built nor loaded, whatever lies in the extensions folder."""
    import importlib

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # the module, not torch
    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir()
    stale.touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    D.skip_shm_comm_op()
    built = []  # a thread: without the fix the load waits on the lock forever
    loader = threading.Thread(target=lambda: built.append(ds_torch.build_shm_op()), daemon=True)
    loader.start()
    loader.join(timeout=60)
    assert built == [None], "DeepSpeed still loads its shm op (it waits on a stale lock)"
    assert not any(p.name != "lock" for p in tmp_path.rglob("*") if p.is_file())


# -- two processes -------------------------------------------------------------------------------

def _over(root: Path, dist: str, extra=(), method: str = "badit", backend: str = "gloo"):
    dog = ["method.dog.every_n_steps=1", "method.dog.until_fraction=1.0"] \
        if method == "badit" else []
    return tiny_overrides(root, tasks=TASKS2, extra=[
        f"method={method}", *dog, "data.max_train_per_task=8", "data.max_eval_per_task=4",
        f"distributed={dist}", f"distributed.backend={backend}", *extra])


def _launch(tmp_path: Path, name: str, dist: str, crash_at: int = 0, extra=(),
            method: str = "badit", nproc: int = 2, backend: str = "gloo"):
    out, run_dir = tmp_path / name / "dump", tmp_path / name / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
               [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "SUPERNI_ROOT": str(SUPERNI), "BADIT_CACHE_DIR": str(CACHE)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(D._free_port()), str(REPO / "tests" / "dist_worker.py"),
           str(out), str(run_dir), str(crash_at),
           *_over(tmp_path / name, dist, extra, method, backend)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return proc, out, run_dir


def _check_ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _dog_rows(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "dog_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    # eval batches of 2 over 4 test instances per task: one batch per rank
    proc, out, run_dir = _launch(tmp, "ddp", "ddp", extra=["trainer.eval_batch_size=2"])
    _check_ok(proc)
    return out, run_dir


@pytest.mark.distributed
def test_ddp_dog_keeps_replicas_identical(ddp_run, superni):
    out, run_dir = ddp_run
    a, b = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = _dog_rows(run_dir)
    steps = json.loads((run_dir / "progress.json").read_text())["global_step"]
    assert len(rows) == steps - 1 >= 3  # every optimizer step but the last, logged once (rank 0)
    assert sum(r["mean_moved"] > 0 for r in rows) >= 3  # the regroups really move components
    assert (run_dir / "adapter").is_dir()
    par = json.loads((run_dir / "metrics.json").read_text())["parallel"]
    assert par == {"engine": "ddp", "world_size": 2, "global_batch": 2 * 1 * 2}


@pytest.mark.distributed
def test_sharded_evaluation_equals_one_process(ddp_run, superni):
    """Predictions of the two-process run = a one-process generation with the same adapter."""
    from badit_exp.evaluation.generate import evaluate_task
    from badit_exp.training.export import load_trained
    from badit_exp.training.runner import Runner

    _, run_dir = ddp_run
    model, tok, _ = load_trained(run_dir, CACHE, device="cpu")
    runner = Runner(validate(compose_cfg(_over(run_dir.parent, "none"))), run_dir.parent / "x")
    runner.setup()
    for t in TASKS2:
        _, records = evaluate_task(model, tok, runner.eval_tasks[t], runner.eval_examples[t],
                                   batch_size=2, max_new_tokens=6, device=torch.device("cpu"))
        written = [json.loads(x) for x in (run_dir / "predictions" / f"{t}.jsonl").read_text()
                   .splitlines()]
        assert [r["prediction"] for r in records] == [r["prediction"] for r in written]


@pytest.mark.distributed
@pytest.mark.skipif(not HAS_DS, reason="deepspeed is not installed (pip install -e .[dist])")
def test_zero2_dog_rewrites_partitioned_state_like_ddp(ddp_run, tmp_path, superni):
    """ZeRO-2 partitions the fp32 master weights and Adam moments over the ranks; DOG rewrites
    them through DeepSpeed's full-tensor API. Same data and math as DDP, so after eight
    regroups and steps the adapters equal the DDP run's; any moment left unpermuted, or a rank
    regrouping on its own, would show here."""
    proc, out, run_dir = _launch(tmp_path, "zero2", "zero2")
    _check_ok(proc)
    a, b = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref = load_file(str(ddp_run[0] / "rank0.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], ref[k], rtol=1e-5, atol=1e-6)
    assert [r["mean_moved"] for r in _dog_rows(run_dir)] == \
        pytest.approx([r["mean_moved"] for r in _dog_rows(ddp_run[1])])
    js = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert js["zero_optimization"]["stage"] == 2 and js["train_batch_size"] == 2 * 2


@pytest.mark.distributed
@pytest.mark.slow  # resume across engines is in the slow suite too
@pytest.mark.skipif(not HAS_DS, reason="deepspeed is not installed (pip install -e .[dist])")
def test_zero2_killed_run_resumes_to_the_same_adapter(ddp_run, tmp_path, superni):
    """Kill both ranks after step 3 (checkpoint at step 2, mid-epoch), start again: the
    partitioned optimizer state comes back from full tensors and the end result is unchanged."""
    extra = ["trainer.checkpoint_every_steps=2"]
    proc, _, run_dir = _launch(tmp_path, "resume", "zero2", crash_at=3, extra=extra)
    assert proc.returncode != 0 and (run_dir / "checkpoints" / "in_stage").is_dir()
    proc, out, run_dir = _launch(tmp_path, "resume", "zero2", extra=extra)
    _check_ok(proc)
    a, ref = load_file(str(out / "rank0.safetensors")), load_file(str(ddp_run[0] / "rank0.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], ref[k], rtol=1e-5, atol=1e-6)
    steps = [r["step"] for r in _dog_rows(run_dir)]
    assert steps == sorted(set(steps))  # each regroup logged once across the restart


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("method,dist", [
    ("lora", "ddp"), ("pissa", "ddp"), ("loramoe_original", "ddp"), ("gainlora", "ddp"),
    ("o_lora", "ddp"), ("badit", "zero2"), ("gainlora", "zero2"),
    ("hydralora", "ddp"), ("hydralora", "zero2"), ("mola", "ddp"), ("mola", "zero2"),
    ("mixlora", "ddp"), ("mixlora", "zero2"), ("mtl_lora", "ddp"), ("mtl_lora", "zero2"),
    ("lori", "ddp"), ("lori", "zero2"), ("mtlora", "ddp"), ("mtlora", "zero2"),
    ("flylora", "ddp"), ("flylora", "zero2"), ("smora", "ddp"), ("smora", "zero2")])
def test_every_method_trains_sequentially_in_parallel(method, dist, tmp_path, superni):
    """Each method's hooks (balancing loss, growing branches, projected gate updates) run under
    DDP / ZeRO-2 over several stages (a new engine per stage), replicas stay identical, and rank
    0 writes the sequential score matrix."""
    if dist == "zero2" and not HAS_DS:
        pytest.skip("deepspeed is not installed")
    proc, out, run_dir = _launch(tmp_path, method, dist, method=method, extra=[
        "training_mode=sequential", "task_order=custom", f"task_order.order=[{','.join(TASKS2)}]"])
    _check_ok(proc)
    a, b = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len((run_dir / "scores.csv").read_text().splitlines()) == 1 + len(TASKS2)
    if method == "lori":  # the masked entries never moved from their 0 under DDP / ZeRO-2
        for k in (k for k in a if k.endswith(".lora_B")):
            m = a[k.replace("lora_B", "lori_mask")]
            assert torch.equal(a[k] * (1 - m), torch.zeros_like(a[k])) and (a[k] * m).any()


@pytest.mark.parametrize("launcher,override,target", [
    ("joblib", "hydra.launcher.n_jobs=2", "JoblibLauncher"),
    ("submitit_slurm", "hydra.launcher.tasks_per_node=8", "SlurmLauncher")])
def test_sweep_launchers_compose(launcher, override, target):
    """The documented cluster/parallel sweep launchers (extra `launchers`)."""
    pytest.importorskip(f"hydra_plugins.hydra_{launcher.split('_')[0]}_launcher")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        c = compose(config_name="config", overrides=[f"hydra/launcher={launcher}", override,
                                                      "distributed=zero2"],
                    return_hydra_config=True)
    assert c.hydra.launcher._target_.endswith(target) and c.distributed.name == "zero2"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("first,then", [("zero2", "ddp"), ("ddp", "zero2")])
def test_resume_across_engines(first, then, ddp_run, tmp_path, superni):
    """Checkpoints hold full per-parameter tensors: a run killed under one engine resumes under
    the other and ends on the same adapter."""
    if not HAS_DS:
        pytest.skip("deepspeed is not installed")
    extra = ["trainer.checkpoint_every_steps=2"]
    proc, _, run_dir = _launch(tmp_path, "x", first, crash_at=3, extra=extra)
    assert proc.returncode != 0 and (run_dir / "checkpoints" / "in_stage").is_dir()
    proc, out, _ = _launch(tmp_path, "x", then, extra=extra)
    _check_ok(proc)
    a, ref = load_file(str(out / "rank0.safetensors")), load_file(str(ddp_run[0] / "rank0.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.slow  # the fast suite keeps ZeRO-2 == DDP through DOG's partitioned rewrite
@pytest.mark.skipif(not HAS_DS, reason="deepspeed is not installed (pip install -e .[dist])")
def test_zero2_equals_ddp_with_accumulation_and_function_preserving_dog(tmp_path, superni):
    """Gradient accumulation over 3 micro-batches (with a short last window per epoch) and the
    scalar-router DOG, which rescales moved components and divides the partitioned moments:
    ZeRO-2 and DDP end on the same adapter. (With the top-k sequence router the two engines'
    different summation orders, ~1e-8, can flip a near-tied top-k choice, so that router is
    compared without accumulation above.)"""
    extra = ["trainer.grad_accum_steps=3", "data.max_train_per_task=9", "method.router=scalar",
             "method.top_k=8", "method.function_preserving=none"]
    res = {}
    for dist in ("ddp", "zero2"):
        proc, out, run_dir = _launch(tmp_path, dist, dist, extra=extra)
        _check_ok(proc)
        res[dist] = load_file(str(out / "rank0.safetensors"))
        assert sum(r["mean_moved"] > 0 for r in _dog_rows(run_dir)) >= 2
    for k in res["ddp"]:
        torch.testing.assert_close(res["zero2"][k], res["ddp"][k], rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.slow
def test_gradient_checkpointing_under_ddp_changes_nothing(ddp_run, tmp_path, superni):
    """Non-reentrant checkpointing recomputes activations (and replays dropout's RNG): same
    adapter as without it, bit for bit, DOG included."""
    proc, out, _ = _launch(tmp_path, "gc", "ddp", extra=["model.gradient_checkpointing=true"])
    _check_ok(proc)
    a, ref = load_file(str(out / "rank0.safetensors")), load_file(str(ddp_run[0] / "rank0.safetensors"))
    assert all(torch.equal(a[k], ref[k]) for k in a)


@pytest.mark.distributed
def test_a_refused_run_dir_stops_every_rank_with_the_reason(ddp_run, tmp_path, superni):
    """Rank 0 checks the run directory; the other ranks exit with the same clear error instead
    of waiting at a barrier."""
    _, run_dir = ddp_run
    proc, _, _ = _launch(run_dir.parent.parent, "ddp", "ddp", extra=["trainer.lr=1e-3"])
    assert proc.returncode != 0
    assert proc.stderr.count("holds a run with a different config") + \
        proc.stdout.count("holds a run with a different config") >= 2  # both ranks say why


def test_generation_deals_batches_to_ranks_and_reassembles_in_order(monkeypatch):
    """Rank r of w generates batches r, r + w, ... (of the length-sorted order) and the gathered
    texts come back in input order: nothing generated twice, nothing lost."""
    from badit_exp.evaluation import generate as G

    class Tok:
        pad_token_id, eos_token_id = 0, 1

        def batch_decode(self, ids, skip_special_tokens=True):
            return [f"p{int(row[0])}" for row in ids]

    class Model:
        calls: list = []

        def eval(self):
            return self

        def generate(self, input_ids, attention_mask, **kw):
            Model.calls.append(input_ids[:, -1].tolist())  # last prompt token = example id
            return torch.cat([input_ids, input_ids[:, -1:]], dim=1)

    # example i has a prompt of length 10 - i (so the length order is the input order)
    examples = [{"input_ids": [5] * (9 - i) + [100 + i]} for i in range(7)]
    world = 3
    shards = {}
    for r in range(world):
        Model.calls = []
        monkeypatch.setattr(G.D, "rank", lambda r=r: r)
        monkeypatch.setattr(G.D, "world_size", lambda: world)

        def gather(mine, r=r):  # the shards of the ranks simulated so far
            shards[r] = mine
            return [shards.get(q, []) for q in range(world)]

        monkeypatch.setattr(G.D, "all_gather_object", gather)
        out = G.generate(Model(), Tok(), examples, batch_size=2, max_new_tokens=1,
                         device=torch.device("cpu"))
        assert Model.calls == [[100 + i for i in b] for b in [[0, 1], [2, 3], [4, 5], [6]][r::world]]
    assert out == [f"p{100 + i}" for i in range(7)]  # the last rank saw every shard
