"""Entry point: ``python -m badit_exp.analyze <neurons|fisher|experts> [overrides]``.

Writes arrays (``.npz`` and ``.csv``) and PNG figures to the run directory
(``outputs/analyze/<analysis>/<model>/`` or ``hydra.run.dir=...``). See conf/analyze.yaml and
:mod:`badit_exp.analysis` for what each analysis measures.
"""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path
from typing import Dict, List

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from badit_exp import analysis as A
from badit_exp import provenance
from badit_exp.compose import CONF_DIR, register_configs
from badit_exp.config import AnalyzeConfig, ConfigError
from badit_exp.data import load_task
from badit_exp.data.prompts import collate_eval, tokenize_task
from badit_exp.data.superni import DataError
from badit_exp.io_utils import atomic_write_json
from badit_exp.models import load_model_and_tokenizer, resolve_device
from badit_exp.plotting import router_usage
from badit_exp.training.export import load_trained

log = logging.getLogger("badit_exp.analyze")
register_configs()

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _short(t: str) -> str:
    return t.split("_")[0]


def _examples(cfg: AnalyzeConfig, tok, kind: str, split: str) -> Dict[str, List[Dict]]:
    d = cfg.data
    out = {}
    for t in d.tasks:
        task = load_task(d.root, t, split, cfg.analysis.max_examples_per_task)
        out[t] = tokenize_task(task, tok, kind=kind, max_seq_len=d.max_seq_len,
                               max_new_tokens=d.max_new_tokens, seed=cfg.seed)
    return out


def _decoder_layers(model):
    core = getattr(model, "model", model)
    if not hasattr(core, "layers"):
        raise ValueError(f"{type(model).__name__}: cannot find decoder layers (model.model.layers)")
    return core.layers


