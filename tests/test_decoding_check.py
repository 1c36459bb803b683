"""The decode paths a GPU runs, checked on CPU: the captured eager step (``graphs``), the KV buffers a fixed-shape
decoder keeps for the run, and the self-check that releases a decoder whose log-probs disagree with the trainer's."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qmath.__main__ import main
from qmath.decoding import additive_mask
from qmath.decoding_check import BOUNDS, DecodingCheck, bound_for, logp_difference, non_finite_rows
from qmath.generation import Sampler
from qmath.module import GRPO
from qmath.rollout import Rollout
from tests.test_fit import scalars, tiny_config
from tests.test_sampling import _run_like_calls


@pytest.fixture(scope="module")
def qwen_module(qwen_like):
    module = GRPO(model_name_or_path=str(qwen_like), max_completion_length=12, temperature=0.8, num_generations=4)
    module.configure_model()
    return module


def graphs_sampler(module, max_rows=32, longest_prompt=140, **kw):
    sampler = Sampler(module.policy, module.tokenizer, 12, temperature=0.8, backend="graphs", **kw)
    sampler.plan(longest_prompt=longest_prompt, max_rows=max_rows)
    return sampler


def test_auto_captures_the_eager_step_below_ampere_and_compiles_from_it(qwen_module, monkeypatch):
    """Triton (torch.compile's GPU kernels) dropped pre-Ampere GPUs in 3.3: a T4 (7.5) gets ``graphs``."""
    sampler = qwen_module.sampler
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert sampler.mode(cuda) == "graphs" and sampler.compiled(cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert sampler.mode(cuda) == "compiled"
    assert sampler.mode(torch.device("cpu")) == "eager"


def test_the_graphs_step_answers_and_scores_as_the_eager_loop_over_a_runs_calls(qwen_module):
    """The fixed-shape step (whole cache under a 4-d mask, padded rows), uncaptured on CPU, over the calls of a whole
    run (rollouts, held-out batches, the last partial batch, maj@k, refills, three prompt widths, grad and inference
    modes): the same tokens as the eager loop, and log-probs equal up to fp32 rounding (attending over more slots, per
    KV head, sums in another order: up to 1.1e-5 seen with transformers 5 and 1.9e-5 with 4.57; 1e-4 as
    test_decoding's comparison with a full forward)."""
    eager, tokenizer = qwen_module.sampler, qwen_module.tokenizer
    graphs = graphs_sampler(qwen_module)
    compared = 0
    for i, (ids, mask, greedy, mode, group) in enumerate(_run_like_calls(tokenizer)):
        with mode():
            if greedy:
                got, want = (s.generate(ids, mask, greedy=True, group=group) for s in (graphs, eager))
            else:
                got, want = (s.generate_seeded(ids, mask, seed=i, group=group) for s in (graphs, eager))
        assert got.path == "graphs" and want.path == "eager"
        if greedy or ids.size(0) in graphs.shapes.rows:  # padded rows draw more noise: other draws after the first
            assert torch.equal(got.ids, want.ids), i
            if not greedy:
                torch.testing.assert_close(got.logps, want.logps, rtol=1e-4, atol=1e-4)
            compared += 1
    assert compared == 12 and graphs.compile_error is None
    assert graphs.graphs == {(rows, 204) for rows in (8, 16, 32)}


class HostReads(TorchDispatchMode):
    """Records the ops that read a tensor's value back to the host: what a CUDA graph capture cannot contain."""

    SYNCING = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal", "item")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCING:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_the_graphs_step_reads_nothing_back_to_the_host(qwen_like, top_p):
    """A CUDA graph capture fails on any op that waits for the device (``.item()``, ``bool()``, ``nonzero``): the
    step it captures, with the model's attention and the sampler's warpers, makes none."""
    module = GRPO(model_name_or_path=str(qwen_like), max_completion_length=12, temperature=0.8, top_p=top_p)
    module.configure_model()
    sampler = graphs_sampler(module, max_rows=8, longest_prompt=20)
    ids = torch.randint(5, 300, (8, 20))
    sampler.generate_seeded(ids, torch.ones_like(ids), seed=0, group=4)  # sets up the state of 8 rows
    decoder = sampler.decoders[False, "graphs"]
    state = decoder._states[8]
    with torch.inference_mode():
        state.start(ids, torch.ones_like(ids), greedy=False, min_new_tokens=0)
        with HostReads() as reads:
            decoder.step(state)
    assert reads.seen == []
    # the probe sees a read where there is one: a hook that looks at a value (what a capture would fail on)
    hook = module.policy.model.layers[0].register_forward_pre_hook(lambda m, args: float(args[0].sum()) and None)
    with torch.inference_mode(), HostReads() as reads:
        decoder.step(state)
    hook.remove()
    assert reads.seen and reads.seen[0].startswith(("aten.item", "aten._local_scalar_dense"))


def test_a_nan_left_in_a_masked_slot_changes_no_token(qwen_module):
    """A fixed-shape decoder keeps its KV buffers for the run; a NaN that an earlier call left in a slot the next call
    masks (an fp16 overflow in a longer call) must not reach it: 0 x NaN is NaN in the attention product."""
    ids = torch.randint(5, 300, (8, 20))
    mask = torch.ones_like(ids)
    clean = graphs_sampler(qwen_module).generate(ids, mask, greedy=True).ids
    poisoned = graphs_sampler(qwen_module)
    poisoned.generate(ids, mask, greedy=True)  # allocates the buffers
    decoder = poisoned.decoders[False, "graphs"]
    with torch.inference_mode():  # past anything this call writes (20 prompt + 12 tokens), masked
        for keys, values in decoder._kv:
            keys[:, :, 100:] = float("nan")
            values[:, :, -1] = float("inf")
    assert torch.equal(poisoned.generate(ids, mask, greedy=True).ids, clean)


def test_logp_difference_and_the_bounds():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.1, 0.0]])
    sampled = torch.tensor([[-1.1, -2.0, float("inf")], [-0.5, -0.4, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    torch.testing.assert_close(logp_difference(old, sampled, mask), torch.tensor([0.1, 0.0, 0.0, 0.3]))
    rollout = Rollout(prompt_ids=torch.ones(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1),
                      completion_ids=torch.ones(2, 3, dtype=torch.long), completion_mask=mask,
                      terminated=torch.ones(2, dtype=torch.bool), texts=["a", "b"], columns={},
                      sampling_logps=sampled)
    assert non_finite_rows(rollout).tolist() == [True, False]
    assert BOUNDS[torch.float16] == BOUNDS[torch.bfloat16] == bound_for(torch.float32, torch.float16)
    assert bound_for(torch.float32).mean < bound_for(torch.bfloat16).mean


def test_a_disagreeing_decoder_is_released_and_the_rollout_copys_kept_apart(qwen_module, caplog):
    """The check releases the one decoder that drew the disagreeing rollout: its buffers are freed, later calls
    decode eagerly, one warning says why; the rollout copy's decoder of the same kind goes on."""
    copy = GRPO(model_name_or_path=qwen_module.hparams.model_name_or_path).forms
    copy.load()
    sampler = graphs_sampler(qwen_module, rollout_model=copy.model.eval())
    batch = {"input_ids": torch.randint(5, 300, (2, 20)), "attention_mask": torch.ones(2, 20, dtype=torch.long)}
    check = DecodingCheck(sampler, bound_for(torch.float32))
    rollout = sampler.rollout(batch, group=4, seed=0)
    assert rollout.decoded_by == "graphs" and rollout.copied
    good = rollout.sampling_logps.clone()
    with caplog.at_level("WARNING", logger="qmath.generation"):
        stats = check(rollout, good + 1e-7 * rollout.completion_mask, step=3)  # rounding: nothing happens
        assert not sampler.failed and float(stats["sampling/sampling_logp_difference/max"].max()) < 1e-6
        check(rollout, good - 0.8 * rollout.completion_mask, step=3)  # a wrong decoder: off by 0.8 on every token
        check(rollout, good - 0.8 * rollout.completion_mask, step=4)  # released once, warned once
    assert list(sampler.failed) == [(True, "graphs")] and "at step 3" in sampler.failed[True, "graphs"]
    assert sampler.decoders[True, "graphs"].held_bytes() == 0 and not sampler.decoders[True, "graphs"]._runners
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "graphs decoding of the rollout copy failed" in warnings[0]
    assert "differ from the trainer's by 0.8" in warnings[0]
    assert sampler.rollout(batch, group=4, seed=0).decoded_by == "eager"  # the copy's calls now decode eagerly
    policy_call = sampler.generate(batch["input_ids"], batch["attention_mask"], greedy=True)
    assert policy_call.path == "graphs" and sampler.decoders[False, "graphs"].held_bytes() > 0
    assert "rollout copy's graphs decoder failed" in sampler.graph_count()


def test_a_wrong_captured_step_costs_one_rollout_not_the_run(tiny_model, in_tmp, monkeypatch, capsys, caplog):
    """Fault injection through a whole fit: the captured path's attention mask is wrong (it hides the prompt, as a
    stale buffer would). The first rollout's check finds its log-probs off, releases the decoder, and every later
    rollout decodes eagerly; TensorBoard has sampling/decoder_fallback, the end of fit says which decoder and why,
    and a checkpoint remembers it, so that a resumed run does not try it again."""
    import qmath.decoding

    def wrong(mask, dtype):
        hidden = mask.clone()
        hidden[:, :10] = 0
        return additive_mask(hidden, dtype)

    monkeypatch.setattr(qmath.decoding, "additive_mask", wrong)
    config = str(tiny_config(in_tmp, tiny_model))
    with caplog.at_level(logging.WARNING, logger="qmath.generation"):
        cli = main(["fit", "--config", "cpu", "--config", config, "--model.generation_backend", "graphs",
                    "--trainer.max_steps", "3", "--trainer.val_check_interval", "3"])
    sampler = cli.model.sampler
    assert list(sampler.failed) == [(False, "graphs")] and "at step 0" in sampler.failed[False, "graphs"]
    assert sampler.decoders[False, "graphs"].held_bytes() == 0
    warnings = [r.getMessage() for r in caplog.records if "graphs decoding" in r.getMessage()]
    assert len(warnings) == 1
    logged = scalars(in_tmp / "lightning_logs" / "cpu" / "version_0")
    assert [v for _, v in logged["train/sampling/decoder_fallback"]] == [1.0, 1.0, 1.0]
    assert all(v < 1e-3 for _, v in logged["train/sampling/sampling_logp_difference/mean"][1:])  # eager from then on
    assert logged["train/sampling/sampling_logp_difference/mean"][0][1] > BOUNDS[torch.float32].mean
    out = capsys.readouterr().out
    assert "policy's graphs decoder failed, decoding eagerly: its log-probs differ" in out
    saved = torch.load(in_tmp / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["qmath_failed_decoders"][0][0][:2] == [False, "graphs"]  # rank 0's
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qmath.generation"):
        resumed = main(["fit", "--config", "cpu", "--config", config, "--model.generation_backend", "graphs",
                        "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--ckpt_path", "last"])
    assert list(resumed.model.sampler.failed) == [(False, "graphs")]  # not tried again after the resume
    assert not [r for r in caplog.records if "graphs decoding" in r.getMessage()]


@pytest.mark.parametrize(("wrong", "said"), [("logps", "first step's log-probs differ from the plain step's by 1"),
                                             ("tokens", "first step drew other tokens than the plain step in 8 of 8")])
def test_a_capture_that_computes_something_else_is_caught_before_its_tokens_are_used(qwen_module, caplog,
                                                                                     monkeypatch, wrong, said):
    """Every compiled or captured step is run once beside the plain step on the same state when it is made, so that
    a graph only evaluation uses (which no rollout's check sees) is held to account too: here a compiled step that
    gets its log-probs or its tokens wrong (a stand-in for a bad capture) is released, and the call decodes
    eagerly."""
    sampler = Sampler(qwen_module.policy, qwen_module.tokenizer, 12, temperature=0.8, backend="compiled")
    sampler.plan(longest_prompt=20, max_rows=8)
    decoder = sampler.decoders[False, "compiled"]

    def miscompiled(state):
        decoder.step(state)
        (state.out_logps if wrong == "logps" else state.out_tokens).add_(1)

    monkeypatch.setattr(torch, "compile", lambda fn, **options: miscompiled)
    ids = torch.randint(5, 300, (8, 20))
    with caplog.at_level("WARNING", logger="qmath.generation"):
        out = sampler.generate(ids, torch.ones_like(ids), greedy=True)
    assert out.path == "eager" and list(sampler.failed) == [(False, "compiled")]
    assert said in caplog.records[0].getMessage()
    assert torch.equal(out.ids, qwen_module.sampler.generate(ids, torch.ones_like(ids), greedy=True).ids)


def test_a_copy_whose_capture_raises_decodes_eagerly_and_the_policys_decoder_goes_on(qwen_module, caplog):
    """A failed compile or capture frees what that decoder holds and marks it alone failed: the rollout copy's
    decoder raising leaves the policy's (evaluation's) decoder of the same kind decoding with fixed shapes."""
    copy = GRPO(model_name_or_path=qwen_module.hparams.model_name_or_path).forms
    copy.load()
    sampler = graphs_sampler(qwen_module, rollout_model=copy.model.eval())
    decoder = sampler.decoders[True, "graphs"]

    def broken(state):
        raise RuntimeError("operation not permitted when stream is capturing")

    decoder.step = broken
    batch = {"input_ids": torch.randint(5, 300, (2, 20)), "attention_mask": torch.ones(2, 20, dtype=torch.long)}
    with caplog.at_level("WARNING", logger="qmath.generation"):
        first = sampler.rollout(batch, group=4, seed=0)
    assert first.decoded_by == "eager" and first.sampling_logps is not None
    assert list(sampler.failed) == [(True, "graphs")] and decoder.held_bytes() == 0 and not decoder._states
    assert "RuntimeError: operation not permitted" in caplog.records[0].getMessage()
    assert sampler.generate(batch["input_ids"], batch["attention_mask"], greedy=True).path == "graphs"


def test_a_rollout_copy_that_overflows_is_dropped_and_dapo_counts_only_the_tokens_left(tiny_model, in_tmp,
                                                                                      monkeypatch):
    """fp16 copies of Qwen2 overflow on cards before Ampere. The first rollout whose copy gives a non-finite
    log-prob: those completions get no loss, dapo's divisor counts the tokens that are in the loss, the copy is
    dropped (rollouts read the policy from then on), one warning, a scalar, and a checkpoint remembers it."""
    import qmath.module
    from qmath.policy import Policy

    monkeypatch.setattr("qmath.policy._emulated", lambda *_: False)
    load = Policy.load_rollout_copy

    def overflowing(self, device, make=True):
        copy = load(self, device, make)
        if copy is not None:  # the copy's first forward of the first decode step gives one row inf logits
            def hook(module, args, output):
                if output.size(0) > 1:  # a decode step (the prefill runs one row per group)
                    output[1] = float("inf")
                    handle.remove()
            handle = copy.get_output_embeddings().register_forward_hook(hook)
        return copy

    monkeypatch.setattr(Policy, "load_rollout_copy", overflowing)
    counted = []
    num_items = qmath.module.dapo_num_items
    monkeypatch.setattr(qmath.module, "dapo_num_items", lambda tokens, parts: counted.append(float(tokens))
                        or num_items(tokens, parts))
    prepare = GRPO.prepare
    seen = []
    monkeypatch.setattr(GRPO, "prepare", lambda self, batch: seen.append(prepare(self, batch)) or seen[-1])
    config = str(tiny_config(in_tmp, tiny_model))
    with pytest.warns(UserWarning) as caught:
        cli = main(["fit", "--config", "cpu", "--config", config, "--model.rollout_dtype", "bfloat16",
                    "--model.loss_type", "dapo", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3"])
    module = cli.model
    assert module.forms.rollout_model is None and module.forms.copy_dropped and module.sampler.rollout_model is None
    first = seen[0][0]
    assert first.copied and not torch.isfinite(first.sampling_logps[1, :1]).all()
    assert first.loss_mask[1].sum() == 0 and first.loss_mask[0].sum() > 0
    assert counted[0] == float(first.loss_mask.sum()) < float(first.completion_mask.sum())
    assert not seen[1][0].copied and not seen[2][0].copied  # the policy from then on
    warnings = [str(w.message) for w in caught if "overflowed" in str(w.message)]
    assert len(warnings) == 1 and "at step 0" in warnings[0]
    logged = scalars(in_tmp / "lightning_logs" / "cpu" / "version_0")
    assert [v for _, v in logged["train/sampling/rollout_copy_dropped"]] == [1.0, 1.0, 1.0]
    saved = torch.load(in_tmp / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["qmath_rollout_copy_dropped"] is True
