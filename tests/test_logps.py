"""Per-token log-probs of a real (tiny) causal LM: from hidden states in chunks, equal to the full-logits path."""

from __future__ import annotations

import functools

import pytest
import torch

from qmath.logprobs import head_is_linear
from qmath.module import GRPO
from qmath.rollout import Rollout
from tests.test_grpo import LargestTensor


def make_rollout(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                 mask: torch.Tensor) -> Rollout:
    rows = prompt_ids.size(0)
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   completion_mask=mask, terminated=torch.ones(rows, dtype=torch.bool), texts=[""] * rows, columns={})


def rollout(vocab: int, batch: int = 8, width: int = 96) -> Rollout:
    torch.manual_seed(0)
    prompt_mask = torch.ones(batch, 5, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    mask = torch.ones(batch, width, dtype=torch.long)
    mask[1, 40:] = 0  # a completion that ended early
    return make_rollout(torch.randint(3, vocab, (batch, 5)), prompt_mask, torch.randint(3, vocab, (batch, width)),
                        mask)


def full_logits_logps(module: GRPO, model, r: Rollout) -> torch.Tensor:
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    attention = torch.cat([r.prompt_mask, r.completion_mask], 1)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(1) - 1).clamp(min=0),
                   use_cache=False).logits[:, -r.completion_ids.size(1) - 1:-1]
    return torch.log_softmax(logits / module.hparams.temperature, -1).gather(
        -1, r.completion_ids[..., None]).squeeze(-1)


def test_logps_from_hidden_states_equal_full_logits_and_never_hold_them(tiny_model):
    module = GRPO(model_name_or_path=str(tiny_model), temperature=0.7)
    module.configure_model()
    vocab = module.policy.config.vocab_size
    r = rollout(vocab)
    assert head_is_linear(module.policy)
    expected = full_logits_logps(module, module.policy, r)
    with LargestTensor() as largest:
        logps = module.token_logps(module.policy, r)
        logps.sum().backward()
    torch.testing.assert_close(logps, expected, rtol=1e-4, atol=1e-4)
    # 8 x 96 completion tokens: the largest tensor is a 512-token chunk of logits, not the batch's 768 x vocab
    assert largest.numel == 512 * vocab


def test_soft_capped_logits_keep_the_full_logits_path(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=1.0)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    torch.nn.init.normal_(model.model.embed_tokens.weight, std=3.0)  # logits big enough for the cap to bite
    module = GRPO(temperature=0.7)
    r = rollout(64, batch=2, width=6)
    assert not head_is_linear(model)
    torch.testing.assert_close(module.token_logps(model, r), full_logits_logps(module, model, r))


