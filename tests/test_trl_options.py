"""TRL 1.16's later GRPO options on hand-made tensors: each loss type and option against a direct transcription of
its paper's formula, in value and gradient, with padding, ratios away from 1 (μ > 1) and the sequence level.

The transcriptions are written per completion and per token in plain Python over the tensors' entries, the way
the papers write them, so that they share no vectorised code with :mod:`qmath.grpo`. Tolerances: fp64 inputs,
so both sides agree to rounding (1e-12 relative).
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from lightning.pytorch import Callback

from qmath.grpo import (
    chunked_token_logps,
    entropy_threshold,
    grpo_loss,
    high_entropy_mask,
    log_importance_weights,
    off_policy_sequence_mask,
    sampling_correction,
    selective_log_softmax,
    token_entropy,
    vespo_weights,
)

F64 = torch.float64
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=F64)
ADV = torch.tensor([1.5, -2.0, 0.5], dtype=F64)
# log-ratios log π_θ - log π_old far from 0 (μ > 1), some outside the clip range either way; padding is arbitrary
LOG_RATIO = torch.tensor([[0.3, -0.05, 0.1, 9.0], [-0.4, 0.25, -9.0, 3.0], [0.02, 0.5, -0.3, 0.1]], dtype=F64)
OLD = torch.tensor([[-1.2, -0.7, -2.0, -0.1], [-0.3, -1.6, -0.9, -3.0], [-2.2, -0.4, -1.1, -0.8]], dtype=F64)


def lengths() -> list[int]:
    return [int(n) for n in MASK.sum(1)]


def policy_logps() -> torch.Tensor:
    return (OLD + LOG_RATIO).clone().requires_grad_(True)


def grads(loss: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss, logps)
    return grad


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def clip(x, low, high):
    return min(max(x, low), high)


def test_gspo_sequence_level_is_one_ratio_per_completion_from_its_mean_log_ratio():
    """GSPO (Zheng et al. 2025, eq. 7): s_i = (Π_t π_θ/π_old)^(1/|o_i|); J = mean_i min(s_i A_i, clip(s_i) A_i)."""
    eps, eps_high = 3e-4, 4e-4  # GSPO's own clip range
    logps = policy_logps()
    loss, stats = grpo_loss(logps, OLD, ADV, MASK, epsilon=eps, epsilon_high=eps_high, loss_type="grpo",
                            importance_sampling_level="sequence")
    direct = 0
    for i, n in enumerate(lengths()):
        s = torch.exp(sum(logps[i, t] - OLD[i, t] for t in range(n)) / n)
        direct = direct - torch.min(s * ADV[i], clip(s, 1 - eps, 1 + eps_high) * ADV[i]) / 3
    close(loss, direct)
    close(grads(loss, logps), grads(direct, logps))
    # every sequence is far outside so tight a range: the clip binds on each, once per sequence (the two positive
    # ones from above, the negative one, mean log-ratio -0.075, from below)
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(2 / 3)
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(1 / 3)
    assert stats["clip_ratio/region_mean"].item() == pytest.approx(1.0)
    sequence = log_importance_weights(LOG_RATIO, MASK, "sequence")
    assert sequence.shape == (3, 1)
    assert sequence[1].item() == pytest.approx((-0.4 + 0.25) / 2)  # padding (-9, 3) is not in the mean


def test_cispo_weights_are_the_clipped_ratio_without_gradient():
    """MiniMax-M1 (eq. 4): J = Σ_i Σ_t sg(min(r_it, ε_max)) A_i log π_θ(o_it) / Σ_i |o_i|."""
    eps_max, num_items = 1.2, float(MASK.sum())
    logps = policy_logps()
    loss, stats = grpo_loss(logps, OLD, ADV, MASK, epsilon_high=eps_max, loss_type="cispo", num_items=num_items)
    direct, expected_grad, clipped = 0, torch.zeros_like(OLD), 0
    for i, n in enumerate(lengths()):
        for t in range(n):
            r = math.exp(LOG_RATIO[i, t].item())
            direct = direct - min(r, eps_max) * ADV[i] * logps[i, t] / num_items
            expected_grad[i, t] = -min(r, eps_max) * ADV[i] / num_items
            clipped += r > eps_max and ADV[i] > 0
    close(loss, direct)
    close(grads(loss, logps), expected_grad)  # the weight carries no gradient: only log π does
    assert stats["cispo_clip_ratio"].item() == pytest.approx(clipped / num_items)
    assert clipped == 2  # above 1.2 with A > 0: 1.35 (sequence 0) and 1.65 (sequence 2)
    assert "clip_ratio/low_mean" not in stats


def test_sapo_gate_and_its_gradient_as_the_paper_writes_them():
    """SAPO (Gao et al. 2025): f(r) = σ(τ(r - 1)) · 4/τ, J = mean_i 1/|o_i| Σ_t f(r_it) A_i, and its gradient
    ∇J = mean_i 1/|o_i| Σ_t w_it r_it A_i ∇log π, with w = 4 p (1 - p), p = σ(τ(r - 1))."""
    tau_neg, tau_pos = 1.05, 1.0
    logps = policy_logps()
    loss, stats = grpo_loss(logps, OLD, ADV, MASK, loss_type="sapo")
    direct, expected_grad = 0.0, torch.zeros_like(OLD)
    for i, n in enumerate(lengths()):
        tau = tau_pos if ADV[i] > 0 else tau_neg
        for t in range(n):
            r = math.exp(LOG_RATIO[i, t].item())
            p = 1 / (1 + math.exp(-tau * (r - 1)))
            direct -= p * 4 / tau * ADV[i].item() / n / 3
            expected_grad[i, t] = -4 * p * (1 - p) * r * ADV[i] / n / 3
    assert loss.item() == pytest.approx(direct, rel=1e-12)
    close(grads(loss, logps), expected_grad)
    assert not any(k.startswith("clip_ratio") for k in stats)


def test_luspo_scales_each_sequence_loss_by_its_length():
    """LUSPO: GSPO's per-sequence objective, each sequence's term times |o_i|, averaged over sequences."""
    eps = 0.2
    logps = policy_logps()
    loss, _ = grpo_loss(logps, OLD, ADV, MASK, epsilon=eps, loss_type="luspo", importance_sampling_level="sequence")
    direct = 0
    for i, n in enumerate(lengths()):
        s = torch.exp(sum(logps[i, t] - OLD[i, t] for t in range(n)) / n)
        direct = direct - n * torch.min(s * ADV[i], clip(s, 1 - eps, 1 + eps) * ADV[i]) / 3
    close(loss, direct)
    close(grads(loss, logps), grads(direct, logps))


def test_vespo_gamma_weight_of_the_sequence_ratio():
    """VESPO: φ(w) = e^λ w^k e^{-λ w} of the sequence ratio w = Π_t r_t (times the rollout copy's token weights),
    (k, λ) by the advantage's sign; J = Σ φ_i A_i log π / Σ |o_i|, φ without gradient."""
    k_pos, lam_pos, k_neg, lam_neg = 2.0, 3.0, 3.0, 2.0
    small = LOG_RATIO * 0.5  # sequence ratios near 1, where φ is neither 0 nor saturated
    logps = (OLD + small).clone().requires_grad_(True)
    copy_weights = torch.tensor([[1.1, 0.9, 1.0, 1.0], [1.0, 1.2, 1.0, 1.0], [0.95, 1.0, 1.05, 1.0]], dtype=F64)
    num_items = float(MASK.sum())
    for weights in (None, copy_weights):
        loss, stats = grpo_loss(logps, OLD, ADV, MASK, loss_type="vespo", num_items=num_items,
                                importance_weights=weights)
        direct, expected_grad, phis = 0, torch.zeros_like(OLD), []
        for i, n in enumerate(lengths()):
            w = math.prod(math.exp(small[i, t].item()) * (1 if weights is None else weights[i, t].item())
                          for t in range(n))
            k, lam = (k_pos, lam_pos) if ADV[i] >= 0 else (k_neg, lam_neg)
            phi = math.exp(lam) * w**k * math.exp(-lam * w)
            phis.append(phi)
            for t in range(n):
                direct = direct - phi * ADV[i] * logps[i, t] / num_items
                expected_grad[i, t] = -phi * ADV[i] / num_items
        close(loss, direct)
        close(grads(loss, logps), expected_grad)
        assert stats["vespo/phi_seq_mean"].tolist() == pytest.approx(phis, rel=1e-12)
    assert vespo_weights(torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([1.0, -1.0])).flatten().tolist() == [1, 1]
    with pytest.raises(ValueError, match="per-token importance weights"):
        grpo_loss(logps, OLD, ADV, MASK, loss_type="vespo", num_items=1.0, importance_weights=torch.ones(3, 1))


def test_delta_caps_the_unclipped_ratio_two_sided():
    """INTELLECT-2: min(min(r, δ) A, clip(r, 1 - ε, 1 + ε) A): a negative advantage no longer scales a ratio above
    δ, and such a token has no gradient; without δ it pushes with -r A."""
    eps, delta = 0.2, 1.5
    log_ratio = torch.tensor([[1.0, 0.1, -1.0]])  # r = e (above δ), 1.105, 0.368
    logps = (torch.zeros(1, 3) + log_ratio).double().requires_grad_(True)
    old, mask, adv = torch.zeros(1, 3).double(), torch.ones(1, 3).double(), torch.tensor([-1.0]).double()
    loss, stats = grpo_loss(logps, old, adv, mask, epsilon=eps, loss_type="bnpo", delta=delta)
    r = [math.exp(x) for x in log_ratio[0].tolist()]
    direct = -sum(min(min(x, delta) * -1, clip(x, 1 - eps, 1 + eps) * -1) for x in r) / 3
    assert loss.item() == pytest.approx(direct, rel=1e-12)
    grad = grads(loss, logps)[0].tolist()
    # d/dlogp of -min(...) with A = -1: token 0 capped (0), token 1 unclipped (r/3), token 2 clipped from below (0)
    assert grad == pytest.approx([0.0, r[1] / 3, 0.0], abs=1e-12)
    uncapped = grads(grpo_loss(logps, old, adv, mask, epsilon=eps, loss_type="bnpo")[0], logps)[0]
    assert uncapped[0].item() == pytest.approx(r[0] / 3)
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(1 / 3)  # token 2: r < 0.8 with A < 0


def test_bias_corrected_kl_keeps_the_value_at_ratio_one_and_changes_the_gradient():
    """DeepSeek-V3.2 (eq. 7): the k3 estimate weighted by r = π_θ / π_old. At μ = 1 (r ≡ 1 in value) the loss is
    the same and the gradient of each token's β · r · k3 gains β · k3 (∇r = r ∇log π)."""
    beta = 0.1
    ref = OLD - 0.3 * LOG_RATIO.sign()
    logps = OLD.clone().requires_grad_(True)
    plain, stats = grpo_loss(logps, logps.detach(), ADV, MASK, ref, beta=beta, loss_type="bnpo")
    corrected, corrected_stats = grpo_loss(logps, logps.detach(), ADV, MASK, ref, beta=beta, loss_type="bnpo",
                                           use_bias_correction_kl=True)
    close(plain, corrected)
    close(stats["kl"], corrected_stats["kl"])
    k3 = torch.exp(ref - OLD) - (ref - OLD) - 1
    close(grads(corrected, logps) - grads(plain, logps), beta * k3 * MASK / MASK.sum())
    # μ > 1: the value is r · k3 per token
    logps = policy_logps()
    loss, stats = grpo_loss(logps, OLD, torch.zeros(3), MASK, ref, beta=beta, loss_type="bnpo",
                            use_bias_correction_kl=True)
    direct = 0
    for i, n in enumerate(lengths()):
        for t in range(n):
            d = ref[i, t] - logps[i, t]
            direct = direct + beta * torch.exp(logps[i, t] - OLD[i, t]) * (torch.exp(d) - d - 1) / MASK.sum()
    close(loss, direct)
    close(grads(loss, logps), grads(direct, logps))


def test_top_entropy_quantile_trains_the_forking_tokens_only():
    """The 80/20 paper: the policy term on tokens whose entropy is in the top ρ of the batch; the averaging is
    unchanged (masked tokens count as zeros), and the KL still acts on every token."""
    entropies = torch.tensor([[0.1, 2.0, 0.4, 9.0], [1.5, 0.2, 9.0, 9.0], [0.9, 0.3, 3.0, 0.05]])
    kept = entropies[MASK.bool()]  # the 9 completion tokens; padding's 9.0s must not count
    threshold = entropy_threshold(kept, 0.5)
    ordered = sorted(kept.tolist())  # the median of 9 values is the 5th
    assert threshold.item() == pytest.approx(ordered[4])
    emask = high_entropy_mask(entropies, MASK, threshold)
    assert emask.tolist() == [[0, 1, 1, 0], [1, 0, 0, 0], [1, 0, 1, 0]]  # at least the median, 0.4
    assert entropy_threshold(torch.tensor([]), 0.2).item() == math.inf
    logps = policy_logps()
    loss, _ = grpo_loss(logps, OLD, ADV, MASK, loss_type="dr_grpo", max_completion_length=4, entropy_mask=emask)
    direct = 0
    for i, n in enumerate(lengths()):
        for t in range(n):
            r = torch.exp(logps[i, t] - OLD[i, t])
            term = torch.min(r * ADV[i], clip(r, 0.8, 1.2) * ADV[i])
            direct = direct - emask[i, t] * term / (3 * 4)
    close(loss, direct)
    grad = grads(loss, logps)
    close(grad, grads(direct, logps))
    assert torch.all(grad[emask == 0] == 0) and grad[emask == 1].abs().sum() > 0


def test_entropy_bonus_and_the_logged_entropy():
    """L = L_policy - c · mean H over the tokens the policy term acts on; ``entropy`` is every masked token's.
    fp32, as the log-probs always are (to 1e-5 relative: a few roundings of a 5-way softmax)."""
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    index = torch.tensor([[0, 3, 1], [4, 4, 2]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    logps, entropies = selective_log_softmax(logits, index, temperature=0.7, entropy=True, entropy_grad=True)
    coef = 0.01
    loss, stats = grpo_loss(logps, logps.detach(), torch.tensor([1.0, -1.0]), mask, loss_type="bnpo",
                            entropies=entropies, entropy_coef=coef)
    p = torch.softmax(logits / 0.7, dim=-1)
    h = -(p * p.log()).sum(-1)
    torch.testing.assert_close(entropies, h, rtol=1e-5, atol=1e-6)
    policy = -(torch.tensor([[1.0], [-1.0]]) * torch.exp(logps - logps.detach()) * mask).sum() / mask.sum()
    direct = policy - coef * (h * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, direct, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.autograd.grad(loss, logits, retain_graph=True)[0],
                               torch.autograd.grad(direct, logits)[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats["policy_loss"], policy.detach())
    assert sorted(stats["entropy"].tolist()) == pytest.approx(sorted(h[mask.bool()].tolist()), rel=1e-5)
    # without a bonus, the entropies carry no gradient (nothing of [B, T, V] is kept for them)
    _, plain = selective_log_softmax(logits, index, temperature=0.7, entropy=True)
    assert not plain.requires_grad
    quarter = torch.tensor([[math.log(2), 0.0, 0.0]])  # p = 1/2, 1/4, 1/4: 1.5 bits
    assert token_entropy(quarter, torch.logsumexp(quarter, -1)).item() == pytest.approx(1.5 * math.log(2))


@pytest.mark.parametrize("recompute_above", [0, 2**30], ids=["recomputed", "kept"])
def test_chunked_entropy_matches_full_logits_without_a_batch_of_logits(recompute_above):
    """The entropy comes from each chunk's logits, at the sampling temperature, in value and (for the bonus) in
    gradient, checkpointed or not; the largest tensor stays one chunk's logits."""
    from tests.test_grpo import LargestTensor

    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 5, 3, requires_grad=True), torch.randn(50, 3, requires_grad=True)
    index = torch.randint(0, 50, (3, 5))
    logits = (hidden @ weight.T) / 0.7
    full = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    upstream = torch.randn(3, 5)
    expected = torch.autograd.grad((full * upstream).sum(), (hidden, weight))
    with LargestTensor() as largest:
        logps, entropies = chunked_token_logps(hidden, weight, index, 0.7, chunk_size=4, entropy=True,
                                               entropy_grad=True, recompute_above=recompute_above)
        got = torch.autograd.grad((entropies * upstream).sum(), (hidden, weight))
    assert largest.numel == 4 * 50
    torch.testing.assert_close(entropies, full)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(logps, chunked_token_logps(hidden, weight, index, 0.7, chunk_size=4))
    _, detached = chunked_token_logps(hidden, weight, index, 0.7, chunk_size=4, entropy=True,
                                      recompute_above=recompute_above)
    assert not detached.requires_grad
    torch.testing.assert_close(detached, full.detach())


def test_off_policy_mask_drops_drifted_negative_sequences():
    """DeepSeek-V3.2 (eq. 9): M_i = 0 if A_i < 0 and (1/|o_i|) Σ_t log(π_old / π_θ) > δ, else 1; a dropped
    sequence has no policy loss, and its KL term stays."""
    threshold = 0.05
    logps = policy_logps()
    expected = []
    for i, n in enumerate(lengths()):
        drift = sum(-LOG_RATIO[i, t].item() for t in range(n)) / n
        expected.append(0.0 if ADV[i] < 0 and drift > threshold else 1.0)
    assert expected == [1.0, 0.0, 1.0]  # sequence 1: A < 0, mean drift (0.4 - 0.25) / 2 = 0.075
    mask = off_policy_sequence_mask(ADV, logps, OLD, MASK, threshold)
    assert mask.flatten().tolist() == expected
    ref = OLD - 0.2
    loss, _ = grpo_loss(logps, OLD, ADV, MASK, ref, beta=0.1, loss_type="bnpo", off_policy_mask=mask)
    grad = grads(loss, logps)
    kl_only = grads(grpo_loss(logps, OLD, torch.zeros(3), MASK, ref, beta=0.1, loss_type="bnpo")[0], logps)
    close(grad[1], kl_only[1])  # sequence 1: the KL's gradient only
    with_nan = OLD.clone()
    with_nan[1, 0] = float("nan")  # a token the sampler could not score counts 0, not NaN
    assert off_policy_sequence_mask(ADV, logps, with_nan, MASK, threshold)[1].item() == 1.0  # 0.25 / 2... drift -0.125


def test_per_sequence_clip_extremes():
    """TRL's clip_ratio/low_min and high_max: the extremes over sequences of each one's clipped fraction."""
    logps = policy_logps()
    _, stats = grpo_loss(logps, OLD, ADV, MASK, epsilon=0.2, loss_type="bnpo")
    # sequence 0 (A > 0): 0.3 → 1.35 clipped high of 3 tokens; 1 (A < 0): -0.4 → 0.67 low of 2; 2 (A > 0): 0.5 of 4
    assert stats["clip_ratio/high_max"].tolist() == pytest.approx([1 / 3, 0.0, 1 / 4])
    assert stats["clip_ratio/low_min"].tolist() == pytest.approx([0.0, 1 / 2, 0.0])
    assert stats["clip_ratio/region_mean"].item() == pytest.approx(3 / 9)
    empty = MASK.clone()
    empty[1] = 0  # a sequence without loss tokens has no fraction (TRL's nanmin leaves it out)
    assert len(grpo_loss(logps, OLD, ADV, empty, loss_type="bnpo")[1]["clip_ratio/low_min"]) == 2


def test_defaults_are_the_plain_loss_bit_for_bit():
    """Every new option at its default computes exactly what the loss computed before them."""
    logps = policy_logps()
    ref = OLD - 0.1
    weights, _ = sampling_correction(OLD, OLD - 0.05, MASK, "token_truncate")
    base = grpo_loss(logps, OLD, ADV, MASK, ref, 0.04, 0.2, None, "dr_grpo", 4, None, weights)[0]
    same = grpo_loss(logps, OLD, ADV, MASK, ref, 0.04, 0.2, None, "dr_grpo", 4, None, weights,
                     importance_sampling_level="token", delta=None, use_bias_correction_kl=False,
                     entropies=torch.rand(3, 4).double(), entropy_mask=None, entropy_coef=0.0, off_policy_mask=None)[0]
    assert torch.equal(base, same)


@pytest.mark.parametrize(("options", "message"), [
    ({"loss_type": "luspo"}, "model.loss_type luspo .* needs model.importance_sampling_level: sequence, got token"),
    ({"loss_type": "vespo", "importance_sampling_level": "sequence"},
     "model.loss_type vespo .* model.importance_sampling_level must be token, got sequence"),
    ({"loss_type": "vespo", "rollout_importance_sampling_mode": "sequence_mask"},
     "model.loss_type vespo .* model.rollout_importance_sampling_mode must be token_truncate or token_mask"),
    ({"loss_type": "cispo"},
     r"model.loss_type cispo caps .* model.epsilon_high, a ratio \(ScaleRL uses 5.0\), got None"),
    ({"loss_type": "cispo", "epsilon_high": 0.28}, "model.loss_type cispo caps .* got 0.28"),
    ({"loss_type": "sapo", "delta": 4.0}, "model.delta caps .* model.loss_type sapo does not have"),
    ({"delta": 0.2}, "model.delta caps the ratio itself .* must exceed 1, got 0.2"),
    ({"top_entropy_quantile": 0.0}, r"model.top_entropy_quantile must be in \(0, 1\]"),
    ({"top_entropy_quantile": 1.5}, r"model.top_entropy_quantile must be in \(0, 1\]"),
    ({"off_policy_mask_threshold": -0.1}, "model.off_policy_mask_threshold must be at least 0"),
    ({"sapo_temperature_pos": 0.0}, "model.sapo_temperature_pos must be positive"),
])
def test_options_that_make_no_sense_together_are_refused_naming_both(options, message):
    from qmath.errors import ConfigError
    from qmath.module import GRPO

    with pytest.raises(ConfigError, match=message):
        GRPO(**options)  # refused before any model loads


def test_vespo_with_sequence_correction_is_fine_without_a_rollout_copy():
    from qmath.module import GRPO

    module = GRPO(loss_type="vespo", rollout_dtype=None, rollout_importance_sampling_mode="sequence_mask")
    assert module.hparams.loss_type == "vespo"  # nothing is corrected, so no mode applies
    with pytest.warns(UserWarning, match="importance_sampling_level sequence with model.loss_type dapo"):
        GRPO(loss_type="dapo", importance_sampling_level="sequence")
    with pytest.warns(UserWarning, match=r"model.delta \(1.1\) is at most 1 \+ model.epsilon_high"):
        GRPO(delta=1.1)
    with pytest.warns(UserWarning, match="off_policy_mask_threshold .*num_iterations 1 and no model.rollout_dtype"):
        GRPO(off_policy_mask_threshold=0.5, num_iterations=1, rollout_dtype=None)


def test_fsdp_grad_norm_reduces_on_the_module_device_when_gradients_are_offloaded():
    """fsdp.yaml's cpu_offload keeps gradients in host memory; NCCL reduces only device tensors."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from qmath.steps import gradient_norm

    seen = []
    strategy = FSDPStrategy()
    strategy.reduce = lambda tensor, reduce_op: seen.append((tensor.device, reduce_op)) or torch.tensor(25.0)
    module = SimpleNamespace(device=torch.device("meta"), trainer=SimpleNamespace(strategy=strategy))
    assert gradient_norm(module, torch.tensor([3.0, 4.0])).item() == 5.0  # sqrt of every rank's summed squares
    assert seen == [(torch.device("meta"), "sum")]


FITS = {
    "cispo": ["--model.loss_type", "cispo", "--model.epsilon_high", "5.0", "--model.num_iterations", "2"],
    "sapo": ["--model.loss_type", "sapo", "--model.num_iterations", "2"],
    "luspo": ["--model.loss_type", "luspo", "--model.importance_sampling_level", "sequence"],
    "vespo": ["--model.loss_type", "vespo", "--model.num_iterations", "2"],
    # every option at once, on the clipped loss with accumulation, so that each meets the others
    "options": ["--model.loss_type", "grpo", "--model.importance_sampling_level", "sequence", "--model.delta", "4",
                "--model.use_bias_correction_kl", "true", "--model.top_entropy_quantile", "0.2",
                "--model.entropy_coef", "0.01", "--model.off_policy_mask_threshold", "0.5",
                "--model.num_iterations", "2", "--trainer.accumulate_grad_batches", "2"],
}
OWN_STATS = {"cispo": ["train/cispo_clip_ratio"], "sapo": [], "vespo": ["train/vespo/phi_seq_mean"],
             "luspo": ["train/clip_ratio/low_min", "train/clip_ratio/high_max"],
             "options": ["train/clip_ratio/low_min", "train/clip_ratio/high_max", "train/policy_loss"]}


class SlowAfterStep(Callback):
    """Sleeps after each micro-batch, as a checkpoint save does, and notes when each one starts."""

    SLEEP = 0.3
    starts: list[float] = []  # the latest run's (the CLI builds the instance)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0 and batch_idx == 0:
            SlowAfterStep.starts = []
        SlowAfterStep.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.SLEEP)


@pytest.mark.parametrize("run", list(FITS))
def test_a_short_fit_with_each_new_loss_type_logs_trl_metrics(tiny_model, in_tmp, run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from qmath.__main__ import main
    from tests.test_fit import REWARDS, check_hparams_and_layout, scalars, tiny_config

    cli = main(["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)), *FITS[run],
                "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                "--trainer.callbacks+", "tests.test_trl_options.SlowAfterStep"])
    assert cli.trainer.global_step == 2
    log_dir = in_tmp / "lightning_logs" / "cpu" / "version_0"
    logged = scalars(log_dir)
    assert all(math.isfinite(v) for _, v in logged["train/loss"]) and len(logged["train/loss"]) == 2
    names = [f"train/rewards/{n}/std" for n in [*REWARDS, "length"]] + [
        "train/entropy", "train/grad_norm", "train/step_time", "train/num_tokens",
        "train/completions/mean_terminated_length", "train/completions/min_terminated_length",
        "train/completions/max_terminated_length", *OWN_STATS[run]]
    for name in names:
        assert [s for s, _ in logged.get(name, [])] == [0, 1], f"{name}: {logged.get(name)}"
    entropy = [v for _, v in logged["train/entropy"]]
    assert all(0 < v <= math.log(cli.model.policy.config.vocab_size) for v in entropy)  # nats, at most log V
    assert all(v > 0 for _, v in logged["train/step_time"]) and all(v > 0 for _, v in logged["train/grad_norm"])
    # step_time is the micro-batches' time without what follows the optimizer step (here a sleep, as a save):
    # step 0's micro-batches lie between the first start and the next step's, less the sleep after each
    accumulate = cli.trainer.accumulate_grad_batches
    starts = SlowAfterStep.starts
    assert len(starts) == 2 * accumulate
    assert logged["train/step_time"][0][1] <= starts[accumulate] - starts[0] - accumulate * SlowAfterStep.SLEEP
    tokens = [v for _, v in logged["train/num_tokens"]]
    last = sum(int(m.prompt_mask.sum() + m.completion_mask.sum()) for m in cli.model.micro_batches)
    if cli.model.hparams.num_iterations == 2:  # one rollout for both steps: counted once
        assert tokens[0] == tokens[1] == last
    else:  # each prompt token counted once per completion, as TRL does
        assert tokens[0] > 0 and tokens[1] - tokens[0] == last
    ckpt = torch.load(in_tmp / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["qmath_num_tokens"] == tokens[-1]
    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    check_hparams_and_layout(events, [*REWARDS, "length"], logged)  # every chart draws scalars of this loss type
