"""Training step time of lora, loramoe and badit, interleaved in one process; DOG cost.

    python benchmarks/step_time.py                       # SmolLM2-135M, CPU, prints JSON
    python benchmarks/step_time.py --model tiny-llama --steps 5 --rounds 2   # smoke

Every configuration trains the same model on the same batches with the same seed; rounds
interleave the configurations so drifts in machine speed hit all of them alike. A step is
the training loop's own ``StageTrainer.train_step``: forward, backward, the method's hooks,
clipping, AdamW and the schedule.
``badit`` runs DOG at its default schedule (end of an epoch of ``--steps-per-epoch`` steps,
first half of the epochs; its cost is amortised over the epoch, so the mean is reported), and
``badit_dog_every_step`` regroups after every backward pass (Algorithm 1).

Also measured: one DOG regroup over all layers, and ``dog_assign`` against the reference
code's per-layer scikit-learn K-means (if scikit-learn is installed), with the DOG objective
each reaches (the reference's K-means labels made balanced greedily).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from badit_exp import provenance  # noqa: E402
from badit_exp.compose import load  # noqa: E402
from badit_exp.data import load_task  # noqa: E402
from badit_exp.data.prompts import collate_train, tokenize_task  # noqa: E402
from badit_exp.methods import registry  # noqa: E402
from badit_exp.methods.badit import dog_assign, dog_objective  # noqa: E402
from badit_exp.models import load_model_and_tokenizer  # noqa: E402
from badit_exp.training import engine as E  # noqa: E402
from badit_exp.training.loop import StageTrainer  # noqa: E402

CONFIGS = {
    "lora": ["method=lora"],
    "loramoe": ["method=loramoe"],
    "badit": ["method=badit"],
    "badit_dog_every_step": ["method=badit", "method.dog.every_n_steps=1",
                             "method.dog.at_epoch_end=false", "method.dog.until_fraction=1.0"],
    # the same, the regroup solved and applied before each step's update (dog.overlap=off;
    # the default, auto, overlaps the solve with the next step on a GPU)
    "badit_dog_every_step_sync": ["method=badit", "method.dog.every_n_steps=1",
                                  "method.dog.at_epoch_end=false", "method.dog.until_fraction=1.0",
                                  "method.dog.overlap=off"],
    # the mixture family: released recipes and at BADIT's budget (conf/method/*_k8.yaml)
    "hydralora": ["method=hydralora"],
    "hydralora_k8": ["method=hydralora_k8"],
    "mola": ["method=mola"],
    "mola_k8": ["method=mola_k8"],
    "mixlora": ["method=mixlora"],
    "mixlora_k8": ["method=mixlora_k8"],
    # block-level, sparse and task-aware adapters, released recipes and at BADIT's budget
    "lora_r32": ["method=lora_r32"],
    "mtlora": ["method=mtlora"],
    "mtlora_k8": ["method=mtlora_k8"],
    "lori": ["method=lori"],
    "lori_k8": ["method=lori_k8"],
    "mtl_lora": ["method=mtl_lora"],
    "mtl_lora_k8": ["method=mtl_lora_k8"],
}
INTERFERENCE = ["lora_r32", "mtlora", "mtlora_k8", "lori", "lori_k8", "mtl_lora", "mtl_lora_k8"]
MIXTURES = ["hydralora", "hydralora_k8", "mola", "mola_k8", "mixlora", "mixlora_k8"]


def build(name, model_name, cache, device, steps_per_epoch, batch_size, extra=()):
    """The model, its method and the training loop's own :class:`StageTrainer` (one process),
    whose ``train_step`` the benchmark times: the real step, clipping and every hook included."""
    cfg = load([f"model={model_name}", *CONFIGS[name], *extra])
    torch.manual_seed(0)
    base, tok = load_model_and_tokenizer(cfg.model, cache, device)
    method = registry.build(cfg.method)
    method.task_names = list(cfg.data.tasks)  # task-aware methods size their per-task state
    model = method.apply(base)
    t = cfg.trainer
    optim = E.Optim(lr=t.lr, weight_decay=t.weight_decay, lr_scheduler=t.lr_scheduler,
                    warmup_ratio=t.warmup_ratio, grad_accum_steps=1,
                    max_grad_norm=t.max_grad_norm)
    examples = [{}] * (steps_per_epoch * batch_size)  # only the schedule's length is read
    trainer = StageTrainer(
        model, method, examples, epochs=10, batch_size=batch_size, grad_accum_steps=1, seed=1,
        stage_index=0, stage_name="bench", pad_id=tok.pad_token_id, device=device,
        autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
        make_engine=lambda n: E.build_engine(model, "none", optim, n, device=device))
    trainer.setup()
    return {"model": model, "method": method, "trainer": trainer, "tok": tok}


def batches(tok, root, n, bs, seq):
    tasks = ["task363_sst2_polarity_classification", "task591_sciq_answer_generation",
             "task1510_evalution_relation_extraction", "task1572_samsum_summary"]
    ex = []
    for i, t in enumerate(tasks):
        task = load_task(root, t, "train", n * bs)
        part = tokenize_task(task, tok, kind="train", max_seq_len=seq, max_new_tokens=50, seed=1)
        for e in part:
            e["task_index"] = i  # MTL-LoRA reads it (one of data.tasks' first indices)
        ex += part
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(ex), generator=g).tolist()
    return [collate_train([ex[i] for i in perm[k * bs:(k + 1) * bs]], tok.pad_token_id)
            for k in range(n)]


def train_step(run, batch, steps_per_epoch, device):
    """One optimizer step of the training loop (``StageTrainer.train_step``), timed."""
    trainer = run["trainer"]
    s = trainer.pos.step
    t0 = time.perf_counter()
    inputs = {k: v.to(device) for k, v in batch.items()}
    trainer.train_step([inputs], epoch=(s // steps_per_epoch) % 10,
                       last_of_epoch=(s + 1) % steps_per_epoch == 0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    trainer.pos.step += 1
    return time.perf_counter() - t0


def dog_cost(run, batch, device, repeats=5):
    """Time of one regroup over all layers (gradients from a real backward pass)."""
    model, method, opt = run["model"], run["method"], run["trainer"].engine
    inputs = {k: v.to(device) for k, v in batch.items() if k != "task_index"}
    model(**inputs).loss.backward()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        method.regroup(opt)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    grads = torch.stack([method.component_grads(n, l) for n, l in method.layers.items()])
    opt.optimizer.zero_grad(set_to_none=True)
    return statistics.median(times), grads


def versus_sklearn(grads, K, repeats=3):
    out = {}
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a = dog_assign(grads, K)
        if grads.is_cuda:
            torch.cuda.synchronize()
        t.append(time.perf_counter() - t0)
    u = grads.float() / grads.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    out["dog_assign_s"] = statistics.median(t)
    out["dog_assign_objective"] = float(dog_objective(u, a, K).mean())
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        out["sklearn"] = "not installed (pip install scikit-learn)"
        return out
    import numpy as np

    r = grads.shape[1] // K
    uc = u.cpu().numpy()
    t0 = time.perf_counter()
    labels = []
    for layer in uc:  # the reference: one K-means per layer on the CPU
        km = KMeans(n_clusters=K, n_init=10, random_state=0).fit(layer)
        lab = km.labels_.copy()
        # make it balanced greedily (the reference's fix-up is random)
        dist = km.transform(layer)
        counts = np.bincount(lab, minlength=K)
        for i in np.argsort(-dist[np.arange(len(lab)), lab]):
            if counts[lab[i]] > r:
                for k in np.argsort(dist[i]):
                    if counts[k] < r:
                        counts[lab[i]] -= 1
                        lab[i] = k
                        counts[k] += 1
                        break
        labels.append(lab)
    out["sklearn_kmeans_s"] = time.perf_counter() - t0
    la = torch.as_tensor(np.stack(labels).astype(np.int64), device=u.device)
    out["sklearn_objective"] = float(dog_objective(u, la, K).mean())
    out["speedup_vs_sklearn"] = out["sklearn_kmeans_s"] / out["dog_assign_s"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=10, help="timed steps per config per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps-per-epoch", type=int, default=30)
    p.add_argument("--only", default="", help="comma-separated configurations or any "
                   "conf/method names (lora and loramoe always run: the ratios' references)")
    p.add_argument("--override", action="append", default=[],
                   help="extra Hydra override for every config, e.g. model.tiny.hidden_size=1024")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "superni"))
    p.add_argument("--cache", default=str(REPO / ".cache" / "badit_exp"))
    a = p.parse_args()
    device = torch.device(a.device)
    extra = [n for n in a.only.split(",") if n and n not in CONFIGS]  # any conf/method name
    CONFIGS.update({n: [f"method={n}"] for n in extra})
    names = [n for n in CONFIGS if not a.only or n in {"lora", "loramoe", *a.only.split(",")}]
    runs = {n: build(n, a.model, Path(a.cache), device, a.steps_per_epoch, a.batch_size,
                     a.override) for n in names}
    data = batches(runs["lora"]["tok"], Path(a.data), a.steps + a.warmup, a.batch_size, a.seq_len)
    times = {n: [] for n in names}
    for _ in range(a.rounds):
        for n, run in runs.items():
            for k, b in enumerate(data):
                dt = train_step(run, b, a.steps_per_epoch, device)
                if k >= a.warmup:
                    times[n].append(dt)
    res = {n: {"median_s": statistics.median(t), "mean_s": statistics.mean(t), "n": len(t)}
           for n, t in times.items()}
    ratios = {"loramoe/lora (median)": res["loramoe"]["median_s"] / res["lora"]["median_s"]}
    for n in ("badit", "badit_dog_every_step", "badit_dog_every_step_sync"):
        if n in res:  # DOG's cost is amortised over the epoch: the mean
            ratios[f"{n}/loramoe (mean)"] = res[n]["mean_s"] / res["loramoe"]["mean_s"]
    for n in MIXTURES:
        if n in res:
            ratios[f"{n}/loramoe (median)"] = res[n]["median_s"] / res["loramoe"]["median_s"]
    for n in [*INTERFERENCE, *extra]:
        if n in res:
            ratios[f"{n}/lora (median)"] = res[n]["median_s"] / res["lora"]["median_s"]
    params = {n: sum(p.numel() for p in r["model"].parameters() if p.requires_grad)
              for n, r in runs.items()}
    out = {
        "model": a.model, "overrides": a.override, "device": str(device),
        "batch_size": a.batch_size, "seq_len": a.seq_len,
        "steps_per_epoch_for_default_schedule": a.steps_per_epoch,
        "step_time": res, "ratios": ratios, "trainable_parameters": params,
    }
    if "badit" in runs:
        regroup_s, grads = dog_cost(runs["badit"], data[0], device)
        out.update(dog_regroup_all_layers_s=regroup_s, dog_layers=int(grads.shape[0]),
                   dog_assign_vs_reference_kmeans=versus_sklearn(
                       grads, runs["badit"]["method"].cfg.num_experts))
    out["provenance"] = provenance.collect()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
