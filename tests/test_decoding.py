"""qmath's decode loop (qmath/decoding.py): its sampling against the distribution the loss scores, its greedy
answers against transformers' generate, its log-probs against a full forward, and its seeded draws across
processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from qmath.decoding import Sampling, gumbel, next_tokens
from qmath.generation import Sampler
from qmath.module import GRPO


def _empirical(logits: torch.Tensor, warpers, draws: int = 200_000, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    rows = logits.expand(draws, -1)
    tokens, _ = next_tokens(rows, warpers, gumbel(torch.rand(rows.shape)))
    return torch.bincount(tokens, minlength=logits.size(-1)).double() / draws


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.5), Sampling(0.8, top_k=3),
                                      Sampling(0.8, top_p=0.7)], ids=["plain", "temperature", "top-k", "top-p"])
def test_gumbel_draws_follow_the_warped_softmax(sampling):
    """Each token's frequency over 200,000 draws is its probability under transformers' warpers and softmax, to
    within 5 standard errors; and the log-prob returned with each token is that probability's log."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    warpers = sampling.warpers()
    scores = logits
    for warper in warpers:
        scores = warper(None, scores)
    expected = scores.softmax(dim=-1)[0].double()
    drawn = _empirical(logits, warpers)
    se = (expected * (1 - expected) / 200_000).sqrt()
    assert ((drawn - expected).abs() <= 5 * se + 1e-12).all(), (drawn, expected)
    assert (drawn[expected == 0] == 0).all()  # what top-k and top-p remove is never drawn
    tokens, logps = next_tokens(logits.expand(4, -1), warpers, gumbel(torch.rand(4, 6)))
    torch.testing.assert_close(logps, expected.log()[tokens].float())


def test_banned_tokens_are_never_drawn_and_a_zero_draw_never_wins():
    logits = torch.zeros(1000, 4)
    banned = torch.tensor([False, False, False, True])
    tokens, _ = next_tokens(logits, [], gumbel(torch.rand(1000, 4)), banned)
    assert tokens.max() < 3
    uniform = torch.full((1, 4), 0.5)
    uniform[0, 0] = 0.0  # gumbel(0) is -inf
    assert next_tokens(torch.tensor([[9.0, 0.0, 0.0, 0.0]]), [], gumbel(uniform))[0].item() != 0


def _raise_eos(module, amount: float) -> None:
    """Add ``amount`` to the EOS logits, so that a random model ends some completions early."""
    eos = torch.tensor(module.sampler.eos_ids)
    module.policy.get_output_embeddings().register_forward_hook(
        lambda m, args, out: out.index_add(-1, eos, torch.full((*out.shape[:-1], len(eos)), amount)))


def _prompts(tokenizer, questions, group):
    encoded = tokenizer(questions, return_tensors="pt", padding=True)
    return encoded.input_ids.repeat_interleave(group, 0), encoded.attention_mask.repeat_interleave(group, 0)


QUESTIONS = ["Tom has 3 boxes of pens.", "A baker sells 24 muffins in the morning and 12 more. How many?", "Hi"]


def test_greedy_answers_equal_transformers_generate(qwen_like):
    """Left-padded prompts of three lengths, rows in groups (one prefill per group) and not, on a stand-in with
    Qwen2.5's two EOS ids and pad = an EOS id: the same tokens, and the same width, as transformers' generate."""
    module = GRPO(model_name_or_path=str(qwen_like), max_completion_length=16, num_generations=4)
    module.configure_model()
    _raise_eos(module, 6.0)  # some answers end early, at different lengths: the EOS bookkeeping and the width
    ours = module.sampler
    theirs = Sampler(module.policy, module.tokenizer, 16, backend="transformers")
    assert ours.mode(torch.device("cpu")) == "eager" and theirs.mode(torch.device("cpu")) == "transformers"
    ended = 0
    for group in (1, 4):
        ids, mask = _prompts(module.tokenizer, QUESTIONS, group)
        a, b = ours.generate(ids, mask, greedy=True, group=group), theirs.generate(ids, mask, greedy=True, group=group)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.mask, b.mask) and torch.equal(a.terminated, b.terminated)
        ended += int(a.terminated.sum())
        assert a.logps is None  # greedy: no sampling distribution to score
    assert ended > 0  # some answers end with an EOS before the limit, not all
    assert not a.terminated.all()


