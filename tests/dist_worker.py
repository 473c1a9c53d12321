"""One training run under a multi-process launch, for tests/test_distributed.py.

    torchrun --nproc_per_node 2 tests/dist_worker.py OUT RUN_DIR CRASH_AT override ...

Runs :class:`badit_exp.training.runner.Runner` with the Hydra overrides, then every rank writes
the adapter it holds to ``OUT/rank<r>.safetensors``. ``CRASH_AT`` > 0 makes every rank die
right after that many optimizer steps (a killed job), to test resumption.
"""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from badit_exp import dist as D
from badit_exp.compose import load
from badit_exp.methods.base import Method
from badit_exp.training.runner import Runner


def main() -> None:
    out, run_dir, crash_at, overrides = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), \
        sys.argv[4:]
    torch.set_num_threads(1)
    cfg = load(overrides)
    if crash_at:
        calls = {"n": 0}
        orig = Method.after_optimizer_step

        def crash(self, model, opt):
            orig(self, model, opt)
            calls["n"] += 1
            if calls["n"] == crash_at:
                os._exit(17)  # like a kill: no clean-up, no flush of anything in flight

        Method.after_optimizer_step = crash
    runner = Runner(cfg, run_dir)
    result = runner.run()
    out.mkdir(parents=True, exist_ok=True)
    state = runner.method.state_dict(runner.model)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"rank{D.rank()}.safetensors"))
    assert (result is None) == (D.rank() > 0)
    D.shutdown()


if __name__ == "__main__":
    main()