def grouped_rollout(vocab: int, prompts: int = 2, g: int = 4, width: int = 12) -> Rollout:
    """``prompts`` prompts of different lengths (left padded), each repeated for its ``g`` completions."""
    torch.manual_seed(1)
    prompt_ids = torch.randint(3, vocab, (prompts, 7))
    prompt_mask = torch.ones(prompts, 7, dtype=torch.long)
    prompt_mask[0, :3] = 0
    mask = torch.ones(prompts * g, width, dtype=torch.long)
    mask[1, 5:] = 0
    return make_rollout(prompt_ids.repeat_interleave(g, 0), prompt_mask.repeat_interleave(g, 0),
                        torch.randint(3, vocab, (prompts * g, width)), mask)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_each_prompt_runs_once_for_its_group_with_the_same_values_and_gradients(tiny_model, checkpointing):
    from unittest import mock

    from qmath.logprobs import groups_share_prompts

    module = GRPO(model_name_or_path=str(tiny_model), num_generations=4, gradient_checkpointing=checkpointing)
    module.configure_model()
    model = module.policy
    model.train()
    r = grouped_rollout(model.config.vocab_size)
    assert groups_share_prompts(model, r.prompt_ids, 4)
    assert not groups_share_prompts(model, r.prompt_ids.roll(1, 0), 4)  # a group with two prompts

    def logps_and_grads(share: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        with mock.patch("qmath.logprobs.groups_share_prompts", lambda *a: share):
            out = module.token_logps(model, r)
        (out * r.completion_mask).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    shapes = []
    decoder, forward = model.get_decoder(), model.get_decoder().forward
    layer_rows = []  # rows through the first layer's MLP: inside the checkpointed forward, so replays count too
    hook = decoder.layers[0].mlp.register_forward_pre_hook(lambda m, a: layer_rows.append(tuple(a[0].shape[:2])))

    @functools.wraps(forward)  # the same signature: the cache keeps its current argument name
    def spy(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    assert head_is_linear(model)  # its one-off check runs the decoder too
    with mock.patch.object(decoder, "forward", spy):
        (module.token_logps(model, r) * r.completion_mask).sum().backward()
    hook.remove()
    assert shapes == [(2, 7), (8, 12)]  # 2 prompts once each, then the 8 completions on their cache
    # under checkpointing each pass runs again in backward, prompts still once: no cache dropped, none appended twice
    assert layer_rows.count((2, 7)) == layer_rows.count((8, 12)) == (2 if checkpointing else 1)
    shared, shared_grads = logps_and_grads(True)
    plain, plain_grads = logps_and_grads(False)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared, full_logits_logps(module, model, r), rtol=1e-5, atol=1e-5)
    for a, b in zip(shared_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(not hasattr(m, "_can_checkpoint_with_cache") or not m._can_checkpoint_with_cache
               for m in model.modules())  # the switch is taken back


def test_without_the_cache_switch_checkpointed_layers_keep_the_plain_path(tiny_model, monkeypatch):
    from transformers.modeling_layers import GradientCheckpointingLayer

    from qmath.logprobs import groups_share_prompts

    module = GRPO(model_name_or_path=str(tiny_model), num_generations=4, gradient_checkpointing=True)
    module.configure_model()
    r = grouped_rollout(module.policy.config.vocab_size)
    assert groups_share_prompts(module.policy, r.prompt_ids, 4)
    monkeypatch.delattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")  # transformers before 5.2x
    assert not groups_share_prompts(module.policy, r.prompt_ids, 4)


def test_generation_from_a_shared_prefill_is_exactly_as_before(tiny_model):
    """Each prompt's prefill runs once for its G copies; greedy and seeded sampled completions are unchanged."""
    from unittest import mock

    import qmath.generation

    module = GRPO(model_name_or_path=str(tiny_model), num_generations=4, max_completion_length=10)
    module.configure_model()
    r = grouped_rollout(module.policy.config.vocab_size)
    ids, mask = r.prompt_ids, r.prompt_mask
    assert qmath.generation.shared_prefill(module.policy, ids, mask, 4)  # it applies here
    assert not qmath.generation.shared_prefill(module.policy, ids.roll(1, 0), mask, 4)  # and not to mixed groups

    def completions(share: bool) -> list[torch.Tensor]:
        prefill = qmath.generation.shared_prefill if share else (lambda *args: {})
        with mock.patch.object(qmath.generation, "shared_prefill", prefill):
            greedy = module.sampler.generate(ids, mask, greedy=True, group=4)[0]
            sampled = module.sampler.generate_seeded(ids, mask, seed=7, group=4)[0]
        return [greedy, sampled]

    shared, plain = completions(True), completions(False)
    assert all(torch.equal(a, b) for a, b in zip(shared, plain))
    assert not torch.equal(shared[1][0], shared[1][1])  # sampled: the copies of a prompt differ


def test_rollouts_join_with_their_sampling_log_probs_padded_and_refuse_a_one_sided_field():
    """Dynamic sampling joins a rollout with its refills: each per-completion field is padded on its side and kept
    row for row; a field that only one side has cannot be lined up with the rows, so joining refuses."""
    from dataclasses import replace

    a, b = grouped_rollout(50, width=5), grouped_rollout(50, prompts=1, width=7)
    a = replace(a, sampling_logps=-torch.rand(8, 5))
    b = replace(b, sampling_logps=-torch.rand(4, 7))
    joined = a.cat(b, pad_id=0)
    assert joined.sampling_logps.shape == (12, 7)
    assert torch.equal(joined.sampling_logps[:8, :5], a.sampling_logps) and (joined.sampling_logps[:8, 5:] == 0).all()
    assert torch.equal(joined.sampling_logps[8:], b.sampling_logps)
    with pytest.raises(ValueError, match="only one"):
        a.cat(replace(b, sampling_logps=None), pad_id=0)
