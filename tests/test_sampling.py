"""Rollouts and greedy answers come from the distribution the loss scores, whatever the checkpoint's own
generation_config.json says; every seeded draw follows the global seed. On a stand-in with Qwen2.5's traits."""

from __future__ import annotations

import json

import pytest
import torch

from qmath.__main__ import main
from qmath.data import GSM8K
from qmath.generation import MAJ_K, PROMPTS, ROLLOUT, seed_for
from qmath.module import GRPO
from tests.test_fit import tiny_config


def test_greedy_predictions_are_a_plain_argmax_loop_despite_the_models_repetition_penalty(qwen_like, in_tmp):
    rows = [{"question": f"Tom has {i} boxes of pens. How many pens?", "answer": f"#### {i}"} for i in range(5)]
    (in_tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli = main(["predict", "--config", "cpu", "--config", str(tiny_config(in_tmp, qwen_like)),
                "--model.max_completion_length", "16", "--data.path", str(in_tmp / "rows.jsonl"),
                "--predictions.path", "out.jsonl"])
    predicted = [json.loads(line)["completion"] for line in (in_tmp / "out.jsonl").read_text().splitlines()]
    model, data = cli.model.policy, cli.datamodule
    eos = set(model.generation_config.eos_token_id)
    assert len(eos) == 2  # Qwen's two EOS ids survive; only the sampling defaults are dropped
    penalised = 0
    for row, completion in zip(rows, predicted):
        ids = torch.tensor([data.tokenizer(data.render(row["question"]), add_special_tokens=False)["input_ids"]])
        prompt = ids.size(1)
        with torch.no_grad():
            for _ in range(16):  # the reference: argmax of the logits, nothing else
                token = model(input_ids=ids).logits[0, -1].argmax()
                ids = torch.cat([ids, token.view(1, 1)], dim=1)
                if int(token) in eos:
                    break
            penalised += not torch.equal(ids, model.generate(ids[:, :prompt], max_new_tokens=ids.size(1) - prompt,
                                                              do_sample=False, repetition_penalty=1.5))
        text = data.tokenizer.decode(ids[0, prompt:], skip_special_tokens=True)
        assert completion == data.hparams.response_prefix + text
    assert penalised  # the checkpoint's penalty would have changed these answers: the test can tell


def test_sampled_first_tokens_follow_softmax_of_logits_over_temperature(qwen_like):
    module = GRPO(model_name_or_path=str(qwen_like), temperature=0.8, max_completion_length=1)
    module.configure_model()
    model, t = module.policy, module.hparams.temperature
    prompt = module.tokenizer("<|im_start|>user\nTom has 3 boxes of pens.<|im_end|>\n<|im_start|>assistant\n",
                              return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        for _ in range(3):  # put the likeliest next tokens into the prompt, where a repetition penalty bites
            prompt = torch.cat([prompt, model(input_ids=prompt).logits[0, -1].topk(3).indices[None]], dim=1)
        logits = model(input_ids=prompt).logits[0, -1]
    expected = torch.softmax(logits / t, dim=-1)
    seen = prompt[0].unique()
    penalised_logits = logits.clone()  # what the checkpoint's repetition_penalty 1.5 would sample from
    penalised_logits[seen] = torch.where(logits[seen] > 0, logits[seen] / 1.5, logits[seen] * 1.5)
    penalised = torch.softmax(penalised_logits / t, dim=-1)

    n = 20_000
    rows, mask = prompt.repeat(n, 1), torch.ones_like(prompt).repeat(n, 1)
    completions = module.sampler.generate_seeded(rows, mask, seed=0).ids
    drawn = torch.bincount(completions[:, 0], minlength=expected.numel()).float() / n
    mass, se = drawn[seen].sum(), (expected[seen].sum() * (1 - expected[seen].sum()) / n).sqrt()
    assert abs(mass - expected[seen].sum()) < 5 * se  # the prompt's tokens are drawn as often as softmax says
    assert abs(expected[seen].sum() - penalised[seen].sum()) > 50 * se  # and a penalty would be far off
    assert 0.5 * (drawn - expected).abs().sum() < 0.05 < 0.5 * (expected - penalised).abs().sum()


def test_generation_kwargs_that_change_the_distribution_are_warned_about_and_owned_ones_refused():
    with pytest.warns(UserWarning, match=r"\['repetition_penalty'\] change the distribution"):
        GRPO(generation_kwargs={"repetition_penalty": 1.1, "prefill_chunk_size": 64})
    with pytest.raises(ValueError, match="temperature set by qmath from model.temperature"):
        GRPO(generation_kwargs={"temperature": 0.7})
    # a cache or compile option of generate's: qmath's decoding owns them (transformers refused the eager path's)
    for option in ({"cache_implementation": "static"}, {"compile_config": None}, {"disable_compile": True}):
        with pytest.raises(ValueError, match=f"{next(iter(option))} set by qmath from model.generation_backend"):
            GRPO(generation_kwargs=option)


def test_fsdp_decodes_through_transformers_generate_whatever_the_backend(tiny_model):
    """docs/distributed.md: compiled decoding is not tried under FSDP (each step gathers the sharded layers'
    weights, a collective transformers' generate keeps in step)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    for backend in ("auto", "compiled", "eager", "transformers-compiled"):
        module = GRPO(model_name_or_path=str(tiny_model), generation_backend=backend)
        module._trainer = SimpleNamespace(strategy=FSDPStrategy())
        module.configure_model()
        assert module.sampler.mode(torch.device("cuda")) == "transformers", backend
        assert not module.sampler.compiled(torch.device("cuda"))


def test_every_seeded_draw_follows_the_global_seed(tiny_model, monkeypatch):
    data = GSM8K(tokenizer_name_or_path=str(tiny_model), num_train=200, num_few_shot=0)
    data.setup("fit")
    seeds = {}
    for global_seed in ("0", "1"):
        monkeypatch.setenv("PL_GLOBAL_SEED", global_seed)
        seeds[global_seed] = [seed_for(5, 1, 2, stream) for stream in (ROLLOUT, PROMPTS, MAJ_K)]
        assert len(set(seeds[global_seed])) == 3  # each purpose draws its own numbers
    assert all(a != b for a, b in zip(seeds["0"], seeds["1"]))
    # dynamic sampling's extra prompts: the same under the same seed, others under another
    draws = [data.draw(8, s)["question"] for s in (seeds["0"][1], seeds["0"][1], seeds["1"][1])]
    assert draws[0] == draws[1] != draws[2]


def _run_like_calls(tokenizer):
    """The kinds of generate call a whole run makes, as (rows, prompt width, greedy, grad mode, group): rollouts of
    2 prompts x G 4 under no_grad, held-out batches of 16 and the last partial one under Lightning's inference_mode,
    maj@2 batches, dynamic sampling's one-prompt refill, and prompts of several lengths (several 64-token buckets)."""
    calls = []
    for width in (13, 70, 140):
        for rows, greedy, mode, group in ((8, False, torch.no_grad, 4), (16, True, torch.inference_mode, 1),
                                          (5, True, torch.inference_mode, 1), (32, False, torch.inference_mode, 2),
                                          (4, False, torch.no_grad, 4)):
            ids = torch.randint(5, len(tokenizer) - 5, (rows // group, width))
            mask = torch.ones_like(ids)
            mask[1::3, : width // 3] = 0  # left padding in some prompts
            ids[mask == 0] = tokenizer.pad_token_id
            calls.append((ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0), greedy, mode, group))
    return calls


def test_compiled_decoding_over_a_whole_runs_calls_stays_within_its_planned_graphs(qwen_like):
    """The compiled backend (static KV cache, torch.compile'd decoding step; CUDA graphs on a GPU) on CPU, over 15
    calls of 12 distinct (rows, prompt width, grad mode) kinds: it would compile a graph for each, and torch
    stops a full-graph compile at the 9th. Planned, it compiles one graph per padded row count, and answers
    as eager decoding does on every call."""
    import torch._dynamo.utils

    from qmath.compat import enable_activation_checkpointing
    from qmath.generation import Sampler

    module = GRPO(model_name_or_path=str(qwen_like), max_completion_length=12, temperature=0.8, num_generations=4)
    module.configure_model()
    eager, tokenizer = module.sampler, module.tokenizer
    compiled = Sampler(module.policy, tokenizer, 12, temperature=0.8, backend="compiled")
    assert not eager.compiled(torch.device("cpu")) and compiled.compiled(torch.device("cpu"))  # auto: eager on CPU
    shapes = compiled.plan(longest_prompt=140, max_rows=32)
    assert shapes.rows == (8, 16, 32) and shapes.cache_length == 192 + 12
    enable_activation_checkpointing(module.policy)  # as t4x2.yaml: its input hook must not break the graph
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    calls = _run_like_calls(tokenizer)
    assert len({(ids.shape, mode) for ids, _, _, mode, _ in calls}) > 8
    for i, (ids, mask, greedy, mode, group) in enumerate(calls):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=i < 2)  # as under bf16-mixed, twice
        with mode():
            if greedy:
                with autocast:
                    answers = compiled.generate(ids, mask, greedy=True, group=group)[0]
                assert torch.equal(answers, eager.generate(ids, mask, greedy=True, group=group)[0])
            else:
                with autocast:
                    drawn = compiled.generate_seeded(ids, mask, seed=i, group=group)[0]
                if ids.size(0) in shapes.rows:  # unpadded: the same draws from the same logits
                    assert torch.equal(drawn, eager.generate_seeded(ids, mask, seed=i, group=group)[0])
    assert compiled.compile_error is None
    assert compiled.graphs == {(rows, 204) for rows in shapes.rows}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == len(shapes.rows)
    assert compiled.graph_count() == "compiled decoding: 3 graph(s) (at most 3)"


def test_a_compile_that_fails_decodes_eagerly_with_one_warning(qwen_like, caplog):
    """A model dynamo cannot trace in one graph (here a hook reads a tensor's value, a graph break): the call, and
    every later one, decodes eagerly, with one warning; a call outside the planned shapes decodes eagerly too."""
    from qmath.generation import Sampler

    module = GRPO(model_name_or_path=str(qwen_like), max_completion_length=8, num_generations=4)
    module.configure_model()
    compiled = Sampler(module.policy, module.tokenizer, 8, backend="compiled")
    compiled.plan(longest_prompt=20, max_rows=8)
    ids = torch.randint(5, 300, (8, 20))
    mask = torch.ones_like(ids)
    expected = module.sampler.generate(ids, mask, greedy=True)[0]
    with caplog.at_level("WARNING", logger="qmath.generation"):
        long = torch.randint(5, 300, (8, 100))  # a prompt longer than planned: eager
        assert torch.equal(compiled.generate(long, torch.ones_like(long), greedy=True)[0],
                           module.sampler.generate(long, torch.ones_like(long), greedy=True)[0])
        hook = module.policy.model.layers[0].register_forward_pre_hook(lambda m, args: float(args[0].sum()) and None)
        for _ in range(2):
            assert torch.equal(compiled.generate(ids, mask, greedy=True)[0], expected)
        hook.remove()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "outside the planned shapes" in warnings[0]
    assert "compiled decoding of the policy failed" in warnings[1] and compiled.compile_error and not compiled.graphs
    assert compiled.decoders[False, "compiled"].held_bytes() == 0  # its KV buffers and graphs are freed
    assert "decoding eagerly" in compiled.graph_count()
