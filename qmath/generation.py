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
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor
from transformers import CompileConfig, GenerationConfig

from qmath.compat import cache_argument, repeated_cache, without_input_require_grads
from qmath.decoding import FIXED, Decoder, Sampling, compile_settings, grouped
from qmath.errors import ConfigError
from qmath.grpo import completion_mask
from qmath.rollout import Rollout

log = logging.getLogger(__name__)
# generate() options qmath sets from its own options: model.temperature, model.max_completion_length, ...
OWN = {"do_sample": "greedy evaluation and sampled rollouts are chosen by qmath",
       "temperature": "model.temperature", "top_p": "model.top_p", "top_k": "model.top_k",
       "max_new_tokens": "model.max_completion_length", "max_length": "model.max_completion_length",
       "eos_token_id": "the tokenizer's and the model's EOS ids", "pad_token_id": "the tokenizer's pad token",
       "num_return_sequences": "model.num_generations", "num_beams": "sampling (beam search is not GRPO)",
       "return_dict_in_generate": "qmath, which reads the token ids generate returns",
       # the KV cache and its compilation are qmath's: transformers refuses a cache_implementation beside the
       # prompt-sharing prefill's cache, and the compiled paths bring their own
       **dict.fromkeys(("cache_implementation", "cache_config", "compile_config", "disable_compile", "use_cache"),
                       "model.generation_backend (qmath's KV cache, static or dynamic, compiled or not)")}
# generate() options that leave the distribution of the sampled tokens alone
HARMLESS = {"prefill_chunk_size"}

ROLLOUT, PROMPTS, MAJ_K = 0, 1, 2  # what a seeded draw is for: see seed_for
Backend = Literal["auto", "eager", "compiled", "graphs", "transformers", "transformers-compiled"]
PROMPT_BUCKET = 64  # the planned cache holds the longest prompt rounded up to this, so that the plan rarely changes
MIN_ROWS = 8  # compiled decoding pads row counts to powers of two from this: decoding reads the weights per token,
# whatever the rows, so padding a few rows costs little where compiling pays (a GPU)


@dataclass(frozen=True)
class DecodeShapes:
    """What compiled decoding may compile, fixed before a run starts: one KV-cache length and a few row counts.

    Every new (rows, cache length) shape is a new graph, and torch compiles at most 8 per function before a
    full-graph compile fails. A run meets many shapes (rollouts, held-out batches, the last partial batch, maj@k,
    dynamic sampling's refills, prompts of every length), so each call is padded to one of these: the cache always
    has ``cache_length`` slots, and the rows are padded to the next of ``rows``. A call that fits none decodes
    eagerly.

    >>> shapes = DecodeShapes.plan(longest_prompt=150, max_new_tokens=96, max_rows=16)
    >>> shapes.cache_length, shapes.rows, shapes.rows_for(5), shapes.rows_for(17)
    (288, (8, 16), 8, None)
    """

    cache_length: int
    rows: tuple[int, ...]

    @classmethod
    def plan(cls, longest_prompt: int, max_new_tokens: int, max_rows: int) -> DecodeShapes:
        top = 1 << max(0, max_rows - 1).bit_length()  # the next power of two
        rows = tuple(1 << i for i in range(top.bit_length()) if min(MIN_ROWS, top) <= 1 << i <= top)
        return cls(math.ceil(longest_prompt / PROMPT_BUCKET) * PROMPT_BUCKET + max_new_tokens, rows)

    def rows_for(self, n: int) -> int | None:
        """The padded row count of a call with ``n`` rows; ``None`` if more than the largest."""
        return next((r for r in self.rows if r >= n), None)

    def describe(self) -> str:
        return (f"KV cache {self.cache_length} tokens, rows padded to {'/'.join(map(str, self.rows))}: at most "
                f"{len(self.rows)} graphs")


