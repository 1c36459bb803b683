"""The GRPO math on hand-made tensors; every expected number is worked out here by hand."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qmath.grpo import (
    aggregate,
    chunked_token_logps,
    clipped_surrogate,
    completion_mask,
    dapo_num_items,
    group_advantages,
    grpo_loss,
    k3_kl,
    masked_mean,
    selective_log_softmax,
)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 3.0, 2.0, 2.0, 2.0])  # two groups of three
    adv, std = group_advantages(rewards, group_size=3)
    # group 1: mean 4/3; unbiased var = ((1/3)^2 + (4/3)^2 + (5/3)^2) / 2 = 7/3
    s = math.sqrt(7 / 3)
    expected = torch.tensor([(1 - 4 / 3) / (s + 1e-4), (0 - 4 / 3) / (s + 1e-4), (3 - 4 / 3) / (s + 1e-4), 0, 0, 0])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(std, torch.tensor([s, s, s, 0.0, 0.0, 0.0]))


def test_group_advantages_batch_and_no_scaling_by_hand():
    rewards = torch.tensor([1.0, 0.0, 3.0, 2.0, 2.0, 2.0])
    group_means = torch.tensor([4 / 3] * 3 + [2.0] * 3)
    # batch: mean 5/3; squared deviations 4/9, 25/9, 16/9, 1/9 x3 = 48/9; unbiased var 48/45 = 16/15
    adv, std = group_advantages(rewards, 3, scale_rewards="batch")
    torch.testing.assert_close(adv, (rewards - group_means) / (math.sqrt(16 / 15) + 1e-4))
    torch.testing.assert_close(std, torch.tensor([math.sqrt(7 / 3)] * 3 + [0.0] * 3))  # still the group std
    # batch across ranks: the std of everyone's rewards is given
    adv, _ = group_advantages(rewards, 3, scale_rewards="batch", batch_rewards=torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(adv, (rewards - group_means) / (math.sqrt(2) + 1e-4))
    adv, _ = group_advantages(rewards, 3, scale_rewards="none")  # Dr. GRPO
    torch.testing.assert_close(adv, torch.tensor([-1 / 3, -4 / 3, 5 / 3, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, 3, scale_rewards="std")


def test_aggregate_each_loss_type_by_hand():
    pad = 100.0  # must never count
    per_token = torch.tensor([[1.0, 2.0, 3.0, pad], [4.0, 5.0, pad, pad], [6.0, 7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])  # lengths 3, 2, 4; 9 tokens; sum 45
    assert aggregate(per_token, mask, "grpo").item() == pytest.approx((6 / 3 + 9 / 2 + 30 / 4) / 3)
    assert aggregate(per_token, mask, "bnpo").item() == pytest.approx(45 / 9)
    assert aggregate(per_token, mask, "dr_grpo", max_completion_length=5).item() == pytest.approx(45 / (3 * 5))
    assert aggregate(per_token, mask, "dapo", num_items=15).item() == pytest.approx(45 / 15)
    with pytest.raises(ValueError, match="num_items"):
        aggregate(per_token, mask, "dapo")
    with pytest.raises(ValueError, match="loss_type"):
        aggregate(per_token, mask, "ppo")


# Three completions: A = 2 (lengths 2), A = -1 (length 3), A = 0 (length 1); ratios away from 1; clip-higher.
RATIOS = torch.tensor([[1.5, 0.7, 1.0, 1.0], [1.1, 0.5, 1.3, 1.0], [2.0, 1.0, 1.0, 1.0]])
MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
ADV = torch.tensor([2.0, -1.0, 0.0])
# Per token -min(ρA, clip(ρ, 0.8, 1.28)A), by hand:
#   row 1: ρ 1.5 -> -min(3.0, 2.56) = -2.56 (high clip); ρ 0.7 -> -min(1.4, 1.6) = -1.4
#   row 2: ρ 1.1 -> 1.1; ρ 0.5 -> -min(-0.5, -0.8) = 0.8 (low clip); ρ 1.3 -> -min(-1.3, -1.28) = 1.3 (no clip)
#   row 3: A = 0 -> 0
ROW_SUMS = [-3.96, 3.2, 0.0]


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [
        ("grpo", (-3.96 / 2 + 3.2 / 3 + 0.0) / 3),
        ("bnpo", sum(ROW_SUMS) / 6),
        ("dr_grpo", sum(ROW_SUMS) / (3 * 4)),
        ("dapo", sum(ROW_SUMS) / 20),
    ],
)
def test_grpo_loss_types_with_clip_higher_by_hand(loss_type, expected):
    old = torch.log(torch.full((3, 4), 0.3))
    logps = old + torch.log(RATIOS)
    loss, stats = grpo_loss(logps, old, ADV, MASK, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type,
                            max_completion_length=4, num_items=20)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(1 / 6)
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(1 / 6)
    assert stats["clip_ratio/region_mean"].item() == pytest.approx(2 / 6)
    assert "kl" not in stats


def test_symmetric_clip_binds_earlier_by_hand():
    old = torch.log(torch.full((3, 4), 0.3))
    loss, stats = grpo_loss(old + torch.log(RATIOS), old, ADV, MASK, epsilon=0.2, loss_type="bnpo")
    # ε_high = 0.2: row 1's first token becomes -2.4 instead of -2.56; row 2's ρ 1.3 still unclipped (A < 0)
    assert loss.item() == pytest.approx((-2.4 - 1.4 + 3.2) / 6, abs=1e-6)
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(1 / 6)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_gradient_is_minus_advantage_times_grad_logp_per_loss_type(loss_type):
    # ρ = 1, β = 0: ∇loss = Σ_t -A_i w_it ∇log π_t, with the weights w the loss type says (0 on padding).
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (3, 4))
    logps = selective_log_softmax(logits, tokens)
    lengths = MASK.sum(1, keepdim=True).float()
    weights = {"grpo": MASK / lengths / 3, "bnpo": MASK / 6.0, "dr_grpo": MASK / (3 * 4.0), "dapo": MASK / 20.0}
    loss, _ = grpo_loss(logps, logps.detach(), ADV, MASK, loss_type=loss_type, max_completion_length=4,
                        num_items=20)
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (expected,) = torch.autograd.grad((-ADV[:, None] * weights[loss_type] * logps).sum(), logits)
    torch.testing.assert_close(grad, expected)
    assert grad[0, 2:].abs().sum() == 0  # padding gets no gradient


def test_dapo_divides_by_the_steps_tokens_also_when_they_are_fewer_than_its_micro_batches():
    # Two micro-batches (accumulation 2, one rank) with one loss token between them: the step's gradient is that
    # token's whole -A, as TRL gives it. A clamp of each micro-batch's share (0.5 tokens) at 1 would halve it.
    logps = torch.zeros(2, 3, requires_grad=True)
    masks = [torch.tensor([[1, 0, 0]]), torch.tensor([[0, 0, 0]])]
    num_items = dapo_num_items(sum(m.sum() for m in masks), micro_batches=2)
    step = sum(grpo_loss(logps[i:i + 1], logps[i:i + 1].detach(), torch.tensor([1.0]), masks[i], loss_type="dapo",
                         num_items=num_items)[0] / 2 for i in range(2))  # / 2: Lightning's division by accumulation
    step.backward()
    assert logps.grad[0, 0].item() == pytest.approx(-1.0) and logps.grad.abs().sum().item() == pytest.approx(1.0)
    assert dapo_num_items(torch.tensor(0), micro_batches=2).item() == 0.5  # no tokens at all: no division by 0


def test_group_advantages_rejects_a_broken_group():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), group_size=4)


def test_selective_log_softmax_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 11)
    index = torch.randint(0, 11, (5, 7))
    expected = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, index, chunk_size=2), expected)
    scaled = torch.log_softmax(logits / 0.7, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, index, temperature=0.7, chunk_size=3), scaled)


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 6, 2, 9, 2], [5, 6, 7, 8, 9], [2, 2, 2, 2, 2]])
    mask, terminated = completion_mask(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert terminated.tolist() == [True, False, True]
    mask, _ = completion_mask(ids, [2, 7])  # several EOS ids
    assert mask[1].tolist() == [1, 1, 1, 0, 0]


def test_k3_kl_by_hand():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.2)]), torch.tensor([math.log(0.25), math.log(0.2)])
    # delta = ln(0.25/0.5) = -ln 2: exp(-ln 2) + ln 2 - 1 = 0.5 + 0.6931 - 1
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([0.5 + math.log(2) - 1, 0.0]))


def test_clipped_surrogate_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]]))  # ratios 1.5, 0.5, 1.1, 0.7
    sur, low, high = clipped_surrogate(logp, old, torch.tensor([2.0]), epsilon=0.2)
    # A > 0: min(rA, clip(r)A) -> 1.2*2 (clipped), 0.5*2, 1.1*2, 0.7*2
    torch.testing.assert_close(sur, torch.tensor([[2.4, 1.0, 2.2, 1.4]]))
    assert high.tolist() == [[True, False, False, False]] and not low.any()
    sur, low, high = clipped_surrogate(logp, old, torch.tensor([-1.0]), epsilon=0.2, epsilon_high=0.28)
    # A < 0: min(-r, -clip(r)) -> -1.5, -0.8 (clipped), -1.1, -0.8 (clipped)
    torch.testing.assert_close(sur, torch.tensor([[-1.5, -0.8, -1.1, -0.8]]))
    assert low.tolist() == [[False, True, False, True]] and not high.any()


def test_grpo_loss_by_hand_with_padding_and_kl():
    # Two sequences of lengths 3 and 1 (the rest padding), ratio 1, advantages +1 and -0.5.
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.9], [0.25, 0.3, 0.3, 0.3]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.5, 0.1], [0.25, 0.9, 0.9, 0.9]]))
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    adv = torch.tensor([1.0, -0.5])
    loss, stats = grpo_loss(logp, logp.detach(), adv, mask, ref, beta=0.1, epsilon=0.2)
    kl_first = 0.5 + math.log(2) - 1  # the one token where ref differs inside the mask
    seq1 = (-1.0 * 3 + 0.1 * kl_first) / 3  # -(A) per token + beta*kl, mean over 3 tokens
    seq2 = 0.5  # -(-0.5) on its one token, kl 0
    assert loss.item() == pytest.approx((seq1 + seq2) / 2, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(kl_first / 4, abs=1e-6)
    assert stats["clip_ratio/region_mean"].item() == 0.0


def test_grpo_loss_gradient_is_minus_advantage_times_grad_logp():
    # With ratio 1 and beta 0, d loss / d logp_t = -A_i / (B * n_i) on real tokens, 0 on padding.
    logp = torch.log(torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.6, 0.1]])).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([2.0, -1.0])
    loss, _ = grpo_loss(logp, logp.detach(), adv, mask, beta=0.0)
    loss.backward()
    expected = torch.tensor([[-2.0 / 4, -2.0 / 4, 0.0], [1.0 / 6, 1.0 / 6, 1.0 / 6]])
    torch.testing.assert_close(logp.grad, expected)


def test_masked_mean_empty_rows_are_zero():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert masked_mean(values, torch.tensor([[1, 0], [0, 0]]), dim=1).tolist() == [1.0, 0.0]
    assert masked_mean(values, torch.tensor([[1, 1], [1, 0]])).item() == pytest.approx(2.0)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("recompute_above", [0, 2**30], ids=["recomputed", "kept"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_token_logps_matches_full_logits_in_value_and_gradient(temperature, recompute_above):
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 3, requires_grad=True)
    weight = torch.randn(50, 3, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    index = torch.randint(0, 50, (3, 5))
    upstream = torch.randn(3, 5)
    full = torch.log_softmax((hidden @ weight.T + bias) / temperature, -1).gather(-1, index[..., None]).squeeze(-1)
    expected = torch.autograd.grad((full * upstream).sum(), (hidden, weight, bias))
    # 15 tokens in chunks of 4: the last chunk is short
    with LargestTensor() as largest:
        logps = chunked_token_logps(hidden, weight, index, temperature, bias, chunk_size=4,
                                    recompute_above=recompute_above)
        grads = torch.autograd.grad((logps * upstream).sum(), (hidden, weight, bias))
    torch.testing.assert_close(logps, full)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    # one chunk's logits (4 x 50) are the largest tensor; the whole batch's (15 x 50) never exist
    assert largest.numel == 4 * 50
    with torch.no_grad():
        torch.testing.assert_close(chunked_token_logps(hidden, weight, index, temperature, bias, chunk_size=4), full)
