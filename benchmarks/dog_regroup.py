"""DOG benchmarks (issue 12): the solver on planted groups, and the critical-path cost of one
regroup of 36 Qwen3-8B-shaped gate_proj layers (K = 8, r = 4: 32 components, D = 4096 + 12288).

    python benchmarks/dog_regroup.py planted  [--layers 8] [--out benchmarks/results/dog_solver_planted.json]
    python benchmarks/dog_regroup.py regroup  [--device cuda] [--out benchmarks/results/dog_regroup_<device>.json]

``planted``: at each noise level, the objective sum_k ||sum_{i in k} u_i||^2 and the adjusted
Rand index against the planted truth of the ``search`` solver (default), the ``paper`` solver
(orthogonalised centroids + Hungarian), scikit-learn K-means with 10 restarts + an exact
balanced fix-up (the authors' approach, corrected) and the truth; plus the time of the batched
solver against scikit-learn layer by layer (one thread each).

``regroup``: what one regroup adds to the training stream. Synchronous (dog.overlap=off): plan
(Gram matrices) + solve + apply (permute parameters, gradients, Adam moments). Overlapped
(dog.overlap=on): plan at the trigger step, solve in a worker thread while the next step runs
(simulated by a sleep), apply at the next step: the critical path is plan + apply. Each timed
call ends with a device synchronisation, so GPU work is counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from badit_exp import provenance  # noqa: E402
from badit_exp.methods.badit import Badit, BaditConfig, DOGConfig  # noqa: E402
from badit_exp.methods.dog_solver import (  # noqa: E402
    compare_on_planted,
    kmeans_reference,
    planted,
    search_assign,
    unit,
)


class _Experts(nn.Module):
    """The parts of a mixture layer DOG touches (no base weight: it is not read)."""

    def __init__(self, d_in, d_out, K, r, device):
        super().__init__()
        self.rank, self.num_experts = r, K
        self.lora_A = nn.Parameter(torch.randn(K * r, d_in, device=device) * 0.01)
        self.lora_B = nn.Parameter(torch.randn(d_out, K * r, device=device) * 0.01)
        self.router_weight = nn.Parameter(torch.randn(K, d_in, device=device) * 0.01)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def regroup_bench(device: str, layers: int, d_in: int, d_out: int, repeats: int,
                  next_step_s: float) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    K, r = 8, 4
    out = {"layers": layers, "d_in": d_in, "d_out": d_out, "K": K, "r": r, "device": str(dev)}
    for mode in ("off", "on"):
        cfg = BaditConfig(name="badit", kind="badit", num_experts=K, top_k=K, rank=r,
                          dog=DOGConfig(overlap=mode))
        m = Badit(cfg)
        m.layers = {f"model.layers.{i}.mlp.gate_proj": _Experts(d_in, d_out, K, r, dev)
                    for i in range(layers)}
        params = [p for l in m.layers.values() for p in (l.lora_A, l.lora_B)]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def fresh_grads(params=params):
            for p in params:
                p.grad = torch.randn_like(p)

        fresh_grads()
        opt.step()  # moments exist
        times, submit, apply = [], [], []
        for i in range(repeats + 1):
            fresh_grads()
            _sync(dev)
            if mode == "off":
                t0 = time.perf_counter()
                m.regroup(opt)
                _sync(dev)
                t = time.perf_counter() - t0
                if i:
                    times.append(t)
            else:
                t0 = time.perf_counter()
                m._submit(opt, step=i, epoch=0)
                _sync(dev)
                t1 = time.perf_counter()
                time.sleep(next_step_s)  # the next forward/backward runs meanwhile
                t2 = time.perf_counter()
                m._apply_pending(opt, step=i + 1, epoch=0)
                _sync(dev)
                t3 = time.perf_counter()
                if i:
                    submit.append(t1 - t0)
                    apply.append(t3 - t2)
                    times.append((t1 - t0) + (t3 - t2))
        key = "sync" if mode == "off" else "overlap"
        out[f"{key}_critical_path_ms"] = 1e3 * statistics.median(times)
        if mode == "on":
            out["overlap_plan_ms"] = 1e3 * statistics.median(submit)
            out["overlap_apply_ms"] = 1e3 * statistics.median(apply)
            out["overlap_simulated_next_step_s"] = next_step_s
    # the solver alone on these Gram matrices
    g = torch.randn(layers, K * r, d_in + d_out, device=dev)
    u = unit(g)
    G = (u @ u.transpose(1, 2)).double()
    ts = []
    for i in range(repeats + 1):
        _sync(dev)
        t0 = time.perf_counter()
        search_assign(G, K)
        _sync(dev)
        if i:
            ts.append(time.perf_counter() - t0)
    out["solver_only_ms"] = 1e3 * statistics.median(ts)
    return out


def planted_bench(layers: int, D: int) -> dict:
    torch.set_num_threads(1)
    rows = [compare_on_planted(noise, layers=layers, D=D) for noise in (1, 2, 4, 6, 8)]
    K = 8
    grads, _ = planted(layers, K, 4, D, 4.0, seed=3)
    u = unit(grads)
    t0 = time.perf_counter()
    search_assign((u @ u.transpose(1, 2)).double(), K)
    ours = time.perf_counter() - t0
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    with threadpool_limits(1):
        kmeans_reference(u, K)
    ref = time.perf_counter() - t0
    return {"layers_per_noise_level": layers, "D": D, "K": K, "r": 4, "rows": rows,
            "search_s": ours, "sklearn_kmeans_layer_by_layer_s": ref, "speedup": ref / ours,
            "threads": 1}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["planted", "regroup"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--next-step-s", type=float, default=0.3,
                   help="simulated duration of the step the overlapped solve hides behind")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.what == "planted":
        res = planted_bench(a.layers or 8, 16384)
        out = a.out or Path("benchmarks/results/dog_solver_planted.json")
    else:
        res = regroup_bench(a.device, a.layers or 36, 4096, 12288, a.repeats, a.next_step_s)
        out = a.out or Path(f"benchmarks/results/dog_regroup_{res['device'].split(':')[0]}.json")
    res["provenance"] = provenance.collect()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    shown = {k: v for k, v in res.items() if k != "provenance"}
    print(json.dumps(shown, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
