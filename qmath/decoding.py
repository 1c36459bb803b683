"""qmath's decode loop: a pre-allocated KV cache, one step that samples on the device, and a host that looks at
whether the rows have ended only every few tokens.

transformers' ``generate`` runs a Python loop per token around the model, with its logits processors as separate
calls, ``torch.multinomial`` (whose exponential draws take 6-13 ms a token over a 49k vocabulary on CPU), a stop
check that makes the host wait for the device every token, and, with its dynamic cache, a ``cat`` of every layer's
keys and values every token (34% of a bare loop's time on CPU). Here:

- :class:`DecodeCache` writes each token's keys and values into buffers allocated once per call (compiled: once
  per run); eagerly each layer attends over the live slots only, compiled over the whole buffer under the mask, so
  that every step of a run has the same shapes.
- :func:`next_tokens` applies temperature, top-k and top-p (transformers' own warpers) and samples by Gumbel-max
  from uniform noise drawn before the step (the same law as ``multinomial``, from cheaper draws); greedy decoding is
  the same step without noise. It returns each token's log-probability under the distribution it was drawn from.
- :class:`Decoder` prefills each prompt once per group and repeats its cache for the G copies, then runs the step:
  eagerly over the live slots (``eager``), or with fixed shapes, once per padded row count
  (:class:`qmath.generation.DecodeShapes`): ``torch.compile``d and on a GPU captured as one CUDA graph that is
  replayed every token (``compiled``), or the eager step itself captured as a CUDA graph (``graphs``: no Triton,
  which dropped pre-Ampere GPUs such as the T4 from its supported hardware in 3.3). Either way the host only
  launches it.
- A fixed-shape decoder keeps its KV buffers for the run; each call zeroes the slots it does not write, so a
  non-finite value one call left behind (an fp16 overflow) cannot reach a later call through a masked slot
  (0 x NaN is NaN in the attention product). A decoder that fails (its compile or capture raises, or
  :mod:`qmath.decoding_check` finds its output wrong) frees its buffers and graphs (:meth:`Decoder.release`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import Cache, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from qmath.compat import cache_argument, cache_states, returned_cache

CHECK_EVERY_CUDA = 8  # tokens between two looks at whether every row has ended (each look waits for the GPU)
GROUPED_SDPA = "qmath_grouped_sdpa"  # the attention implementation compiled decoding switches sdpa models to


@dataclass(frozen=True)
class Sampling:
    """The distribution rollouts are drawn from: ``softmax(logits / temperature)`` restricted by top-k and top-p,
    with EOS forbidden before ``min_new_tokens``."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_new_tokens: int = 0
    bias: tuple[tuple[int, float], ...] = ()  # (token, added to its logit): single-token ``sequence_bias``

    @classmethod
    def of(cls, temperature: float, top_k: int | None, top_p: float,
           generation_kwargs: dict[str, Any] | None) -> tuple[Sampling, dict[str, Any]]:
        """The sampling of rollouts with these ``generate`` options, and the options it does not implement
        (``min_new_tokens`` and a ``sequence_bias`` of single tokens it does).

        >>> Sampling.of(0.9, None, 1.0, {"min_new_tokens": 8, "sequence_bias": [[[2], -3.0]], "top_h": 0.3})
        (Sampling(temperature=0.9, top_k=None, top_p=1.0, min_new_tokens=8, bias=((2, -3.0),)), {'top_h': 0.3})
        """
        rest = dict(generation_kwargs or {})
        bias: list[tuple[int, float]] = []
        sequence_bias = rest.pop("sequence_bias", None) or []
        pairs = sequence_bias.items() if isinstance(sequence_bias, dict) else sequence_bias
        for ids, value in pairs:
            if len(ids) != 1:  # a bias on a sequence needs the tokens before it: transformers' generate
                rest["sequence_bias"] = sequence_bias
                bias = []
                break
            bias.append((int(ids[0]), float(value)))
        return cls(temperature, top_k, top_p, int(rest.pop("min_new_tokens", 0) or 0), tuple(bias)), rest

    def warpers(self) -> LogitsProcessorList:
        """transformers' own warpers, in ``generate``'s order."""
        warpers = LogitsProcessorList()
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        return warpers


