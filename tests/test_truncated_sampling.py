"""Top-k and top-p replayed by the trainer: its log-probs are over the tokens sampling keeps, as the sampler's are,
so that the ratio to them measures a change of policy and not the kept probability mass (huggingface/trl#6789)."""

from __future__ import annotations

import pytest
import torch

from qmath.decoding import Sampling
from qmath.grpo import chunked_token_logps, k3_kl, selective_log_softmax, token_entropy, truncated_away
from qmath.logprobs import token_logps
from qmath.module import GRPO

CASES = [(5, 1.0), (None, 0.9), (5, 0.8)]  # top-k only, top-p only, both
IDS = ["top_k", "top_p", "both"]
QUESTIONS = ["Tom has 3 boxes of pens.", "A baker sells 24 muffins in the morning and 12 more. How many?"]


def hand_made(temperature: float, top_k: int | None, top_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ``[2, 6, 40]``, with a tie at the 5th and 6th largest of one row; labels drawn from what the warpers
    keep, except at ``[0, 1]``: the smallest logit, which they drop; and what the warpers keep."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 40) * 2
    row = logits[0, 0]
    order = row.argsort(descending=True)
    row[order[5]] = row[order[4]]  # top-k 5 keeps both
    warped = logits.reshape(-1, 40)
    for warper in Sampling(temperature, top_k, top_p).warpers():
        warped = warper(None, warped)
    kept = torch.isfinite(warped).view(2, 6, 40)
    labels = torch.multinomial(warped.softmax(-1), 1, generator=torch.Generator().manual_seed(1)).view(2, 6)
    labels[0, 1] = logits[0, 1].argmin()
    assert not kept[0, 1, labels[0, 1]]  # the case of a label outside the set is there
    if top_k and top_p == 1.0:
        assert kept[0, 0].sum() == 6  # and the tie at the k-th score
    return logits, labels, kept


def expected_logps(logits, labels, kept, temperature):
    """log_softmax over what transformers' warpers keep, and the label."""
    kept = kept.scatter(-1, labels[..., None], True)
    scaled = (logits / temperature).masked_fill(~kept, -torch.inf)
    return scaled.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)


def replayed(path: str, logits, labels, temperature, top_k, top_p, **kwargs):
    """The log-probs (and entropies) through the full-logits path, or the chunked one with the logits as hidden
    states of an identity head (its product is exact: each logit is x · 1 plus zeros)."""
    if path == "full":
        return selective_log_softmax(logits, labels, temperature, chunk_size=1, top_k=top_k, top_p=top_p, **kwargs)
    return chunked_token_logps(logits, torch.eye(logits.size(-1)), labels, temperature, chunk_size=5, top_k=top_k,
                               top_p=top_p, **kwargs)


