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
    completions, _, _ = module.sampler.generate_seeded(rows, mask, seed=0)
    drawn = torch.bincount(completions[:, 0], minlength=expected.numel()).float() / n
    mass, se = drawn[seen].sum(), (expected[seen].sum() * (1 - expected[seen].sum()) / n).sqrt()
    assert abs(mass - expected[seen].sum()) < 5 * se  # the prompt's tokens are drawn as often as softmax says
    assert abs(expected[seen].sum() - penalised[seen].sum()) > 50 * se  # and a penalty would be far off
    assert 0.5 * (drawn - expected).abs().sum() < 0.05 < 0.5 * (expected - penalised).abs().sum()


def test_generation_kwargs_that_change_the_distribution_are_warned_about_and_owned_ones_refused():
    with pytest.warns(UserWarning, match=r"\['repetition_penalty'\] change the distribution"):
        GRPO(generation_kwargs={"repetition_penalty": 1.1, "use_cache": True})
    with pytest.raises(ValueError, match="temperature set by qmath from model.temperature"):
        GRPO(generation_kwargs={"temperature": 0.7})


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


def test_compiled_decoding_samples_as_eager_does_and_compiles_once_for_every_prompt_length(qwen_like):
    """The compiled backend (static KV cache, torch.compile'd decoding step; CUDA graphs on a GPU) on CPU."""
    import torch._dynamo.utils

    from qmath.compat import enable_activation_checkpointing
    from qmath.generation import Sampler

    module = GRPO(model_name_or_path=str(qwen_like), max_completion_length=12, temperature=0.8, num_generations=4)
    module.configure_model()
    eager, tokenizer = module.sampler, module.tokenizer
    compiled = Sampler(module.policy, tokenizer, 12, temperature=0.8, backend="compiled")
    assert not eager.compiled(torch.device("cpu")) and compiled.compiled(torch.device("cpu"))  # auto: eager on CPU
    batches = [["Tom has 3 boxes.", "A baker sells 24 muffins?"], ["How many pens are left over now?", "Hi"],
               ["What is 2 + 2?", "Seven cats and dogs."], ["One", "Two apples and three pears, how many?"]]
    enable_activation_checkpointing(module.policy)  # as t4x2.yaml: its input hook must not break the graph
    graphs = []
    for i, questions in enumerate(batches):  # prompts of 13 to 19 tokens: one bucket of 64, one compiled graph
        encoded = tokenizer(questions, return_tensors="pt", padding=True)
        ids, mask = encoded.input_ids.repeat_interleave(4, 0), encoded.attention_mask.repeat_interleave(4, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=i == 1):  # as under bf16-mixed, once
            greedy = compiled.generate(ids, mask, greedy=True, group=4)[0]
        assert torch.equal(eager.generate(ids, mask, greedy=True, group=4)[0], greedy)
        sampled = [s.generate_seeded(ids, mask, seed=3, group=4)[0] for s in (eager, compiled)]
        assert torch.equal(*sampled)  # the same draws from the same logits
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs == [graphs[0]] * 4  # compiled at the first batch, never again