def run_neurons(cfg: AnalyzeConfig, out: Path, model, tok, device) -> Dict:
    layers = _decoder_layers(model)
    idx = A.resolve_layers(cfg.analysis.layers, len(layers))
    data = _examples(cfg, tok, "train", cfg.analysis.split)
    tasks = list(data)
    means = {i: [] for i in idx}
    for t in tqdm(tasks, desc="neurons"):
        acts = A.GateActivations({str(i): layers[i].mlp for i in idx})
        with torch.no_grad():
            for b in A.iterate_examples(data[t], tok.pad_token_id, cfg.analysis.batch_size):
                acts.set_batch(b["attention_mask"].to(device))
                model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
        acts.close()
        for i, m in acts.means().items():
            means[int(i)].append(m)
    arrays, summary = {}, {}
    fig, axes = plt.subplots(len(idx), 1, figsize=(10, 1.2 + 0.35 * len(tasks) * len(idx)), squeeze=False)
    for ax, i in zip(axes[:, 0], idx):
        M = np.stack(means[i])
        mask = A.activation_mask(M, cfg.analysis.epsilon)
        shared = A.sharing_counts(mask)
        arrays[f"layer{i}_mean_activation"] = M
        arrays[f"layer{i}_mask"] = mask
        arrays[f"layer{i}_shared_by_k_tasks"] = shared
        summary[f"layer{i}"] = {"activated_per_task": mask.sum(1).tolist(),
                                "shared_by_k_tasks": shared.tolist(),
                                "shared_by_all": int(shared[-1])}
        ax.imshow(mask, aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_yticks(range(len(tasks)), [_short(t) for t in tasks], fontsize=6)
        ax.set_title(f"layer {i}: activated neurons (|mean act| > {cfg.analysis.epsilon})", fontsize=8)
    axes[-1, 0].set_xlabel("neuron")
    fig.tight_layout()
    fig.savefig(out / "neurons_mask.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    w = 0.8 / len(idx)
    for j, i in enumerate(idx):
        s = arrays[f"layer{i}_shared_by_k_tasks"]
        ax.bar(np.arange(1, len(tasks) + 1) + j * w, s, width=w, label=f"layer {i}")
    ax.set_xlabel("number of tasks sharing an activated neuron")
    ax.set_ylabel("neurons")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "neurons_sharing.png", dpi=120)
    plt.close(fig)
    np.savez_compressed(out / "neurons.npz", tasks=np.array(tasks), layers=np.array(idx), **arrays)
    return {"tasks": tasks, "layers": idx, **summary}


def _find(layer: torch.nn.Module, suffix: str) -> torch.nn.Module:
    for name, mod in layer.named_modules():
        if name.split(".")[-1] == suffix and hasattr(mod, "weight"):
            return mod
    raise ValueError(f"analysis.matrices: no module named {suffix!r} in a decoder layer")


def run_fisher(cfg: AnalyzeConfig, out: Path, model, tok, device) -> Dict:
    layers = _decoder_layers(model)
    idx = A.resolve_layers(cfg.analysis.layers, len(layers))
    params = {f"layer{i}.{m}": _find(layers[i], m).weight for i in idx for m in cfg.analysis.matrices}
    for p in params.values():
        p.requires_grad_(True)
    data = _examples(cfg, tok, "train", cfg.analysis.split)
    tasks = list(data)
    masks = {n: [] for n in params}
    mean_grads = {n: [] for n in params}
    fishers = {n: [] for n in params}
    for t in tqdm(tasks, desc="fisher"):
        acc = A.FisherAccumulator(params)
        for b in A.iterate_examples(data[t], tok.pad_token_id, 1):  # one example per backward
            model.zero_grad(set_to_none=True)
            loss = model(**{k: v.to(device) for k, v in b.items() if k != "task_index"}).loss
            loss.backward()
            acc.update()
        F, G = acc.fisher(), acc.mean_grad()
        for n in params:
            masks[n].append(A.fisher_mask(F[n], cfg.analysis.top_fraction, cfg.analysis.threshold))
            mean_grads[n].append(G[n].astype(np.float32))
            fishers[n].append(F[n].sum(1))  # per-row Fisher mass, for the record
    arrays, summary = {}, {}
    fig, axes = plt.subplots(1, len(params), figsize=(3 + 2.5 * len(params), 4), squeeze=False)
    total_k = np.zeros(len(tasks), dtype=np.int64)
    for ax, n in zip(axes[0], params):
        mk = np.stack(masks[n])  # (T, rows, cols)
        per_row = mk.sum(2)  # (T, rows)
        shared = A.sharing_counts(mk.reshape(len(tasks), -1))
        total_k += shared
        signs = A.sign_counts(np.stack(mean_grads[n]))
        arrays[f"{n}.activated_per_row"] = per_row
        arrays[f"{n}.shared_by_k_tasks"] = shared
        arrays[f"{n}.fisher_per_row"] = np.stack(fishers[n])
        for k, v in signs.items():
            arrays[f"{n}.{k}"] = v
        summary[n] = {"activated_per_task": mk.reshape(len(tasks), -1).sum(1).tolist(),
                      "shared_by_k_tasks": shared.tolist(),
                      "mean_conflict_fraction": float(signs["conflict_fraction_per_row"].mean())}
        ax.imshow(per_row.T, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(tasks)), [_short(t) for t in tasks], rotation=90, fontsize=6)
        ax.set_ylabel("matrix row")
        ax.set_title(n, fontsize=8)
    fig.suptitle("activated parameters per row and task (empirical Fisher)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "fisher_rows.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(1, len(tasks) + 1), total_k)
    ax.set_xlabel("number of tasks activating a parameter")
    ax.set_ylabel("parameters")
    fig.tight_layout()
    fig.savefig(out / "fisher_sharing.png", dpi=120)
    plt.close(fig)
    np.savez_compressed(out / "fisher.npz", tasks=np.array(tasks), **arrays)
    with open(out / "fisher_shared_by_k.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["k_tasks", *params])
        for k in range(len(tasks)):
            w.writerow([k + 1, *[int(arrays[f"{n}.shared_by_k_tasks"][k]) for n in params]])
    return {"tasks": tasks, "layers": idx, "matrices": summary}


def run_experts(cfg: AnalyzeConfig, out: Path, device) -> Dict:

    model, tok, method = load_trained(cfg.analysis.run_dir, Path(cfg.paths.cache_dir).expanduser(),
                                      device=str(device))
    if not hasattr(method, "router_stats"):
        raise ConfigError(f"analysis.run_dir={cfg.analysis.run_dir!r} holds a "
                          f"{method.cfg.kind!r} run; experts needs loramoe or badit.")
    method.run_dir, method.stage_name = None, "analysis"
    data = _examples(cfg, tok, "eval", cfg.data.eval_split)
    tasks = list(data)
    with torch.no_grad():
        for t in tqdm(tasks, desc="experts"):
            method.start_eval(t)
            for i in range(0, len(data[t]), cfg.analysis.batch_size):
                b = collate_eval(data[t][i: i + cfg.analysis.batch_size], tok.pad_token_id)
                model(**{k: v.to(device) for k, v in b.items()})
            method.end_eval(t)
    names = list(method.layers)
    layer = names[cfg.analysis.layer]
    W = np.array([method.router_stats["analysis"][t][layer] for t in tasks])
    k = method.cfg.top_k
    top = np.argsort(-W, axis=1)[:, :k]
    np.savez_compressed(out / "experts.npz", tasks=np.array(tasks), weights=W, top_k=top)
    with open(out / "experts.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", *[f"expert{j}" for j in range(W.shape[1])]])
        for t, row in zip(tasks, W):
            w.writerow([t, *[f"{v:.6f}" for v in row]])
    router_usage(out / "experts.png", tasks, W, k, title=f"{layer}: mean router weight")
    return {"tasks": tasks, "layer": layer, "top_k": top.tolist()}


def run(cfg: AnalyzeConfig, out: Path) -> Dict:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    name = cfg.analysis.name
    if name == "experts":
        res = run_experts(cfg, out, device)
    else:
        model, tok = load_model_and_tokenizer(cfg.model, Path(cfg.paths.cache_dir).expanduser(), device)
        fn = run_neurons if name == "neurons" else run_fisher
        res = fn(cfg, out, model, tok, device)
    res = {"analysis": name, **res, "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
           "provenance": provenance.collect()}
    atomic_write_json(out / f"{name}.json", res)
    return res


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="analyze")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        typed: AnalyzeConfig = OmegaConf.to_object(cfg)
        run(typed, out)
    except (ConfigError, DataError) as e:
        log.error("%s: %s", type(e).__name__, e)
        sys.exit(2)
    print(f"results: {out}")


def cli() -> None:
    """Turn the positional analysis name into the override Hydra expects."""
    if len(sys.argv) > 1 and "=" not in sys.argv[1] and not sys.argv[1].startswith("-"):
        sys.argv[1] = f"analysis.name={sys.argv[1]}"
    main()


if __name__ == "__main__":
    cli()