def test_sampling_logps_are_the_log_probs_a_full_forward_gives(qwen_like):
    """Each sampled token's log-prob, returned by the loop, against log_softmax of the warped logits of one full
    forward over prompt and completion (temperature 0.8, top-k 20, top-p 0.9); 0 after the EOS. The loop's
    logits come one token at a time through the KV cache, the forward's all at once: fp32 sums in another order,
    a few 1e-6 apart, so 1e-4 on the log-probs."""
    module = GRPO(model_name_or_path=str(qwen_like), max_completion_length=12, num_generations=4, temperature=0.8,
                  top_k=20, top_p=0.9)
    module.configure_model()
    ids, mask = _prompts(module.tokenizer, QUESTIONS[:2], 4)
    out = module.sampler.generate_seeded(ids, mask, seed=3, group=4)
    full = torch.cat([ids, out.ids], dim=1)
    full_mask = torch.cat([mask, out.mask], dim=1)
    with torch.no_grad():
        logits = module.policy(input_ids=full, attention_mask=full_mask,
                               position_ids=(full_mask.cumsum(1) - 1).clamp(min=0)).logits[:, ids.size(1) - 1:-1]
    scores = logits.reshape(-1, logits.size(-1))
    for warper in module.sampler.decoders[False, "eager"].warpers:
        scores = warper(None, scores)
    expected = scores.log_softmax(-1).gather(-1, out.ids.reshape(-1, 1)).view_as(out.ids) * out.mask
    torch.testing.assert_close(out.logps, expected, rtol=0, atol=1e-4)
    assert (out.logps[out.mask == 1] < 0).any()


def test_min_new_tokens_holds_off_the_eos(qwen_like):
    """generation_kwargs {min_new_tokens: 6}: no completion ends before its 6th token, on a model pushed to end at
    once (its EOS logits raised), which without the option ends most completions at the first token."""
    results = {}
    for kwargs in (None, {"min_new_tokens": 6}):
        module = GRPO(model_name_or_path=str(qwen_like), max_completion_length=10, num_generations=4,
                      generation_kwargs=kwargs)
        module.configure_model()
        _raise_eos(module, 8.0)
        assert module.sampler.mode(torch.device("cpu")) == "eager"  # min_new_tokens is the loop's own
        ids, mask = _prompts(module.tokenizer, QUESTIONS[:2], 4)
        results[bool(kwargs)] = module.sampler.generate_seeded(ids, mask, seed=0, group=4).mask.sum(dim=1)
    assert (results[False] < 6).float().mean() > 0.5
    assert (results[True] >= 6).all()


def test_a_distorting_generation_kwarg_keeps_transformers_generate(qwen_like):
    module = GRPO(model_name_or_path=str(qwen_like), max_completion_length=8,
                  generation_kwargs={"repetition_penalty": 1.2})
    module.configure_model()
    cpu = torch.device("cpu")
    assert module.sampler.mode(cpu) == "transformers"
    assert "repetition_penalty" in module.sampler.describe(cpu) and "transformers' generate" in \
        module.sampler.describe(cpu)


SEEDED = """
import json, sys, torch
from qmath.module import GRPO
module = GRPO(model_name_or_path=sys.argv[1], max_completion_length=12, num_generations=4, temperature=0.9)
module.configure_model()
enc = module.tokenizer(["Tom has 3 boxes of pens.", "Hi"], return_tensors="pt", padding=True)
ids, mask = enc.input_ids.repeat_interleave(4, 0), enc.attention_mask.repeat_interleave(4, 0)
print(json.dumps(module.sampler.generate_seeded(ids, mask, seed=11, group=4).ids.tolist()))
"""


def test_seeded_draws_are_the_same_in_this_process_and_a_fresh_one(qwen_like):
    """What exact resume rests on: a rollout's seed alone decides its completions, whatever ran before it in the
    process (here: other draws), and in a fresh process."""
    module = GRPO(model_name_or_path=str(qwen_like), max_completion_length=12, num_generations=4, temperature=0.9)
    module.configure_model()
    ids, mask = _prompts(module.tokenizer, ["Tom has 3 boxes of pens.", "Hi"], 4)
    first = module.sampler.generate_seeded(ids, mask, seed=11, group=4).ids
    module.sampler.generate_seeded(ids, mask, seed=12, group=4)
    torch.rand(100)
    assert torch.equal(module.sampler.generate_seeded(ids, mask, seed=11, group=4).ids, first)
    assert not torch.equal(module.sampler.generate_seeded(ids, mask, seed=12, group=4).ids, first)
    fresh = subprocess.run([sys.executable, "-c", SEEDED, str(qwen_like)], capture_output=True, text=True,
                           check=True)
    assert json.loads(fresh.stdout.strip().splitlines()[-1]) == first.tolist()