def check_generation_kwargs(generation_kwargs: dict[str, Any] | None) -> list[str]:
    """The extra ``generate`` options that change the sampled distribution; an error for one qmath sets itself.

    >>> check_generation_kwargs({"prefill_chunk_size": 64, "repetition_penalty": 1.1, "min_new_tokens": 8})
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


class Completions(NamedTuple):
    """What :meth:`Sampler.generate` returns: completion ids ``[B, T]`` (padded after the first EOS, ``T`` the
    longest completion), their mask (1 through the first EOS), which ended with an EOS, each token's log-prob
    under the distribution it was sampled from (``None`` where transformers' ``generate`` decoded, or greedy), and
    what decoded them (a :meth:`Sampler.mode`; ``eager`` also where a fixed-shape call fell back to it)."""

    ids: Tensor
    mask: Tensor
    terminated: Tensor
    logps: Tensor | None = None
    path: str = "eager"


# What `auto` decodes with on each device type: measured (docs/performance.md). On a GPU a CUDA graph of the step
# removes the per-token launches that bound decoding; on CPU compiling took 92 s and decoded no faster.
AUTO = {"cuda": "compiled"}
# Triton, which torch.compile generates GPU kernels with, dropped GPUs below compute capability 8.0 (T4, V100) from
# its supported hardware in 3.3 (triton-lang/triton#5066): there `auto` captures the eager step instead, until a
# measurement on such a card says the compiled step works and pays.
COMPILED_FROM_CAPABILITY = (8, 0)


def auto_mode(device: torch.device) -> str:
    """What ``generation_backend: auto`` decodes with on ``device``.

    >>> auto_mode(torch.device("cpu"))
    'eager'
    """
    if device.type != "cuda":
        return AUTO.get(device.type, "eager")
    return "compiled" if torch.cuda.get_device_capability(device) >= COMPILED_FROM_CAPABILITY else "graphs"


class Sampler:
    """Completions of a causal LM, greedy or sampled from ``softmax(logits / temperature)``: what the loss scores.

    ``backend`` (``model.generation_backend``):

    - ``eager``: qmath's decode loop (:mod:`qmath.decoding`): a pre-allocated KV cache, each prompt prefilled once
      per group of copies, sampling on the device, and each token's sampling log-prob.
    - ``compiled``: the same loop with its step ``torch.compile``d and, on a GPU, captured as a CUDA graph, within
      the bounded set of shapes of :class:`DecodeShapes` (see :meth:`plan`); a call outside that set, or any
      failure to compile, decodes eagerly instead, with one warning.
    - ``graphs``: the eager step with the same fixed shapes, captured as a CUDA graph on a GPU without
      ``torch.compile`` (no Triton: what GPUs before Ampere need); elsewhere that step runs uncaptured.
    - ``transformers`` and ``transformers-compiled``: transformers' ``generate``, with its dynamic KV cache (each
      prompt prefilled once per group), or its static cache and compiled decoding step (within the same shapes).
    - ``auto``: on CUDA ``compiled`` from compute capability 8.0 (Ampere) and ``graphs`` below, ``eager``
      elsewhere (:func:`auto_mode`).

    A fixed-shape decoder (``compiled``, ``graphs``) that fails, by raising or by disagreeing with the trainer's
    log-probs (:mod:`qmath.decoding_check`), is released (its buffers and graphs freed) and the calls it would have
    decoded decode eagerly; the policy's and the rollout copy's decoders fail apart.

    What qmath's loop does not implement (a ``generation_kwargs`` logits processor other than ``min_new_tokens``,
    sliding-window or hybrid attention, FSDP's sharded weights) keeps transformers' ``generate``;
    :meth:`describe` says so. Dropout is off while sampling.

    ``merged``: a context in which ``model`` generates through other weights that compute the same function, such
    as LoRA adapters folded into the base (:class:`qmath.lora.MergedForGeneration`); ``None``: ``model`` as it is.
    ``sharded``: the weights are sharded (FSDP): generating is a collective, whose steps transformers keeps in
    step across ranks. ``rollout_model``: another copy of the policy (a half-precision one) that :meth:`rollout`
    samples from; evaluation (:meth:`answer`) always reads ``model``.
    """

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int | None = None, generation_kwargs: dict[str, Any] | None = None,
                 backend: Backend = "eager", merged: Callable[[], AbstractContextManager] | None = None,
                 sharded: bool = False, rollout_model: Any = None) -> None:
        self.model, self.tokenizer, self.backend = model, tokenizer, backend
        self.max_new_tokens = max_new_tokens
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
        self.shapes: DecodeShapes | None = None  # what compiled decoding may compile; see plan
        # the (rows, cache length) shapes compiled so far, and (rows, cache length, "rollout copy") the copy's
        self.graphs: set[tuple] = set()
        self._transformers_error: str | None = None  # why transformers-compiled failed (then it decodes eagerly)
        # (from the rollout copy, mode) -> why: the fixed-shape decoders released for the run (checkpointed, so that
        # a resumed run does not try them again)
        self.failed: dict[tuple[bool, str], str] = {}
        self._warned_outside = False
        sampling, rest = Sampling.of(temperature, top_k, top_p, generation_kwargs)
        distorting = check_generation_kwargs(rest)
        # why qmath's own loop cannot decode here (transformers' generate does instead); None: it can
        self.own_loop_unsupported = ("FSDP's sharded weights" if sharded else Decoder.unsupported(model)
                                     or (f"model.generation_kwargs {distorting}" if distorting else None))
        self.sharded = sharded
        self._sampling = sampling
        # keyed by (whether they decode from the rollout copy, eager / compiled / graphs)
        self.decoders: dict[tuple[bool, str], Decoder] = {}
        self._add_decoders(False, model)
        self.rollout_model: Any = None
        self.use_rollout_model(rollout_model)

    def _add_decoders(self, copied: bool, model: Any) -> None:
        for mode in ("eager", *FIXED):
            self.decoders[copied, mode] = Decoder(model, self.eos_ids, self.tokenizer.pad_token_id,
                                                  self.max_new_tokens, self._sampling, mode)
            self.decoders[copied, mode].error = self.failed.get((copied, mode))

    def use_rollout_model(self, model: Any) -> None:
        """Sample :meth:`rollout`'s completions from ``model`` (another copy of the policy), ``None``: the policy."""
        if model is self.rollout_model and (model is None or (True, "eager") in self.decoders):
            return  # the same copy: keep its decoders, and their compiled graphs
        for key in [k for k in self.decoders if k[0]]:  # the old copy's buffers and graphs go with it
            self.decoders.pop(key).release()
        self.rollout_model = model
        if model is not None:
            self._add_decoders(True, model)

    @property
    def compile_error(self) -> str | None:
        """Why a compiled or captured decoder failed (the policy's first), after which its calls decode eagerly;
        ``None`` while none has."""
        errors = [d.error for _, d in sorted(self.decoders.items()) if d.error] + [self._transformers_error]
        return next((e for e in errors if e), None)

    def fall_back(self, copied: bool, mode: str, why: str) -> None:
        """Stop using the ``mode`` decoder of the policy (or of the rollout copy): free its buffers and graphs and
        decode those calls eagerly from now on, with one warning that says why."""
        decoder = self.decoders.get((copied, mode))
        if (copied, mode) in self.failed:
            return
        self.failed[copied, mode] = why
        if decoder is not None:
            decoder.release(why)
        log.warning("%s decoding of the %s failed (%s); it is released and decodes eagerly from now on. Set "
                    "model.generation_backend: eager to skip it.", mode, "rollout copy" if copied else "policy", why)

    def mode(self, device: torch.device) -> str:
        """What decodes on ``device``: ``eager``, ``compiled`` or ``graphs`` (qmath's loop), or ``transformers`` or
        ``transformers-compiled`` (see ``backend``)."""
        if self.sharded:
            return "transformers"  # compiled decoding through FSDP's layers is not tried
        mode = auto_mode(device) if self.backend == "auto" else self.backend
        if self.own_loop_unsupported and mode in ("eager", *FIXED):
            return "transformers" if mode == "eager" else "transformers-compiled"
        return mode

    def compiled(self, device: torch.device) -> bool:
        """Whether generation on ``device`` tries fixed shapes (compiled, or captured as CUDA graphs)."""
        mode = self.mode(device)
        return mode.endswith("compiled") or mode in FIXED

    def plan(self, longest_prompt: int, max_rows: int) -> DecodeShapes:
        """Fix the shapes compiled decoding may compile: a cache for prompts of up to ``longest_prompt`` tokens
        and calls of up to ``max_rows`` rows, called before a run starts. A plan only grows: what an earlier
        plan covered stays covered."""
        if self.shapes is not None:
            longest_prompt = max(longest_prompt, self.shapes.cache_length - self.max_new_tokens)
            max_rows = max(max_rows, self.shapes.rows[-1])
        self.shapes = DecodeShapes.plan(longest_prompt, self.max_new_tokens, max_rows)
        return self.shapes

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, greedy: bool = False,
                 group: int = 1, copied: bool = False) -> Completions:
        """Completions of each row's prompt; rows in runs of ``group`` copies of one prompt share its prefill.
        ``copied``: decode from ``rollout_model`` (when there is one)."""
        mode = self.mode(input_ids.device)
        copied = copied and self.rollout_model is not None
        model = self.rollout_model if copied else self.model
        out, path = None, mode
        if self.compiled(input_ids.device):
            out = self._compiled(mode, input_ids, attention_mask, greedy, group, copied)
        if out is None:
            own = mode in ("eager", *FIXED)
            path = "eager" if own else "transformers"
            with self._decoding(input_ids.device, own=own, copied=copied):
                if own:
                    out = self.decoders[copied, "eager"].generate(input_ids, attention_mask, greedy, group)
                else:
                    config = self.greedy_config if greedy else self.sampling_config
                    prefill = shared_prefill(model, input_ids, attention_mask, group)
                    out = (model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                          generation_config=config, **prefill)[:, input_ids.size(1):], None)
        return self._completions(*out, sampled=not greedy, path=path)

    def _completions(self, ids: Tensor, logps: Tensor | None, sampled: bool, path: str = "eager") -> Completions:
        """Out of inference mode (a tensor made there cannot be saved for backward), cut to the longest."""
        mask, terminated = completion_mask(ids, self.eos_ids)
        width = max(int(mask.sum(dim=1).max()), 1) if ids.numel() else ids.size(1)
        logps = logps[:, :width].clone() if logps is not None and sampled else None
        return Completions(ids[:, :width].clone(), mask[:, :width].clone(), terminated.clone(), logps, path)

    @contextlib.contextmanager
    def _decoding(self, device: torch.device, own: bool = False, compiled: bool = False,
                  copied: bool = False) -> Iterator[None]:
        """Eval mode (no dropout) and the ``merged`` weights; for qmath's loop and compiled decoding also no
        autocast (the KV cache is in the weights' dtype; 16-mixed and bf16-mixed have fp32 weights, and decoding is
        bound by bandwidth and launches, not by matmul precision), no checkpointing input hook (a full-graph compile
        cannot trace it), and inference mode always (the grad mode is part of a compiled graph's key; Lightning
        validates in inference mode and trains in no_grad)."""
        model = self.rollout_model if copied else self.model
        was_training = model.training
        model.eval()
        try:
            with contextlib.ExitStack() as context:
                if not copied:  # the copy has the adapters folded in already
                    context.enter_context(self.merged())
                if own or compiled:
                    context.enter_context(torch.autocast(device.type, enabled=False))
                    context.enter_context(without_input_require_grads(model))
                    context.enter_context(torch.inference_mode())
                yield
        finally:
            model.train(was_training)

    def _compiled(self, mode: str, input_ids: Tensor, attention_mask: Tensor, greedy: bool,
                  group: int, copied: bool = False) -> tuple[Tensor, Tensor | None] | None:
        """Decode through a compiled or captured step, in one of the planned shapes; ``None`` where the call fits none
        of them or that decoder failed (now or before): the caller then decodes eagerly, from the same random
        state."""
        decoder = self.decoders.get((copied, mode))
        if (decoder.error if decoder is not None else self._transformers_error) is not None:
            return None
        rows, width = input_ids.shape
        if self.shapes is None:  # not planned by the caller: plan from the first call
            self.plan(width, rows)
        shapes = self.shapes
        padded = shapes.rows_for(rows)
        if padded is None or width + self.max_new_tokens > shapes.cache_length:
            if not self._warned_outside:
                self._warned_outside = True
                log.warning("compiled decoding: a call of %d rows with %d-token prompts is outside the planned "
                            "shapes (%s); it and any others like it decode eagerly", rows, width, shapes.describe())
            return None
        device = input_ids.device
        rng = _rng_state(device)
        try:
            with self._decoding(device, own=decoder is not None, compiled=True, copied=copied):
                if decoder is not None:
                    out = decoder.generate(input_ids, attention_mask, greedy, group, rows=padded,
                                           slots=shapes.cache_length, capacity=shapes.rows[-1])
                else:
                    with compile_settings():
                        out = self._transformers_compiled(input_ids, attention_mask, greedy, padded, copied), None
        except Exception as error:  # noqa: BLE001 - whatever broke the compile or capture, the run goes on eagerly
            why = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
        else:
            self.graphs.add((padded, shapes.cache_length, "rollout copy") if copied else (padded, shapes.cache_length))
            return out
        # out of the except block: its traceback no longer holds the failed graph's tensors when they are freed
        if decoder is not None:
            self.fall_back(copied, mode, why)
        else:
            self._transformers_error = why
            log.warning("compiled decoding failed (%s); decoding eagerly from now on. Set "
                        "model.generation_backend: eager to skip compiling.", why)
        _set_rng_state(device, rng)
        return None

    def _transformers_compiled(self, input_ids: Tensor, attention_mask: Tensor, greedy: bool, padded: int,
                               copied: bool = False) -> Tensor:
        device = input_ids.device
        model = self.rollout_model if copied else self.model
        if (greedy, device.type) not in self._static:
            base = self.greedy_config if greedy else self.sampling_config
            self._static[greedy, device.type] = _static(base, device, self.shapes.cache_length)
        config = self._static[greedy, device.type]
        config.max_cache_len = self.shapes.cache_length  # (a plan only grows)
        rows, extra = input_ids.size(0), padded - input_ids.size(0)  # copies of the last row, dropped afterwards
        ids, mask = (torch.cat([x, x[-1:].expand(extra, -1)]) if extra else x for x in (input_ids, attention_mask))
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:rows, ids.size(1):]

    def describe(self, device: torch.device) -> str:
        """How generation on ``device`` decodes, for the start-up summary."""
        described = self._describe(device)
        if self.rollout_model is not None:
            dtype = str(self.rollout_model.dtype).removeprefix("torch.")
            described += f"; rollouts from a {dtype} copy of the policy" + (
                ", uncorrected (transformers' generate gives no sampling log-probs)"
                if self.mode(device).startswith("transformers") else "")
        return described

    def _describe(self, device: torch.device) -> str:
        mode = self.mode(device)
        why = f" ({self.own_loop_unsupported} need it)" if self.own_loop_unsupported else ""
        if mode == "transformers":
            return f"transformers' generate, dynamic KV cache, each prompt prefilled once per group{why}"
        if mode == "eager":
            return "qmath's decode loop, eager (pre-allocated KV cache, each prompt prefilled once per group)"
        failed = self.failed.get((False, mode)) or (self._transformers_error if mode.startswith("transformers")
                                                    else None)
        if failed:
            return f"eager: {mode} decoding failed ({failed})"
        planned = self.shapes.describe() if self.shapes else "shapes planned at the first call"
        graphs = ", CUDA graphs" if device.type == "cuda" else ""
        if mode == "transformers-compiled":
            return f"transformers' generate, static KV cache, compiled decode step{graphs}{why}; {planned}"
        if mode == "graphs":
            captured = "the eager step captured as CUDA graphs" if device.type == "cuda" else "fixed shapes, uncaptured"
            return f"qmath's decode loop, {captured} (pre-allocated KV cache, each prompt prefilled once per group, " \
                   f"no torch.compile); {planned}"
        return f"qmath's decode loop, compiled{graphs} (pre-allocated KV cache, each prompt prefilled once per " \
               f"group); {planned}"

    def planned_graphs(self) -> int:
        """The most graphs compiled decoding may compile: one per planned row count and model decoded from."""
        return len(self.shapes.rows) * (2 if self.rollout_model is not None else 1) if self.shapes else 0

    def graph_count(self) -> str:
        """How many graphs compiled decoding has compiled, against its bound."""
        bound = f" (at most {self.planned_graphs()})" if self.shapes else ""
        failed = "".join(f"; the {'rollout copy' if copied else 'policy'}'s {mode} decoder failed, decoding eagerly: "
                         f"{d.error}" for (copied, mode), d in sorted(self.decoders.items()) if d.error)
        if self._transformers_error:
            failed += f"; compiling failed, decoding eagerly: {self._transformers_error}"
        return f"compiled decoding: {len(self.graphs)} graph(s){bound}{failed}"

    def generate_seeded(self, input_ids: Tensor, attention_mask: Tensor, seed: int, group: int = 1,
                        copied: bool = False) -> Completions:
        """Sampled completions drawn from a generator seeded with ``seed``; the global RNGs are left as they were."""
        devices = [input_ids.device] if input_ids.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self.generate(input_ids, attention_mask, group=group, copied=copied)

    def decode(self, completion_ids: Tensor, mask: Tensor, prefixes: Sequence[str] | None) -> list[str]:
        """The completions' text, each after its response prefix (which was fed as prompt tokens)."""
        texts = self.tokenizer.batch_decode([ids[m.bool()] for ids, m in zip(completion_ids, mask)],
                                            skip_special_tokens=True)
        return [p + t for p, t in zip(prefixes, texts)] if prefixes else texts

    def rollout(self, batch: dict[str, Any], group: int, seed: int) -> Rollout:
        """``group`` sampled completions per prompt of ``batch``, adjacent."""
        prompt_ids = batch["input_ids"].repeat_interleave(group, dim=0)
        prompt_mask = batch["attention_mask"].repeat_interleave(group, dim=0)
        out = self.generate_seeded(prompt_ids, prompt_mask, seed, group=group, copied=True)
        columns = {k: [v for v in values for _ in range(group)] for k, values in batch.items()
                   if isinstance(values, list)}
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=out.ids, completion_mask=out.mask,
                       terminated=out.terminated, texts=self.decode(out.ids, out.mask, columns.get("prefix")),
                       columns=columns, sampling_logps=out.logps, decoded_by=out.path,
                       copied=self.rollout_model is not None)

    def answer(self, batch: dict[str, Any], samples: int = 0, seed: int = 0) -> tuple[list[str], Tensor]:
        """Greedy completions of the batch's prompts (or ``samples`` sampled ones each, seeded), and their lengths."""
        input_ids, attention_mask, prefixes = batch["input_ids"], batch["attention_mask"], batch.get("prefix")
        if not samples:
            completion_ids, mask, *_ = self.generate(input_ids, attention_mask, greedy=True)
            return self.decode(completion_ids, mask, prefixes), mask.sum(dim=1)
        completion_ids, mask, *_ = self.generate_seeded(input_ids.repeat_interleave(samples, dim=0),
                                                       attention_mask.repeat_interleave(samples, dim=0), seed,
                                                       group=samples)
        prefixes = [p for p in prefixes for _ in range(samples)] if prefixes else None
        return self.decode(completion_ids, mask, prefixes), mask.sum(dim=1)


