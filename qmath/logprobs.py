"""Per-token log-probs of a rollout's completions under a model, at the sampling temperature.

From the last hidden states in chunks (``qmath.grpo.chunked_token_logps``), never from a ``[B, T, V]`` logits
tensor, with each prompt run once for its group of G completions; models whose logits are not a plain linear head
of the hidden states keep the full-logits path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qmath.compat import cache_argument, is_activation_checkpointing, repeated_cache
from qmath.generation import grouped
from qmath.grpo import chunked_token_logps, selective_log_softmax
from qmath.rollout import Rollout


def token_logps(model: Any, rollout: Rollout, temperature: float, group: int, linear_head: bool) -> Tensor:
    """Log-probs of the completion tokens under ``model`` at ``temperature``, ``[B, T]``.

    ``linear_head``: the logits are ``output_embeddings(decoder(x))`` (:func:`head_is_linear`), so they can be
    made a chunk at a time from the hidden states.
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
        if groups_share_prompts(model, rollout.prompt_ids, group):
            hidden = shared_prompt_hidden(model.get_decoder(), rollout, position_ids, group)
        if hidden is None:
            hidden = model.get_decoder()(**inputs).last_hidden_state[:, -width - 1:-1]
        head = model.get_output_embeddings()
        return chunked_token_logps(hidden, head.weight, rollout.completion_ids, temperature, head.bias)
    logits = model(**inputs, logits_to_keep=width + 1).logits[:, :-1]
    return selective_log_softmax(logits, rollout.completion_ids, temperature)


def groups_share_prompts(model: Any, prompt_ids: Tensor, g: int) -> bool:
    """Whether each run of ``g`` rows holds one prompt, and the model can run a prompt once for its group.

    Activation checkpointing turns the KV cache off in training, so it keeps the plain path.
    """
    return not is_activation_checkpointing(model) and grouped(prompt_ids, g)


def shared_prompt_hidden(decoder: Any, rollout: Rollout, position_ids: Tensor, g: int) -> Tensor | None:
    """The last hidden states before each completion token, ``[B, T, H]``, with each prompt run once per group;
    ``None`` if the decoder returns no KV cache to share.

    The G completions of a prompt share its forward pass: the prompt runs once, its KV cache is repeated for the G
    completions (a differentiable copy, so the gradient still reaches the prompt's activations), and only the
    completion tokens run G times. With prompts of 160 tokens, completions of 96 and G = 4, that is half the tokens.
    """
    prompt_mask = rollout.prompt_mask
    width = prompt_mask.size(1)
    prompt = decoder(input_ids=rollout.prompt_ids[::g], attention_mask=prompt_mask[::g],
                     position_ids=position_ids[::g, :width], use_cache=True)
    cache = repeated_cache(prompt, g)
    if cache is None:
        return None
    completion = decoder(input_ids=rollout.completion_ids,
                         attention_mask=torch.cat([prompt_mask, rollout.completion_mask], dim=1),
                         position_ids=position_ids[:, width:], use_cache=True, **{cache_argument(decoder): cache})
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