@pytest.mark.parametrize("first", ["sampled", "greedy"])
def test_the_fixed_shape_loops_check_of_its_first_step_sees_the_steps_own_noise(qwen_like, first):
    """A fixed-shape decoder checks its first step against the plain step before using it. A run's first call is a
    sampled rollout: checked before that step's noise was drawn, the step saw uniform zeros (noise of -inf on every
    token), drew token 0 in both runs, and with top-k or top-p on, token 0's log-prob of -inf made the check fail
    and the run fall back to the slower eager loop. Checked on the step's own noise, the loop stays fixed-shape
    and draws what the eager loop draws from the same seed. (``graphs``: on CPU, the fixed-shape step without a
    capture, so no compile here; the compiled step is checked in the same place.)"""
    from transformers import AutoModelForCausalLM

    from qmath.models import load_tokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(qwen_like).eval(), load_tokenizer(str(qwen_like))
    ids, mask = _prompts(tokenizer, QUESTIONS[:2], 4)
    draws = {}
    for backend in ("eager", "graphs"):
        sampler = Sampler(model, tokenizer, 12, temperature=0.9, top_k=5, top_p=0.9, backend=backend)
        if first == "greedy":
            sampler.generate(ids, mask, greedy=True, group=4)
        with torch.no_grad():
            draws[backend] = sampler.generate_seeded(ids, mask, seed=7, group=4)
        assert sampler.compile_error is None
        assert draws[backend].path == backend
    assert torch.equal(draws["graphs"].ids, draws["eager"].ids)
    torch.testing.assert_close(draws["graphs"].logps, draws["eager"].logps, rtol=0, atol=1e-4)


def test_grouped_sdpa_attends_as_transformers_sdpa_without_repeating_the_kv_heads():
    """Compiled decoding's attention (one query token, 14 query heads over 2 KV heads as Qwen2.5-0.5B, a padding
    mask) equals transformers' sdpa attention; longer queries are transformers' own."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from qmath.decoding import grouped_sdpa

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=7, is_causal=True, training=False)
    key, value = torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    mask = torch.ones(3, 1, 1, 40, dtype=torch.bool)
    mask[1, ..., :15] = False  # a left-padded row
    query = torch.randn(3, 14, 1, 16)
    ours, _ = grouped_sdpa(module, query, key, value, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert ours.shape == theirs.shape == (3, 1, 14, 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    longer = torch.randn(3, 14, 4, 16)
    causal = torch.ones(3, 1, 4, 40, dtype=torch.bool)
    torch.testing.assert_close(grouped_sdpa(module, longer, key, value, causal)[0],
                               sdpa_attention_forward(module, longer, key, value, causal)[0])


def test_noise_and_log_probs_are_fp32_whatever_the_default_dtype(qwen_like):
    """bf16-true and 16-true set the default dtype to 16 bits inside each step, where rollouts are drawn: the
    uniform draws (bf16 has 1,700 values in [0, 1) and draws 0 one time in 500) and the log-probs stay fp32."""
    from qmath.decoding import DecodeState

    kv = [(torch.zeros(2, 1, 8, 4), torch.zeros(2, 1, 8, 4))]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        state = DecodeState(2, 8, 4, 50, kv, pad_id=0, eos_ids=[1], live=3, bias=[(5, 2.0)])
    finally:
        torch.set_default_dtype(default)
    assert state.uniform.dtype == state.out_logps.dtype == state.bias.dtype == torch.float32


def test_a_single_token_sequence_bias_is_the_loops_own(qwen_like):
    """generation_kwargs {sequence_bias: [[[t], b]]} (TRL users bias the EOS this way): qmath's loop adds b to t's
    logit when sampling, not in greedy answers; a bias on a longer sequence keeps transformers' generate."""
    module = GRPO(model_name_or_path=str(qwen_like), max_completion_length=6, num_generations=4,
                  generation_kwargs={"sequence_bias": [[[7], 30.0]]})
    module.configure_model()
    assert module.sampler.mode(torch.device("cpu")) == "eager"
    ids, mask = _prompts(module.tokenizer, QUESTIONS[:2], 4)
    assert (module.sampler.generate_seeded(ids, mask, seed=0, group=4).ids == 7).all()  # +30: always drawn
    assert not (module.sampler.generate(ids, mask, greedy=True, group=4).ids == 7).any()
    longer = GRPO(model_name_or_path=str(qwen_like), generation_kwargs={"sequence_bias": [[[7, 8], 3.0]]})
    longer.configure_model()
    assert longer.sampler.mode(torch.device("cpu")) == "transformers"


def test_the_plan_covers_a_rollout_of_every_micro_batch(tiny_model, in_tmp):
    """A rollout covers the whole optimizer step: data.batch_size x accumulate_grad_batches prompts x G rows in one
    call (here 2 x 2 x 4 = 16), which the plan must include or every rollout would decode eagerly."""
    from qmath.__main__ import main
    from tests.test_fit import tiny_config

    cli = main(["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)), "--model.num_generations",
                "4", "--data.batch_size", "2", "--trainer.accumulate_grad_batches", "2", "--trainer.max_steps", "1",
                "--model.generation_backend", "compiled", "--trainer.limit_val_batches", "0",
                "--model.rollout_dtype", "null"])  # the policy's own decoder (a copy's graphs are tagged as such)
    sampler = cli.model.sampler
    assert sampler.shapes.rows == (8, 16) and sampler.compile_error is None
    assert {rows for rows, _ in sampler.graphs} == {16}