def _static(config: GenerationConfig, device: torch.device, cache_length: int) -> GenerationConfig:
    """``config`` with a static KV cache of ``cache_length`` slots for every call (``max_cache_len``, so that
    transformers does not resize it to each call's prompts) and a compiled decoding step (transformers compiles it by
    itself on CUDA, and on any device when told to)."""
    compile_config = CompileConfig(fullgraph=True, dynamic=False)
    if device.type != "cuda":
        # transformers' private switch for compiling off CUDA; if it goes, the compiled backend's CPU test fails
        compile_config._compile_all_devices = True
        compile_config.mode = "default"  # reduce-overhead means CUDA graphs
    static = copy.deepcopy(config)
    static.cache_implementation, static.compile_config, static.disable_compile = "static", compile_config, False
    static.max_cache_len = cache_length
    return static


@torch.no_grad()
def shared_prefill(model: Any, input_ids: Tensor, attention_mask: Tensor, group: int) -> dict[str, Any]:
    """``generate`` arguments that start it from a KV cache of each prompt, computed once per group of copies.

    The cache covers all but each prompt's last token, which ``generate`` then runs itself (it needs one token to
    start from). ``{}`` when the rows are not groups of one prompt or the model returns no cache.
    """
    # (generation runs in eval: a cache either way)
    if input_ids.size(1) < 2 or not grouped(input_ids, group, attention_mask):
        return {}
    ids, mask = input_ids[::group, :-1], attention_mask[::group, :-1]
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1)
    cache = repeated_cache(out, group)
    return {cache_argument(model): cache} if cache is not None else {}


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.random.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.random.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
