"""Natural-instructions benchmarks: loading, prompts, tokenisation, batching.

Any benchmark in the natural-instructions format works: a root folder with one sub-folder per
task holding ``<split>.json`` (an object with ``Definition`` and ``Instances``).
"""

from badit_exp.data.prompts import build_prompt  # noqa: F401
from badit_exp.data.superni import (  # noqa: F401
    DataError,
    Instance,
    Task,
    check_disjoint,
    load_task,
    resolve_task_names,
    split_holdout,
    take,
)
