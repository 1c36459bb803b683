"""Sampling that matches what the loss scores: the ``Sampler`` (no Lightning here), its explicit generation config,
and one seed for every seeded draw.

A hub checkpoint's ``generation_config.json`` applies to every ``generate`` call that does not override it.
Qwen2.5-0.5B-Instruct's sets ``repetition_penalty: 1.1`` (and temperature 0.7, top_p 0.8, top_k 20), so rollouts
would be drawn from a penalised distribution while the ratio and the KL assume ``softmax(logits / T)``, and
"greedy" evaluation would be penalised too. Since transformers 5, an option a passed config leaves unset is still
filled from the model's, so qmath both passes a full config and strips the model's down to its token ids.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import CompileConfig, GenerationConfig

from qmath.compat import cache_argument, repeated_cache, without_input_require_grads
from qmath.errors import ConfigError
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
Backend = Literal["eager", "compiled", "auto"]
PROMPT_BUCKET = 64  # compiled decoding pads prompts on the left to a multiple of this, so that few shapes compile


def check_generation_kwargs(generation_kwargs: dict[str, Any] | None) -> list[str]:
    """The extra ``generate`` options that change the sampled distribution; an error for one qmath sets itself.

    >>> check_generation_kwargs({"use_cache": True, "repetition_penalty": 1.1, "min_new_tokens": 8})
    ['min_new_tokens', 'repetition_penalty']
    """
    options = dict(generation_kwargs or {})
    owned = sorted(options.keys() & OWN.keys())
    if owned:
        raise ConfigError(f"model.generation_kwargs: {', '.join(owned)} set by qmath from "
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

    ``backend``: ``eager`` decodes with transformers' dynamic KV cache; rows of ``input_ids`` that come in runs of
    ``group`` copies of one prompt have that prompt prefilled once per run (its KV cache repeated), with the same
    completions as without. ``compiled`` decodes with a static (pre-allocated) KV cache and a ``torch.compile``d
    decoding step (CUDA graphs on a GPU); prompts are left-padded to a multiple of 64 tokens so that a run compiles
    a few shapes, not one per step, and each prompt is prefilled for each of its copies. ``auto``: compiled on CUDA,
    eager elsewhere (measured: the reference run's step 2.1x faster on an H100; the embedded run's 15% slower on
    CPU, where the decode loop's own overhead is not what compiling removes). Dropout is off while sampling.

    ``merged``: a context in which ``model`` generates through other weights that compute the same function, such
    as LoRA adapters folded into the base (:class:`qmath.lora.MergedForGeneration`); ``None``: ``model`` as it is.
    """

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int | None = None, generation_kwargs: dict[str, Any] | None = None,
                 backend: Backend = "eager", merged: Callable[[], AbstractContextManager] | None = None) -> None:
        self.model, self.tokenizer, self.backend = model, tokenizer, backend
        self.merged = merged or contextlib.nullcontext
        ids = model.generation_config.eos_token_id
        self.eos_ids = [ids] if isinstance(ids, int) else list(ids or [])
        if tokenizer.eos_token_id not in self.eos_ids:
            self.eos_ids.append(tokenizer.eos_token_id)
        options = {"max_new_tokens": max_new_tokens, "eos_token_id": self.eos_ids,
                   "pad_token_id": tokenizer.pad_token_id}
        self.greedy_config = generation_config(**options, greedy=True)
        self.sampling_config = generation_config(**options, greedy=False, temperature=temperature, top_p=top_p,
                                                 top_k=top_k, generation_kwargs=generation_kwargs)
        self._static: dict[tuple[bool, str], GenerationConfig] = {}  # their compiled-backend copies, per device

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, greedy: bool = False,
                 group: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """Completion ids, their mask (through the first EOS) and which completions ended with an EOS."""
        config, device = self.greedy_config if greedy else self.sampling_config, input_ids.device
        compiled = self.compiled(device)
        if compiled:
            input_ids, attention_mask = pad_to_bucket(input_ids, attention_mask, self.tokenizer.pad_token_id)
            if (greedy, device.type) not in self._static:
                self._static[greedy, device.type] = _static(config, device)
            config = self._static[greedy, device.type]
        was_training = self.model.training
        self.model.eval()
        try:
            with contextlib.ExitStack() as context:
                context.enter_context(self.merged())
                if compiled:
                    # The static cache is allocated in the weights' dtype, so decode without autocast (16-mixed,
                    # bf16-mixed: fp32 weights; decoding is bound by launches and bandwidth, not by matmul
                    # precision), and without the checkpointing hook that a full-graph compile cannot trace.
                    context.enter_context(torch.autocast(device.type, enabled=False))
                    context.enter_context(without_input_require_grads(self.model))
                prefill = {} if compiled else shared_prefill(self.model, input_ids, attention_mask, group)
                out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                          generation_config=config, **prefill)
        finally:
            self.model.train(was_training)
        completion_ids = out[:, input_ids.size(1):]
        mask, terminated = completion_mask(completion_ids, self.eos_ids)
        return completion_ids, mask, terminated

    def compiled(self, device: torch.device) -> bool:
        """Whether generation on ``device`` runs compiled (see ``backend``)."""
        return self.backend == "compiled" or (self.backend == "auto" and device.type == "cuda")

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


def pad_to_bucket(input_ids: Tensor, attention_mask: Tensor, pad_id: int,
                  bucket: int = PROMPT_BUCKET) -> tuple[Tensor, Tensor]:
    """Prompts left-padded to the next multiple of ``bucket`` tokens (positions come from the mask, so the model
    sees the same sequence).

    >>> ids, mask = pad_to_bucket(torch.tensor([[5, 6, 7]]), torch.tensor([[1, 1, 1]]), 0, bucket=4)
    >>> ids.tolist(), mask.tolist()
    ([[0, 5, 6, 7]], [[0, 1, 1, 1]])
    """
    extra = math.ceil(input_ids.size(1) / bucket) * bucket - input_ids.size(1)
    if not extra:
        return input_ids, attention_mask
    pad = torch.nn.functional.pad
    return pad(input_ids, (extra, 0), value=pad_id), pad(attention_mask, (extra, 0), value=0)


def _static(config: GenerationConfig, device: torch.device) -> GenerationConfig:
    """``config`` with a static KV cache and a compiled decoding step (transformers compiles it by itself on CUDA,
    and on any device when told to)."""
    compile_config = CompileConfig(fullgraph=True, dynamic=False)
    if device.type != "cuda":
        # transformers' private switch for compiling off CUDA; if it goes, the compiled backend's CPU test fails
        compile_config._compile_all_devices = True
        compile_config.mode = "default"  # reduce-overhead means CUDA graphs
    static = copy.deepcopy(config)
    static.cache_implementation, static.compile_config, static.disable_compile = "static", compile_config, False
    return static


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
