"""Every shim over transformers versions, in one place: what a KV cache argument is called, how a returned cache is
found and repeated, and how activation checkpointing is switched on and seen. When one of these moves again, this
is the file to change."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any


def returned_cache(output: Any) -> Any | None:
    """The KV cache a forward pass returned: ``cache`` since transformers 5, ``past_key_values`` before."""
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


def cache_states(cache: Any) -> list[tuple[Any, Any]]:
    """Each layer's ``(keys, values)`` of a dynamic KV cache: its ``layers`` since transformers 4.54,
    ``key_cache``/``value_cache`` before."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def repeated_cache(output: Any, repeats: int) -> Any | None:
    """The KV cache a forward pass returned, each row repeated ``repeats`` times; ``None`` if it returned none (or
    one of a class that cannot repeat its rows)."""
    cache = returned_cache(output)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(repeats)
    return cache


def cache_argument(model: Any) -> str:
    """What the model's forward calls its KV cache: ``cache`` since transformers 5.x, ``past_key_values`` before.
    A PEFT model's forward takes ``**kwargs``: its base model's says."""
    forward = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def enable_activation_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing (``activation_checkpointing_enable`` since transformers 5.x;
    ``gradient_checkpointing_enable``, now deprecated, before), and no KV cache in training."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def checkpointing_can_keep_cache() -> bool:
    """Whether a checkpointed layer can be handed a KV cache: the ``_can_checkpoint_with_cache`` switch of
    transformers 5.15 and later (``qmath.versions.PROMPT_SHARING_TRANSFORMERS``; private: tests/test_private_apis.py
    says when it is gone). Before it, a checkpointed layer silently
    drops the cache it is given, so a completion would lose its prompt; callers then keep the plain path."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")


@contextlib.contextmanager
def cache_kept_under_checkpointing(model: Any) -> Iterator[None]:
    """Checkpointed layers keep the KV cache they are given (``_can_checkpoint_with_cache``, set on each layer and
    taken back afterwards). Only for caches whose ``update`` gives the same states when the backward pass replays a
    layer: see :mod:`qmath.logprobs`' ``PromptCache`` and ``GroupCache``."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache


def is_activation_checkpointing(model: Any) -> bool:
    """Whether activations are recomputed in backward (which turns the KV cache off in training)."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x's name
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    return bool(checkpointing)


@contextlib.contextmanager
def without_input_require_grads(model: Any) -> Iterator[None]:
    """Without the forward hook that activation checkpointing puts on the input embeddings (it calls
    ``requires_grad_`` on their output, which a full-graph ``torch.compile`` cannot trace), put back afterwards."""
    hooked = bool(getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None))
    if hooked:
        model.disable_input_require_grads()
    try:
        yield
    finally:
        if hooked:
            model.enable_input_require_grads()
