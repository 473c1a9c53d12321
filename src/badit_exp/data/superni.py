"""Reading natural-instructions task files, with errors that name the file and the problem.

Format quirks handled (see the SuperNI README): ``output`` is a list of references in most
tasks but a bare string in some; ``Definition`` is a list of one string (a bare string is
accepted too); references may carry surrounding spaces (kept for scoring, stripped for the
training target).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A benchmark file is missing or malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class Instance:
    id: str
    input: str
    outputs: tuple  # all references (best score over them at evaluation)
    # False when the file gave no id and the loader made one up (``<task>-<split>-<index>``):
    # such an id names a position, not an example, so it never counts as a repeat
    id_given: bool = True


@dataclass(frozen=True)
class Task:
    name: str
    definition: str
    instances: tuple  # of Instance


def resolve_task_names(names: Sequence[str], known: Sequence[str], key: str,
                       skip_unknown: bool = False) -> List[str]:
    """Map task ids (``591``, ``task591``) or full folder names to names in ``known``.

    Raises DataError naming ``key`` for an unknown (unless ``skip_unknown``) or ambiguous
    entry, and for duplicates.
    """
    out: List[str] = []
    for raw in names:
        s = str(raw)
        if s in known:
            out.append(s)
            continue
        prefix = s if s.startswith("task") else f"task{s}"
        hits = [k for k in known if k == prefix or k.startswith(prefix + "_")]
        if not hits and skip_unknown:
            continue
        if len(hits) != 1:
            what = "matches no task" if not hits else f"is ambiguous ({hits})"
            raise DataError(f"{key}: {raw!r} {what} in data.tasks={list(known)}; use a task id "
                            "such as 591 or a full folder name listed in data.tasks.")
        out.append(hits[0])
    dups = sorted({t for t in out if out.count(t) > 1})
    if dups:
        raise DataError(f"{key} names {dups} more than once; each task must appear once.")
    return out


def _as_text(value, path: Path, what: str) -> str:
    if isinstance(value, list) and len(value) >= 1 and all(isinstance(v, str) for v in value):
        return value[0]
    if isinstance(value, str):
        return value
    raise DataError(f"{path}: {what} must be a string or a list of strings, got {value!r:.80}")


def load_task(root: str | Path, name: str, split: str, max_instances: int | None = None,
              drop_empty: bool = True) -> Task:
    """Load ``root/name/split.json``; keep the first ``max_instances`` instances (file order).

    An instance without an ``output`` field, or with an empty list, is an error. One whose
    references are all empty strings (SuperNI's task511 train split has six) is dropped with a
    warning when ``drop_empty`` (training on it would teach an immediate EOS), else kept.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root={str(root)!r} is not a directory (resolved from "
                        f"{Path.cwd()}); point data.root at the benchmark folder.")
    folder = root / name
    if not folder.is_dir():
        avail = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(f"unknown task {name!r}: no folder {folder}. Tasks under data.root: "
                        f"{avail[:20]}{' ...' if len(avail) > 20 else ''}")
    path = folder / f"{split}.json"
    if not path.is_file():
        raise DataError(f"{path} is missing (task {name!r} has no {split!r} split).")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object with 'Definition' and 'Instances'.")
    if "Definition" not in raw:
        raise DataError(f"{path}: no 'Definition' field.")
    definition = _as_text(raw["Definition"], path, "'Definition'").strip()
    items = raw.get("Instances")
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: task {name!r} has no instances ('Instances' is missing or empty).")
    instances, dropped = [], 0
    for i, it in enumerate(items):
        if max_instances and len(instances) >= max_instances:
            break
        if not isinstance(it, dict) or "input" not in it:
            raise DataError(f"{path}: instance #{i} has no 'input'.")
        out = it.get("output")
        refs = [out] if isinstance(out, str) else out
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise DataError(f"{path}: instance #{i} (id {it.get('id', '?')!r}) has no output "
                            f"(got {out!r:.60}).")
        if drop_empty and not any(r.strip() for r in refs):
            dropped += 1
            continue
        given = it.get("id") is not None
        # a made-up id carries the split, so train #3 and test #3 never share one
        instances.append(Instance(id=str(it["id"]) if given else f"{name}-{split}-{i}",
                                  input=str(it["input"]), outputs=tuple(refs), id_given=given))
    if dropped:
        log.warning("%s: dropped %d instance(s) whose references are all empty", path, dropped)
    if not instances:
        raise DataError(f"{path}: task {name!r} has no usable instances.")
    return Task(name=name, definition=definition, instances=tuple(instances))


def take(task: Task, n: Optional[int]) -> Task:
    """The first ``n`` instances of ``task`` (all of them when ``n`` is None or 0)."""
    return Task(task.name, task.definition, task.instances[:n] if n else task.instances)


def split_holdout(task: Task, n: int, seed: int, path: Path | str = "") -> Tuple[Task, Task]:
    """Carve a fixed hold-out of ``n`` instances out of a training split (SPEC section 9.1).

    The hold-out is a seeded sample (``random.Random(f"{seed}:{task.name}")``) that depends only
    on ``seed``, the task's name and its instances, never on the run's seed or method, so every
    run of a study sees the same one; both parts keep file order.

    Returns:
        (the instances that may be trained on, the hold-out)
    """
    if n <= 0:
        return task, Task(task.name, task.definition, ())
    if n >= len(task.instances):
        raise DataError(f"{path or task.name}: data.holdout_per_task={n} leaves nothing to train "
                        f"on (task {task.name!r} has {len(task.instances)} usable training "
                        "instances); lower data.holdout_per_task.")
    chosen = set(random.Random(f"{seed}:{task.name}").sample(range(len(task.instances)), n))
    rest = tuple(x for i, x in enumerate(task.instances) if i not in chosen)
    held = tuple(x for i, x in enumerate(task.instances) if i in chosen)
    return (Task(task.name, task.definition, rest), Task(task.name, task.definition, held))


def check_disjoint(trainable: Task, evaluated: Task, train_file: Path | str,
                   eval_file: Path | str) -> None:
    """Refuse to evaluate on an instance a run may train on.

    An instance counts as the same when both files give it the same id, or when its input text
    is identical (ids can be missing or renumbered; identical inputs are the same example either
    way). An id the loader made up for an instance without one names a position, not an
    example, so a benchmark without ids is checked by input alone. ``trainable``
    is every instance the run may draw training data from, not only the ones a small budget
    uses, so a benchmark whose test split repeats training instances is refused too.

    Raises:
        DataError: naming the task, both files and the shared ids.
    """
    ids = {x.id for x in trainable.instances if x.id_given}
    inputs = {x.input: x.id for x in trainable.instances}
    clash = [x for x in evaluated.instances if (x.id_given and x.id in ids) or x.input in inputs]
    if clash:
        def name(x: Instance) -> str:
            if x.input not in inputs:
                return x.id  # the same id in both files
            t = inputs[x.input]
            return (f"{x.id}{'' if t == x.id else f' (= train {t})'}"
                    f" input {x.input[:60]!r}{'...' if len(x.input) > 60 else ''}")
        shown = ", ".join(name(x) for x in clash[:10])
        raise DataError(
            f"task {trainable.name!r}: {len(clash)} evaluation instance(s) of {eval_file} are also "
            f"training instances of {train_file} (same id or identical input): {shown}"
            f"{' ...' if len(clash) > 10 else ''}. Evaluating on trained data inflates every "
            "score: fix the benchmark's splits, or evaluate on data.eval_split=holdout with "
            "data.holdout_per_task > 0.")
