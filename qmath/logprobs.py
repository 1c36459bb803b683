"""Per-token log-probs of a rollout's completions under a model, at the sampling temperature.

From the last hidden states in chunks (``qmath.grpo.chunked_token_logps``), never from a ``[B, T, V]`` logits
tensor, with each prompt run once for its group of G completions; models whose logits are not a plain linear head
of the hidden states keep the full-logits path.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from qmath.compat import (
    cache_argument,
    cache_kept_under_checkpointing,
    checkpointing_can_keep_cache,
    is_activation_checkpointing,
)
from qmath.decoding import grouped
from qmath.grpo import chunked_token_logps, selective_log_softmax
from qmath.rollout import Rollout


def token_logps(model: Any, rollout: Rollout, temperature: float, group: int, linear_head: bool,
                entropy: bool = False, entropy_grad: bool = False, top_k: int | None = None,
                top_p: float = 1.0) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probs of the completion tokens under ``model`` at ``temperature``, ``[B, T]``; with ``entropy``, also
    each token's entropy at that temperature (with a gradient if ``entropy_grad``), from the same logits.

    ``linear_head``: the logits are ``output_embeddings(decoder(x))`` (:func:`head_is_linear`), so they can be
    made a chunk at a time from the hidden states. ``top_k``, ``top_p``: the sampling's truncation, replayed on
    ``model``'s own logits, so that the log-probs are over the tokens it keeps, as the sampler's are
    (:func:`qmath.grpo.truncated_away`); the entropy stays over the whole vocabulary.
    """
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    # Left padding shifts positions; derive them from the mask exactly as `generate` does.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    width = rollout.completion_ids.size(1)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
              "use_cache": False}
    if linear_head:  # never materialise [B, T, V] logits: see chunked_token_logps
        hidden = None
        if groups_share_prompts(model, rollout.prompt_ids, group, rollout.prompt_mask):
            hidden = shared_prompt_hidden(model.get_decoder(), rollout, position_ids, group)
        if hidden is None:
            hidden = model.get_decoder()(**inputs).last_hidden_state[:, -width - 1:-1]
        head = model.get_output_embeddings()
        return chunked_token_logps(hidden, head.weight, rollout.completion_ids, temperature, head.bias,
                                   entropy=entropy, entropy_grad=entropy_grad, top_k=top_k, top_p=top_p)
    logits = model(**inputs, logits_to_keep=width + 1).logits[:, :-1]
    return selective_log_softmax(logits, rollout.completion_ids, temperature, entropy=entropy,
                                 entropy_grad=entropy_grad, top_k=top_k, top_p=top_p)


def groups_share_prompts(model: Any, prompt_ids: Tensor, g: int, prompt_mask: Tensor | None = None) -> bool:
    """Whether each run of ``g`` rows holds one prompt, and the model can run a prompt once for its group.

    Under activation checkpointing that needs transformers' ``_can_checkpoint_with_cache`` (before it, checkpointed
    layers drop the cache), so older versions keep the plain path there.
    """
    return grouped(prompt_ids, g, prompt_mask) and (not is_activation_checkpointing(model)
                                                    or checkpointing_can_keep_cache())


class PromptCache(DynamicCache):
    """The prompts' KV cache, written once per layer.

    Activation checkpointing replays each layer's forward in the backward pass; a ``DynamicCache`` would append the
    prompt's states a second time there, so a replay gets back the states it recomputed and the cache stays as the
    first pass left it (which is what the completions read).
    """

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if layer_idx < len(self.layers) and self.layers[layer_idx].get_seq_length() > 0:
            return key_states, value_states
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class GroupCache(DynamicCache):
    """Each prompt's cache repeated for its G completions, read and never written: a layer attends over the prompt's
    states followed by its own, on the first pass and on checkpointing's replay alike. The repeat is a differentiable
    copy, so the gradient of every completion reaches its prompt's activations."""

    def __init__(self, prompt: DynamicCache, g: int):
        super().__init__(ddp_cache_data=[(layer.keys.repeat_interleave(g, dim=0),
                                          layer.values.repeat_interleave(g, dim=0)) for layer in prompt.layers])

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


def shared_prompt_hidden(decoder: Any, rollout: Rollout, position_ids: Tensor, g: int) -> Tensor | None:
    """The last hidden states before each completion token, ``[B, T, H]``, with each prompt run once per group;
    ``None`` where the model's cache is not one plain full-attention cache (sliding windows and hybrid layers keep
    the plain path).

    The G completions of a prompt share its forward pass: the prompt runs once, its KV cache is repeated for the G
    completions, and only the completion tokens run G times. With prompts of 160 tokens, completions of 96 and G = 4,
    that is half the tokens. Under activation checkpointing both passes are checkpointed layer by layer as usual;
    the two caches are written so that the backward replay sees the same states (see :class:`PromptCache`).
    """
    prompt_mask = rollout.prompt_mask
    width = prompt_mask.size(1)
    cache_kwarg = cache_argument(decoder)
    prompts = PromptCache(config=decoder.config)
    if any(type(layer) is not DynamicLayer for layer in prompts.layers):
        return None
    with contextlib.ExitStack() as stack:
        if is_activation_checkpointing(decoder):
            stack.enter_context(cache_kept_under_checkpointing(decoder))
        # use_cache=False: the layers still read and write the cache they are handed, and transformers does not
        # warn that checkpointing turns caching off
        prompt = decoder(input_ids=rollout.prompt_ids[::g], attention_mask=prompt_mask[::g],
                         position_ids=position_ids[::g, :width], use_cache=False, **{cache_kwarg: prompts})
        completion = decoder(input_ids=rollout.completion_ids,
                             attention_mask=torch.cat([prompt_mask, rollout.completion_mask], dim=1),
                             position_ids=position_ids[:, width:], use_cache=False,
                             **{cache_kwarg: GroupCache(prompts, g)})
    last_prompt = prompt.last_hidden_state[:, -1:].repeat_interleave(g, dim=0)  # predicts the first token
    return torch.cat([last_prompt, completion.last_hidden_state[:, :-1]], dim=1)


@torch.no_grad()
def head_is_linear(model: Any) -> bool:
    """Whether the logits are exactly ``output_embeddings(decoder(x))``, checked on four tokens.

    Most causal LMs are; some scale or soft-cap the logits after the head (Gemma 2, Cohere), and those keep the
    full-logits path.
    """
    head = model.get_output_embeddings()
    scaled = any(getattr(model.config, a, None) not in (None, 1, 1.0)
                 for a in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    if not isinstance(head, torch.nn.Linear) or model.get_decoder() is model or scaled:
        return False
    was_training = model.training
    model.eval()  # dropout would make the two paths differ
    try:
        ids = torch.arange(4, device=head.weight.device)[None] % head.out_features
        logits = model(input_ids=ids, use_cache=False).logits
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        return torch.allclose(head(hidden), logits, rtol=1e-3, atol=1e-3)
    finally:
        model.train(was_training)
