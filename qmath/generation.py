"""Sampling that matches what the loss scores: the ``Sampler`` (no Lightning here), its explicit generation config,
and one seed for every seeded draw.

A hub checkpoint's ``generation_config.json`` applies to every ``generate`` call that does not override it.
Qwen2.5-0.5B-Instruct's sets ``repetition_penalty: 1.1`` (and temperature 0.7, top_p 0.8, top_k 20), so rollouts
would be drawn from a penalised distribution while the ratio and the KL assume ``softmax(logits / T)``, and
"greedy" evaluation would be penalised too. Since transformers 5, an option a passed config leaves unset is still
filled from the model's, so qmath both passes a full config and strips the model's down to its token ids.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig

from qmath.compat import cache_argument, repeated_cache
from qmath.grpo import completion_mask
from qmath.rollout import Rollout

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


class Sampler:
    """Completions of a causal LM, greedy or sampled from ``softmax(logits / temperature)``: what the loss scores.

    Rows of ``input_ids`` that come in runs of ``group`` copies of one prompt have that prompt prefilled once per run
    (its KV cache repeated), with the same completions as without. Dropout is off while sampling.
    """

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int | None = None, generation_kwargs: dict[str, Any] | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        ids = model.generation_config.eos_token_id
        self.eos_ids = [ids] if isinstance(ids, int) else list(ids or [])
        if tokenizer.eos_token_id not in self.eos_ids:
            self.eos_ids.append(tokenizer.eos_token_id)
        options = {"max_new_tokens": max_new_tokens, "eos_token_id": self.eos_ids,
                   "pad_token_id": tokenizer.pad_token_id}
        self.greedy_config = generation_config(**options, greedy=True)
        self.sampling_config = generation_config(**options, greedy=False, temperature=temperature, top_p=top_p,
                                                 top_k=top_k, generation_kwargs=generation_kwargs)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, greedy: bool = False,
                 group: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """Completion ids, their mask (through the first EOS) and which completions ended with an EOS."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                      generation_config=self.greedy_config if greedy else self.sampling_config,
                                      **shared_prefill(self.model, input_ids, attention_mask, group))
        finally:
            self.model.train(was_training)
        completion_ids = out[:, input_ids.size(1):]
        mask, terminated = completion_mask(completion_ids, self.eos_ids)
        return completion_ids, mask, terminated

    def generate_seeded(self, input_ids: Tensor, attention_mask: Tensor, seed: int,
                        group: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """Sampled completions drawn from a generator seeded with ``seed``; the global RNGs are left as they were."""
        devices = [input_ids.device] if input_ids.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self.generate(input_ids, attention_mask, group=group)

    def decode(self, completion_ids: Tensor, mask: Tensor, prefixes: Sequence[str] | None) -> list[str]:
        """The completions' text, each after its response prefix (which was fed as prompt tokens)."""
        texts = self.tokenizer.batch_decode([ids[m.bool()] for ids, m in zip(completion_ids, mask)],
                                            skip_special_tokens=True)
        return [p + t for p, t in zip(prefixes, texts)] if prefixes else texts

    def rollout(self, batch: dict[str, Any], group: int, seed: int) -> Rollout:
        """``group`` sampled completions per prompt of ``batch``, adjacent."""
        prompt_ids = batch["input_ids"].repeat_interleave(group, dim=0)
        prompt_mask = batch["attention_mask"].repeat_interleave(group, dim=0)
        completion_ids, mask, terminated = self.generate_seeded(prompt_ids, prompt_mask, seed, group=group)
        columns = {k: [v for v in values for _ in range(group)] for k, values in batch.items()
                   if isinstance(values, list)}
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                       completion_mask=mask, terminated=terminated,
                       texts=self.decode(completion_ids, mask, columns.get("prefix")), columns=columns)

    def answer(self, batch: dict[str, Any], samples: int = 0, seed: int = 0) -> tuple[list[str], Tensor]:
        """Greedy completions of the batch's prompts (or ``samples`` sampled ones each, seeded), and their lengths."""
        input_ids, attention_mask, prefixes = batch["input_ids"], batch["attention_mask"], batch.get("prefix")
        if not samples:
            completion_ids, mask, _ = self.generate(input_ids, attention_mask, greedy=True)
            return self.decode(completion_ids, mask, prefixes), mask.sum(dim=1)
        completion_ids, mask, _ = self.generate_seeded(input_ids.repeat_interleave(samples, dim=0),
                                                       attention_mask.repeat_interleave(samples, dim=0), seed,
                                                       group=samples)
        prefixes = [p for p in prefixes for _ in range(samples)] if prefixes else None
        return self.decode(completion_ids, mask, prefixes), mask.sum(dim=1)


def grouped(prompt_ids: Tensor, g: int) -> bool:
    """Whether the rows come in runs of ``g`` copies of one prompt."""
    rows = prompt_ids.size(0)
    if g < 2 or rows % g:
        return False
    runs = prompt_ids.view(rows // g, g, -1)
    return bool((runs == runs[:, :1]).all())


@torch.no_grad()
def shared_prefill(model: Any, input_ids: Tensor, attention_mask: Tensor, group: int) -> dict[str, Any]:
    """``generate`` arguments that start it from a KV cache of each prompt, computed once per group of copies.

    The cache covers all but each prompt's last token, which ``generate`` then runs itself (it needs one token to
    start from). ``{}`` when the rows are not groups of one prompt or the model returns no cache.
    """
    if input_ids.size(1) < 2 or not grouped(input_ids, group):  # (generation runs in eval: a cache either way)
        return {}
    ids, mask = input_ids[::group, :-1], attention_mask[::group, :-1]
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1)
    cache = repeated_cache(out, group)
    return {cache_argument(model): cache} if cache is not None else {}
