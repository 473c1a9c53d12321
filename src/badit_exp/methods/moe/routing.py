"""The routing context shared by every routed layer of a model, and the one forward pre-hook
that fills it (mixtures and GainLoRA alike)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn


@dataclass
class RoutingContext:
    """Per-forward information shared by every routed layer of a model.

    ``prompt_mask`` (batch x seq, 1 on prompt tokens: the attention mask minus the supervised
    target); ``sequence_mask`` (the attention mask); ``input_ids``; ``reuse`` is true on
    KV-cached decoding steps, where sequence-level routing reuses the prefill's decision;
    ``record`` switches on router statistics (evaluation); ``keep_gates`` keeps the last training
    forward's gates and probabilities for a balancing loss; ``extra`` holds what a method adds.
    """

    prompt_mask: Optional[torch.Tensor] = None
    sequence_mask: Optional[torch.Tensor] = None
    input_ids: Optional[torch.Tensor] = None
    reuse: bool = False
    record: bool = False
    keep_gates: bool = False
    # counts the model's non-decoding forwards: a layer recomputed by gradient checkpointing
    # sees its forward's id again (the rank-wise bias balancer counts each forward once)
    forward_id: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)


def attach_routing_hook(model: nn.Module, ctx: RoutingContext,
                        on_prefill: Optional[Callable[[RoutingContext], None]] = None):
    """Fill ``ctx`` before every forward of ``model``: the masks, the input ids and whether this
    is a cached decoding step; then call ``on_prefill(ctx)`` on every forward that is not a
    decoding step (a method computing its own routing from the prompt, e.g. GainLoRA's gates).

    Returns:
        The hook's handle (``.remove()`` detaches it).
    """

    def hook(module, args, kwargs):
        am = kwargs.get("attention_mask")
        labels = kwargs.get("labels")
        # the KV cache is `cache` in recent transformers, `past_key_values` in older ones
        pkv = kwargs.get("cache", kwargs.get("past_key_values"))
        ids = kwargs.get("input_ids", args[0] if args else None)
        past = 0
        if pkv is not None and hasattr(pkv, "get_seq_length"):
            past = int(pkv.get_seq_length())
        ctx.reuse = past > 0
        if ctx.reuse:
            return None
        ctx.forward_id += 1
        if am is None and ids is not None:
            am = torch.ones(ids.shape[:2], dtype=torch.long, device=ids.device)
        ctx.sequence_mask = am
        ctx.input_ids = ids
        if am is not None and labels is not None:
            ctx.prompt_mask = am * (labels == -100).to(am.dtype)
        else:
            ctx.prompt_mask = am
        if on_prefill is not None:
            on_prefill(ctx)
        return None

    return model.register_forward_pre_hook(hook, with_kwargs=True)