def grouped(prompt_ids: Tensor, g: int, prompt_mask: Tensor | None = None) -> bool:
    """Whether the rows come in runs of ``g`` copies of one prompt (and of its mask, if given)."""
    rows = prompt_ids.size(0)
    if g < 2 or rows % g:
        return False
    for x in (prompt_ids, prompt_mask) if prompt_mask is not None else (prompt_ids,):
        runs = x.reshape(rows // g, g, -1)
        if not bool((runs == runs[:, :1]).all()):
            return False
    return True


def gumbel(uniform: Tensor) -> Tensor:
    """Gumbel noise from uniform draws in ``[0, 1)``: ``argmax(scores + gumbel(u))`` is a draw from
    ``softmax(scores)``. A draw of exactly 0 gives -inf: that token is not chosen."""
    return -torch.log(-torch.log(uniform))


def next_tokens(logits: Tensor, warpers: Sequence[Callable], noise: Tensor | None = None,
                banned: Tensor | None = None, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The next token of each row and its log-probability under the distribution it is drawn from.

    ``logits``: ``[R, V]``; ``bias``: added to them (``[V]``); ``banned``: a boolean mask broadcastable to
    ``[R, V]`` of tokens that may not be drawn (EOS before ``min_new_tokens``); ``warpers``: then applied in order
    to the fp32 scores (temperature, top-k, top-p); ``noise``: Gumbel noise ``[R, V]`` to sample with, ``None`` for
    the argmax (greedy).

    >>> logits = torch.tensor([[0.0, 2.0, 1.0]])
    >>> tokens, logps = next_tokens(logits, [])
    >>> tokens.tolist(), round(logps.exp().item(), 4)  # the argmax, with its softmax probability
    ([1], 0.6652)
    >>> next_tokens(logits, [], banned=torch.tensor([False, True, False]))[0].tolist()
    [2]
    """
    scores = logits.float()
    if bias is not None:
        scores = scores + bias
    if banned is not None:
        scores = scores.masked_fill(banned, -math.inf)
    for warper in warpers:
        scores = warper(None, scores)
    tokens = (scores if noise is None else scores + noise).argmax(dim=-1)
    logps = scores.gather(-1, tokens[:, None])[:, 0] - scores.logsumexp(dim=-1)
    return tokens, logps


def grouped_sdpa(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                 dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                 **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' sdpa attention, except that one query token per row (decoding) attends to the KV heads as they
    are, each head's group of query heads taken as its queries.

    Under ``torch.compile`` transformers' sdpa repeats every KV head for its query heads before attending (Qwen2.5:
    7 times), which for 8 rows over a 768-slot cache writes and reads about as many bytes per token as the weights
    themselves; eagerly it packs the query heads the same way as here.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows, heads, length, dim = query.shape
    kv_heads = key.size(1)
    if length != 1 or heads == kv_heads or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    packed = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling)
    return out.reshape(rows, 1, heads, dim), None


@contextlib.contextmanager
def grouped_query_decoding(model: Any, decoder: Any = None) -> Iterator[None]:
    """``model`` (sdpa attention with grouped KV heads) attends through :func:`grouped_sdpa` for the block, through
    transformers' own ``AttentionInterface``; ``decoder._grouped_sdpa`` becomes False where the model does not take
    it (a model whose attention cannot be switched), so that it is not tried again."""
    config = model.config
    if config._attn_implementation != "sdpa" or getattr(config, "num_key_value_heads", None) in (
            None, config.num_attention_heads):
        yield
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)
    model.set_attn_implementation(GROUPED_SDPA)
    if model.config._attn_implementation != GROUPED_SDPA and decoder is not None:
        decoder._grouped_sdpa = False
    try:
        yield
    finally:
        if model.config._attn_implementation == GROUPED_SDPA:
            model.set_attn_implementation("sdpa")


@contextlib.contextmanager
def compile_settings() -> Iterator[None]:
    """What compiling a decode step needs: no DDPOptimizer (inside Lightning's DDP forward dynamo would split the
    graph at every 25 MB of trainable parameters, which is for training graphs), room for 16 graphs of the step,
    and inductor's deterministic mode
    where it has one (no on-device benchmarking of kernel configs that change the rounding: a resumed process must
    compile the same kernels to draw the same tokens)."""
    import torch._dynamo
    import torch._inductor.config

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch._dynamo.config.patch(optimize_ddp=False))
        # one decode step's graphs share a limit per code object (8): a rollout copy compiles its own beside the
        # policy's, so planned row counts x 2 models must fit
        name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        stack.enter_context(torch._dynamo.config.patch(**{name: max(getattr(torch._dynamo.config, name), 16)}))
        if hasattr(torch._inductor.config, "deterministic"):
            stack.enter_context(torch._inductor.config.patch(deterministic=True))
        yield


class DecodeCache(Cache):
    """A KV cache over pre-allocated buffers ``[rows, heads, slots, head_dim]``, one pair per layer: every
    ``update`` writes the step's keys and values at ``slot`` in place (no ``cat``).

    ``live``: eagerly, the number of slots in use (the layers attend over those only, a view); ``None`` when
    compiled, where the layers attend over every slot under the attention mask, so that each step has the same
    shapes. Only what the model calls of a cache is implemented: ``update`` and the sizes the mask is built from.
    """

    def __init__(self, keys: list[Tensor], values: list[Tensor], slot: Tensor, live: int | None) -> None:
        super().__init__(layers=[])
        self.keys, self.values, self.slot, self.live = keys, values, slot, live
        self.skip_unpadded_mask = live is not None and keys[0].device.type == "cpu"

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.slot, key_states.to(keys.dtype))
        values.index_copy_(2, self.slot, value_states.to(values.dtype))
        if self.live is None:
            return keys, values
        return keys[:, :, : self.live], values[:, :, : self.live]

    def get_seq_length(self, layer_idx: int = 0) -> Any:
        """The slots before this step's token: where its query sits."""
        return self.live - 1 if self.live is not None else self.slot[0]

    def get_mask_sizes(self, query: Any, layer_idx: int = 0) -> tuple[int, int]:
        return (self.live if self.live is not None else self.keys[0].size(2)), 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.keys[0].size(2)

    @property
    def is_compileable(self) -> bool:
        # Eagerly on CPU as a dynamic cache, so that transformers skips the mask where no row is padded, as with its
        # own (the same numbers as its generate). Elsewhere not: checking for padding makes the host wait for a GPU.
        return not self.skip_unpadded_mask


class DecodeState:
    """One call's decoding on the device: the token each row feeds next, its position, the cache slot it is
    written to, how many tokens are done, which rows have ended, the attention mask over the slots, the noise to
    sample with, and the output. Compiled, one of these per padded row count lives for the run (a CUDA graph reads
    and writes these very tensors); eagerly, one per call."""

    def __init__(self, rows: int, slots: int, max_new_tokens: int, vocab: int, kv: list[tuple[Tensor, Tensor]],
                 pad_id: int, eos_ids: list[int], live: int | None, bias: Sequence[tuple[int, float]] = (),
                 mask_dtype: torch.dtype = torch.float32) -> None:
        device = kv[0][0].device
        self.pad_id, self.greedy, self.mask_dtype = pad_id, True, mask_dtype
        self.eos = torch.zeros(vocab, dtype=torch.bool, device=device)  # [V]: which tokens end a completion
        self.eos[torch.tensor(eos_ids, device=device)] = True
        self.bias = torch.zeros(vocab, dtype=torch.float32, device=device) if bias else None  # sequence_bias
        for token, value in bias:
            self.bias[token] += value
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.mask = torch.zeros(rows, slots, dtype=torch.long, device=device)
        # fp32 whatever the default dtype (bf16-true and 16-true set it to 16 bits in each step): bf16 draws take
        # 1,700 values and are 0 one time in 500, which would bend the sampled law
        self.uniform = torch.zeros(rows, vocab, dtype=torch.float32, device=device)  # filled by the host loop
        self.sample = torch.zeros(1, dtype=torch.bool, device=device)  # sampled (True) or greedy
        self.min_new_tokens = torch.zeros(1, dtype=torch.long, device=device)
        self.out_tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
        self.out_logps = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device)
        self.cache = DecodeCache([k for k, _ in kv], [v for _, v in kv], self.slot, live)

    def start(self, prompt_ids: Tensor, prompt_mask: Tensor, greedy: bool, min_new_tokens: int) -> None:
        """Set up a call of ``len(prompt_ids)`` rows whose prompts (all but their last token) are in the cache;
        rows beyond those are padding, ended from the start."""
        rows, width = prompt_ids.shape
        self.mask.zero_()
        self.mask[:rows, :width] = prompt_mask
        self.mask[rows:, :width] = prompt_mask[-1]
        self.tokens[:rows], self.tokens[rows:] = prompt_ids[:, -1], prompt_ids[-1, -1]
        positions = prompt_mask.sum(dim=1) - 1
        self.positions[:rows], self.positions[rows:] = positions, positions[-1]
        self.slot.fill_(width - 1)
        self.step.zero_()
        self.finished.zero_()
        self.finished[rows:] = True
        self.greedy = greedy
        self.sample.fill_(not greedy)
        self.min_new_tokens.fill_(0 if greedy else min_new_tokens)
        self.out_tokens.fill_(self.pad_id)
        self.out_logps.zero_()

    def snapshot(self) -> list[Tensor]:
        return [x.clone() for x in (self.tokens, self.positions, self.slot, self.step, self.finished, self.mask)]

    def restore(self, saved: list[Tensor]) -> None:
        for x, s in zip((self.tokens, self.positions, self.slot, self.step, self.finished, self.mask), saved):
            x.copy_(s)


FIXED = ("compiled", "graphs")  # the decoders with fixed shapes, whose step a CUDA graph captures


class Decoder:
    """Greedy or sampled completions of a causal LM through qmath's decode loop (see the module docstring).

    ``mode``: ``eager`` (each step over the live slots), ``compiled`` (the step ``torch.compile``d, one graph per
    padded row count, and on CUDA captured as a CUDA graph) or ``graphs`` (the eager step with the compiled one's
    fixed shapes, captured as a CUDA graph on CUDA, run as it is elsewhere). For the last two the caller pads the
    rows and gives the run's cache length (:class:`qmath.generation.DecodeShapes`).
    """

    def __init__(self, model: Any, eos_ids: list[int], pad_id: int, max_new_tokens: int, sampling: Sampling,
                 mode: str = "eager") -> None:
        self.model, self.pad_id, self.max_new_tokens, self.sampling = model, pad_id, max_new_tokens, sampling
        self.eos_ids, self.mode = eos_ids, mode
        self.fixed = mode in FIXED
        self.warpers = sampling.warpers()
        self.cache_kwarg = cache_argument(model)
        self.error: str | None = None  # why this decoder failed (then it is released and not used again)
        self._kv: list[tuple[Tensor, Tensor]] | None = None  # fixed shapes: the run's KV buffers, every row count's
        self._states: dict[int, DecodeState] = {}  # fixed shapes: per padded row count
        self._runners: dict[int, Callable[[], Any]] = {}  # fixed shapes: each row count's step (a graph's replay)
        self._graphs: list[Any] = []  # the CUDA graphs captured, kept alive with their pool
        self._compiled_step: Callable | None = None
        self._pool: Any = None  # the CUDA graphs' shared memory pool
        self._stream: Any = None  # the CUDA stream this decoder warms up and captures on
        self._grouped_sdpa: bool | None = None  # whether the model switched to grouped_sdpa (None: not tried)

    @property
    def compiled(self) -> bool:
        return self.mode == "compiled"

    def release(self, error: str | None = None) -> None:
        """Free what this decoder holds on the device (KV buffers, states, CUDA graphs and their pool, the compiled
        step); with ``error``, mark it failed, so that its caller decodes another way from now on."""
        if error is not None:
            self.error = error
        self._kv, self._compiled_step, self._pool, self._stream = None, None, None, None
        self._states.clear()
        self._runners.clear()
        for graph in self._graphs:
            graph.reset()
        self._graphs.clear()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # the pool's blocks go back to the card, not only to torch's cache

    def held_bytes(self) -> int:
        """The bytes of the KV buffers this decoder keeps between calls (0 when it keeps none)."""
        return sum(k.nbytes + v.nbytes for k, v in self._kv) if self._kv is not None else 0

    @staticmethod
    def unsupported(model: Any) -> str | None:
        """Why this loop cannot decode ``model`` (it then keeps transformers' ``generate``); ``None`` if it can."""
        config = model.config
        if getattr(config, "is_encoder_decoder", False):
            return "an encoder-decoder model"
        if config._attn_implementation not in ("sdpa", "eager"):
            return f"attention implementation {config._attn_implementation!r} (sdpa and eager are supported)"
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and set(layer_types) != {"full_attention"}:
            return f"layer types {sorted(set(layer_types))} (full attention only)"
        if layer_types is None and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window",
                                                                                         True):
            return "sliding-window attention"
        return None

    @torch.inference_mode()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, greedy: bool, group: int = 1,
                 rows: int | None = None, slots: int | None = None,
                 capacity: int | None = None) -> tuple[Tensor, Tensor]:
        """Completion ids ``[R, T']`` (pad after each row's EOS; ``T'`` up to the longest) and their log-probs
        under the sampling distribution (0 after the EOS). Fixed shapes: ``rows`` (at least ``R``) and ``slots``
        (at least prompt + ``max_new_tokens``) are the planned shapes, and ``capacity`` the most rows any call
        will have (the KV buffers are allocated once, for those). Runs in inference mode: callers clone."""
        if not self.fixed:
            return self._generate(input_ids, attention_mask, greedy, group, None, None, None)
        with compile_settings() if self.compiled else contextlib.nullcontext(), self._grouped_query_decoding():
            return self._generate(input_ids, attention_mask, greedy, group, rows, slots, capacity)

    def _grouped_query_decoding(self) -> contextlib.AbstractContextManager:
        # fixed shapes: the compiled step's sdpa repeats the KV heads, and so does transformers 4's eager sdpa under a
        # mask; eager decoding over the live slots keeps transformers' own attention
        if self._grouped_sdpa is False or not self.fixed:
            return contextlib.nullcontext()
        self._grouped_sdpa = True
        return grouped_query_decoding(self.model, self)

    def _generate(self, input_ids: Tensor, attention_mask: Tensor, greedy: bool, group: int, rows: int | None,
                  slots: int | None, capacity: int | None) -> tuple[Tensor, Tensor]:
        if input_ids.size(1) < 2:  # the prefill covers all but the last prompt token: give it one, masked
            input_ids = torch.nn.functional.pad(input_ids, (1, 0), value=self.pad_id)
            attention_mask = torch.nn.functional.pad(attention_mask, (1, 0), value=0)
        n, width = input_ids.shape
        kv = self._prefill(input_ids, attention_mask, group)
        if self.fixed:
            rows = rows or n
            state = self._fixed_state(kv, rows, slots or width + self.max_new_tokens, max(capacity or 0, rows))
        else:
            slots = width + self.max_new_tokens - 1
            state = DecodeState(n, slots, self.max_new_tokens, self._vocab(), self._buffers(kv, n, slots),
                                self.pad_id, self.eos_ids, live=width, bias=self.sampling.bias)
        padding = (attention_mask[:, None, : width - 1, None] == 0)  # the left padding of each prompt
        for layer, (keys, values) in enumerate(kv):
            for buffer, prefilled in ((state.cache.keys[layer], keys), (state.cache.values[layer], values)):
                # a pad token's keys and values are masked, but an overflow there (fp16) would be NaN x 0: zeroed
                buffer[:n, :, : width - 1] = prefilled.masked_fill(padding, 0)
                buffer[n:, :, : width - 1] = buffer[n - 1: n, :, : width - 1]
                if self.fixed:  # slots an earlier call wrote and this one only masks: no NaN may hide there
                    buffer[:, :, width - 1:].zero_()
        state.start(input_ids, attention_mask, greedy, self.sampling.min_new_tokens)
        steps = self._run(state, width)
        return state.out_tokens[:n, :steps], state.out_logps[:n, :steps]

    def _run(self, state: DecodeState, width: int) -> int:
        """Decode until every row has ended or ``max_new_tokens``; the number of steps run."""
        every = CHECK_EVERY_CUDA if state.tokens.device.type == "cuda" else 1
        runner = None
        for t in range(self.max_new_tokens):
            if not state.greedy:
                state.uniform.uniform_()
            if self.fixed:
                # made (compiled, captured, checked against the plain step) once this step's noise is drawn: checked
                # on a sampled call's zeroed noise, both steps would draw token 0, of log-prob -inf under top-k
                runner = runner or self._runner(state)
                runner()
            else:
                state.cache.live = width + t
                self.step(state)
            if (t + 1) % every == 0 and bool(state.finished.all()):
                return t + 1
        return self.max_new_tokens

    def _runner(self, state: DecodeState) -> Callable[[], Any]:
        """The fixed-shape step for ``state``'s row count (compiled or not); on CUDA, a replay of the CUDA graph it
        was captured as.

        Capturing runs the step twice (a warm-up, which compiles, then the capture): the state is put back as it
        was, and the cache slots those runs wrote are written again by the real steps before they are read."""
        rows = state.tokens.size(0)
        if rows in self._runners:
            return self._runners[rows]
        if self.compiled and self._compiled_step is None:
            self._compiled_step = torch.compile(self.step, fullgraph=True, dynamic=False)
        compiled = self._compiled_step if self.compiled else self.step

        def step() -> None:
            compiled(state)

        runner: Callable[[], Any] = step
        if state.tokens.device.type == "cuda":
            saved = state.snapshot()
            # this decoder's own stream, for the warm-up and the capture alike: a library's workspace first allocated
            # on a stream shared with another decoder's graphs would live in their pool, and be freed under them
            # when this decoder is released
            if self._stream is None:
                self._stream = torch.cuda.Stream()
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                step()
            torch.cuda.current_stream().wait_stream(self._stream)
            state.restore(saved)
            graph = torch.cuda.CUDAGraph()
            # thread_local: under DDP, NCCL's watchdog thread queries events while this thread captures
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
                step()
            self._pool = graph.pool()
            self._graphs.append(graph)
            state.restore(saved)
            runner = graph.replay
        self.verify(state, runner)
        self._runners[rows] = runner
        return runner

    def verify(self, state: DecodeState, runner: Callable[[], Any]) -> None:
        """Run one step of ``runner`` (a compiled step, a CUDA graph's replay) and the plain step on the same state
        and compare the sampled tokens' log-probs: a capture or compile that computes something else raises here,
        before any of its tokens are used (evaluation's graphs too, which no rollout's check sees). The state is
        put back as it was; the cache slot both steps write is written again by the first real step."""
        from qmath.decoding_check import bound_for

        saved = state.snapshot()
        outputs = []
        for run in (runner, lambda: self.step(state)):
            state.restore(saved)
            run()
            outputs.append((state.out_tokens.index_select(1, saved[3]).clone(),
                            state.out_logps.index_select(1, saved[3]).clone()))
        state.restore(saved)
        state.out_logps.zero_()
        state.out_tokens.fill_(self.pad_id)
        (tokens, logps), (plain_tokens, plain_logps) = outputs
        # the same noise and near-equal logits draw the same token, except on a near-tie that rounding flips: the
        # log-probs are compared where the tokens agree, and most rows must agree
        same = tokens == plain_tokens
        if not 2 * int(same.sum()) >= same.numel():
            raise RuntimeError(f"its first step drew other tokens than the plain step in {int((~same).sum())} of "
                               f"{same.numel()} rows")
        difference = float((logps - plain_logps).abs().nan_to_num(nan=math.inf)[same].max())
        tolerance = bound_for(self.model.dtype).max
        if not difference <= tolerance:
            raise RuntimeError(f"its first step's log-probs differ from the plain step's by {difference:.3g} "
                               f"(more than {tolerance:g})")

    def step(self, s: DecodeState) -> None:
        """One token for every row, on the device: feed each row's token, sample the next, note which rows ended.

        Nothing in it reads a value back to the host, so that a CUDA graph can capture it: with fixed shapes and no
        compiler the attention mask is handed to the model already 4-d (transformers would otherwise inspect it)."""
        s.mask.index_fill_(1, s.slot, 1)  # this token's own slot
        live = s.cache.live
        if live is not None:
            mask = s.mask[:, :live]
        elif self.compiled:
            mask = s.mask
        else:
            mask = additive_mask(s.mask, s.mask_dtype)
        # fixed shapes: the slot as cache_position, which transformers 4 would otherwise make with torch.arange
        # from the cache's length (a tensor here: a read back to the host, which a capture cannot hold)
        where = {"cache_position": s.slot} if live is None else {}
        logits = self.model(input_ids=s.tokens[:, None], attention_mask=mask, position_ids=s.positions[:, None],
                            use_cache=True, **where, **{self.cache_kwarg: s.cache}).logits[:, -1]
        banned = s.eos & (s.step < s.min_new_tokens) if self.sampling.min_new_tokens else None
        if live is None:  # fixed shapes: one graph for greedy and sampled calls
            noise = torch.where(s.sample, gumbel(s.uniform), 0.0)
            bias = torch.where(s.sample, s.bias, 0.0) if s.bias is not None else None
        else:
            noise = None if s.greedy else gumbel(s.uniform)
            bias = None if s.greedy else s.bias
        tokens, logps = next_tokens(logits, self.warpers, noise, banned, bias)
        tokens = torch.where(s.finished, s.pad_id, tokens)
        s.out_tokens.index_copy_(1, s.step, tokens[:, None])
        s.out_logps.index_copy_(1, s.step, logps.masked_fill(s.finished, 0.0)[:, None])
        s.finished |= s.eos[tokens]
        s.tokens.copy_(tokens)
        s.positions.add_(1)
        s.slot.add_(1)
        s.step.add_(1)

    def _prefill(self, input_ids: Tensor, attention_mask: Tensor, group: int) -> list[tuple[Tensor, Tensor]]:
        """Each layer's keys and values for all but the last prompt token of every row, ``[R, H, P - 1, D]``:
        computed once per run of ``group`` copies of one prompt, and repeated."""
        g = group if grouped(input_ids, group, attention_mask) else 1
        ids, mask = input_ids[::g, :-1], attention_mask[::g, :-1]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
                         use_cache=True, logits_to_keep=1)
        states = cache_states(returned_cache(out))
        return [(k.repeat_interleave(g, dim=0), v.repeat_interleave(g, dim=0)) for k, v in states]

    def _vocab(self) -> int:
        return self.model.get_output_embeddings().weight.size(0)

    @staticmethod
    def _buffers(like: list[tuple[Tensor, Tensor]], rows: int, slots: int) -> list[tuple[Tensor, Tensor]]:
        """Zeroed KV buffers shaped as ``like``'s layers, for ``rows`` rows and ``slots`` slots (zeroed: a slot
        not written yet is masked, and must hold no NaN for the masked product to be 0)."""
        return [tuple(torch.zeros(rows, x.size(1), slots, x.size(3), dtype=x.dtype, device=x.device) for x in kv)
                for kv in like]

    def _fixed_state(self, kv: list[tuple[Tensor, Tensor]], rows: int, slots: int, capacity: int) -> DecodeState:
        """The persistent state of ``rows`` rows, over KV buffers of ``capacity`` rows allocated once for every row
        count (a plan that grows reallocates them, and every graph is captured again)."""
        if self._kv is None or self._kv[0][0].size(0) < capacity or self._kv[0][0].size(2) != slots:
            self.release()
            self._kv = self._buffers(kv, capacity, slots)
        if rows not in self._states:
            views = [(k[:rows], v[:rows]) for k, v in self._kv]
            self._states[rows] = DecodeState(rows, slots, self.max_new_tokens, self._vocab(), views, self.pad_id,
                                             self.eos_ids, live=None, bias=self.sampling.bias,
                                             mask_dtype=self.model.dtype)
        return self._states[rows]


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``[R, S]`` 0/1 slots as the 4-d additive mask ``[R, 1, 1, S]`` transformers' attention takes as it is: 0 where
    a row attends, the dtype's lowest value where it does not (``exp`` of it is 0, as transformers' own masks)."""
    return torch.where(mask.bool(), 0.0, torch.finfo(dtype).min).to(dtype)[:, None, None, :]
