"""Stage planning: which tasks each stage trains and evaluates (SPEC section 2).

* ``mixed``: one stage, all tasks' training sets shuffled together; evaluate all tasks.
* ``sequential``: one stage per task in the task order; the adapter carries over, the optimizer
  and schedule restart; after each stage evaluate all tasks -> the T x T matrix.
* ``single``: one stage per task, each from the pristine base model; evaluate that task only
  -> a_{t,0} for ``forward``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List

from badit_exp.config import Config, ConfigError
from badit_exp.data.superni import resolve_task_names


@dataclass
class Stage:
    name: str
    train_tasks: List[str]
    eval_tasks: List[str]
    fresh_model: bool  # start from the pristine base model (single mode, first stage)


def task_order(cfg: Config) -> List[str]:
    """The sequential order: the configured list, Table 5's order for the seed (composed into
    ``task_order.by_seed`` by Hydra), or a seeded shuffle for ``random``."""
    tasks = list(cfg.data.tasks)
    if cfg.task_order.random:
        rng = random.Random(cfg.seed)
        rng.shuffle(tasks)
        return tasks
    names = cfg.task_order.order
    if cfg.task_order.from_seed:
        names = cfg.task_order.order_for_seed(cfg.seed)
    order = resolve_task_names(names, tasks, f"task_order={cfg.task_order.name}",
                               skip_unknown=cfg.task_order.restrict_to_data_tasks)
    if len(order) != len(tasks):
        missing = [t for t in tasks if t not in order]
        raise ConfigError(f"task_order={cfg.task_order.name} leaves out {missing} of data.tasks; "
                          "a sequential order must list every task once (or use "
                          "task_order=random).")
    return order


def plan_stages(cfg: Config) -> List[Stage]:
    """The stages of ``cfg.training_mode``, in training order."""
    mode = cfg.training_mode.name
    tasks = list(cfg.data.tasks)
    if mode == "mixed":
        return [Stage("mixed", tasks, tasks, True)]
    order = task_order(cfg) if mode == "sequential" else tasks
    if mode == "sequential":
        return [Stage(t, [t], order, i == 0) for i, t in enumerate(order)]
    return [Stage(t, [t], [t], True) for t in order]