@pytest.mark.parametrize("path", ["full", "chunked", "chunked-recomputed"])
@pytest.mark.parametrize("top_k, top_p", CASES, ids=IDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_are_over_what_transformers_warpers_keep_and_the_label(path, top_k, top_p, temperature):
    logits, labels, kept = hand_made(temperature, top_k, top_p)
    logits.requires_grad_()
    kwargs = {"recompute_above": 0} if path == "chunked-recomputed" else {}
    logps = replayed(path.split("-")[0], logits, labels, temperature, top_k, top_p, **kwargs)
    torch.testing.assert_close(logps, expected_logps(logits.detach(), labels, kept, temperature))
    assert torch.isfinite(logps).all()
    # the mask itself is the warpers', bit for bit, less the label
    removed = truncated_away(logits.detach() / temperature, labels, top_k, top_p)
    assert torch.equal(removed, ~kept.scatter(-1, labels[..., None], True))
    # the gradient is log_softmax's over the kept logits and the label's: none reaches the others
    got = torch.autograd.grad(logps.sum(), logits)[0]
    expected = torch.autograd.grad(expected_logps(logits, labels, kept, temperature).sum(), logits)[0]
    torch.testing.assert_close(got, expected)
    assert removed.any() and (got[removed] == 0).all() and (got[~removed] != 0).any()


@pytest.mark.parametrize("path", ["full", "chunked"])
def test_the_entropy_stays_over_the_whole_vocabulary(path):
    """Also with a gradient (the entropy bonus), which keeps the unmasked logits for backward."""
    temperature, top_k, top_p = 0.7, 5, 0.8
    logits, labels, _ = hand_made(temperature, top_k, top_p)
    logits.requires_grad_()
    logps, entropies = replayed(path, logits, labels, temperature, top_k, top_p, entropy=True, entropy_grad=True)
    scaled = logits / temperature
    full = token_entropy(scaled, scaled.logsumexp(-1), grad=True)
    torch.testing.assert_close(entropies, full)
    got = torch.autograd.grad((logps + entropies).sum(), logits)[0]
    alone = replayed(path, logits, labels, temperature, top_k, top_p)
    expected = torch.autograd.grad((alone + full).sum(), logits)[0]
    torch.testing.assert_close(got, expected)


def test_without_top_k_and_top_p_nothing_changes_bit_for_bit():
    logits, labels, _ = hand_made(0.7, None, 0.9)
    for path in ("full", "chunked"):
        plain = replayed(path, logits, labels, 0.7, None, 1.0, entropy=True)
        if path == "full":
            before = selective_log_softmax(logits, labels, 0.7, chunk_size=1, entropy=True)
        else:
            before = chunked_token_logps(logits, torch.eye(40), labels, 0.7, chunk_size=5, entropy=True)
        assert all(torch.equal(a, b) for a, b in zip(plain, before))


def sampled(qwen_like, **options):
    """A GRPO module of ``qwen_like`` at temperature 0.8 with ``options``, and a rollout of 2 prompts x 4 drawn by
    qmath's loop from the fp32 policy itself."""
    module = GRPO(model_name_or_path=str(qwen_like), max_completion_length=12, num_generations=4, temperature=0.8,
                  rollout_dtype=None, **options)
    module.configure_model()
    encoded = module.tokenizer(QUESTIONS, return_tensors="pt", padding=True)
    batch = {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask}
    rollout = module.sampler.rollout(batch, 4, 3)
    assert rollout.sampling_logps is not None  # qmath's loop decoded it
    return module, rollout


@pytest.mark.parametrize("top_k, top_p", [(None, 0.9), (20, 1.0), (20, 0.9)], ids=IDS)
@pytest.mark.parametrize("linear_head", [True, False], ids=["chunked", "full-logits"])
def test_at_mu_1_the_ratio_to_the_sampling_log_probs_is_1(qwen_like, top_k, top_p, linear_head):
    """μ = 1, fp32 rollouts from the policy itself: π_old is the distribution the tokens were drawn from, so
    exp(π_old - π_sampling) is 1 but for rounding. The loop's logits come a token at a time through the KV cache,
    the trainer's all at once (and, chunked, from the hidden states with each prompt run once for its group): fp32
    sums in another order, which on this model put the log-probs up to 1.7e-5 apart without top-k or top-p and
    4.4e-5 with both, hence 1e-4 on the ratio (test_decoding's tolerance on the same log-probs). Over the whole
    vocabulary each ratio would instead be the kept mass: 0.84 to 0.91 on average here."""
    module, rollout = sampled(qwen_like, top_k=top_k, top_p=top_p)
    module.forms.linear_heads[id(module.policy)] = linear_head
    with torch.no_grad():
        old = module.token_logps(module.policy, rollout)
        whole = token_logps(module.policy, rollout, 0.8, 4, linear_head)
    mask = rollout.completion_mask.bool()
    ratio = torch.exp(old - rollout.sampling_logps)[mask]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-4)
    assert torch.exp(whole - rollout.sampling_logps)[mask].mean() < 0.99  # the test can fail


def test_the_kl_at_the_start_is_0_under_top_p(qwen_like):
    """Policy and reference score the rollout alike, each over the tokens top-p keeps of its own distribution: at
    the start they are one model, so the k3 KL is exactly 0 (a reference scored over the whole vocabulary would
    give log(1 / kept mass) per token), and both are the sampling log-probs (to 1e-4, as in the test above)."""
    module, rollout = sampled(qwen_like, top_p=0.9, beta=0.04)
    module.forms.load_reference(torch.device("cpu"), 0.04)
    assert module.forms.needs_reference(0.04)
    with torch.no_grad():
        logps = module.token_logps(module.policy, rollout)
        ref = module.reference_logps(rollout)
    mask = rollout.completion_mask.bool()
    assert torch.equal(k3_kl(logps, ref)[mask], torch.zeros(int(mask.sum())))
    ratio = torch.exp(ref - rollout.sampling_logps)[mask]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-4)


def test_the_replay_holds_no_more_than_a_chunk_of_logits(tiny_model):
    """8 x 96 completion tokens at top-k 20 and top-p 0.9: the largest tensor, forward and backward, is still a
    512-token chunk of logits (the mask of the same size is bytes), not the batch's 768 x vocab."""
    from tests.test_grpo import LargestTensor
    from tests.test_logps import rollout

    module = GRPO(model_name_or_path=str(tiny_model), temperature=0.7, top_k=20, top_p=0.9)
    module.configure_model()
    vocab = module.policy.config.vocab_size
    r = rollout(vocab)
    with LargestTensor() as largest:
        logps = module.token_logps(module.policy, r)
        logps.sum().backward()
    assert torch.isfinite(logps).all()  # random labels, many outside the kept set
    assert largest.numel == 512 * vocab
