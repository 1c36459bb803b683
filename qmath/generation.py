"""Sampling that matches what the loss scores: one explicit generation config, and one seed for every seeded draw.

A hub checkpoint's ``generation_config.json`` applies to every ``generate`` call that does not override it.
Qwen2.5-0.5B-Instruct's sets ``repetition_penalty: 1.1`` (and temperature 0.7, top_p 0.8, top_k 20), so rollouts
would be drawn from a penalised distribution while the ratio and the KL assume ``softmax(logits / T)``, and
"greedy" evaluation would be penalised too. Since transformers 5, an option a passed config leaves unset is still
filled from the model's, so qmath both passes a full config and strips the model's down to its token ids.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import GenerationConfig

# generate() options qmath sets from its own options: model.temperature, model.max_completion_length, ...
OWN = {"do_sample": "greedy evaluation and sampled rollouts are chosen by qmath",
       "temperature": "model.temperature", "top_p": "model.top_p", "top_k": "model.top_k",
       "max_new_tokens": "model.max_completion_length", "max_length": "model.max_completion_length",
       "eos_token_id": "the tokenizer's and the model's EOS ids", "pad_token_id": "the tokenizer's pad token",
       "num_return_sequences": "model.num_generations", "num_beams": "sampling (beam search is not GRPO)",
       "return_dict_in_generate": "qmath, which reads the token ids generate returns"}
# generate() options that leave the distribution of the sampled tokens alone
HARMLESS = {"use_cache", "cache_implementation", "cache_config", "compile_config", "disable_compile",
            "prefill_chunk_size"}

ROLLOUT, PROMPTS, MAJ_K = 0, 1, 2  # what a seeded draw is for: see seed_for


def check_generation_kwargs(generation_kwargs: dict[str, Any] | None) -> list[str]:
    """The extra ``generate`` options that change the sampled distribution; an error for one qmath sets itself.

    >>> check_generation_kwargs({"use_cache": True, "repetition_penalty": 1.1, "min_new_tokens": 8})
    ['min_new_tokens', 'repetition_penalty']
    """
    options = dict(generation_kwargs or {})
    owned = sorted(options.keys() & OWN.keys())
    if owned:
        raise ValueError(f"model.generation_kwargs: {', '.join(owned)} set by qmath from "
                         f"{'; '.join(OWN[k] for k in owned)}: set that instead")
    return sorted(options.keys() - HARMLESS)


def generation_config(
    *, max_new_tokens: int, eos_token_id: list[int], pad_token_id: int | None, greedy: bool,
    temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
    generation_kwargs: dict[str, Any] | None = None,
) -> GenerationConfig:
    """Greedy decoding, or sampling from ``softmax(logits / temperature)`` (with top-p and top-k if set), and
    nothing else: no repetition penalty or other logits processor unless ``generation_kwargs`` (rollouts only)
    asks for one."""
    neutral = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
               "eta_cutoff": 0.0, "min_length": 0, "encoder_repetition_penalty": 1.0,
               "encoder_no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1}
    chosen = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p,
                                                  "top_k": top_k or 0, **(generation_kwargs or {})}
    if "min_new_tokens" in chosen:
        del neutral["min_length"]  # transformers warns when both are set
    return GenerationConfig(**{**neutral, "max_new_tokens": max_new_tokens, "eos_token_id": eos_token_id,
                               "pad_token_id": pad_token_id, "use_cache": True, **chosen})


def ids_only(config: GenerationConfig) -> GenerationConfig:
    """A model's generation config reduced to its special token ids, which are all qmath takes from it."""
    return GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                            pad_token_id=config.pad_token_id, decoder_start_token_id=config.decoder_start_token_id)


def seed_for(step: int, rank: int, round_: int = 0, stream: int = ROLLOUT) -> int:
    """The seed of one seeded draw: a pure function of ``seed_everything``'s seed, the step, the rank, the
    sampling round and what is drawn (``ROLLOUT`` completions, ``PROMPTS`` for dynamic sampling, ``MAJ_K``
    samples), so that ranks draw independently and a resumed run draws exactly as the uninterrupted one.

    >>> seed_for(3, 1) != seed_for(3, 0) != seed_for(4, 0) != seed_for(3, 0, stream=PROMPTS)
    True
    """
    seed = ((int(os.environ.get("PL_GLOBAL_SEED", 0)) * 1_000_003 + step) * 1009 + rank) * 101 + round_
    return (seed if stream == ROLLOUT else seed * 4 + stream) % 2**63
