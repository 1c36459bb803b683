"""GRPO math as pure tensor functions: advantages, per-token log-probs, the clipped surrogate and the k3 KL.

Shapes: ``B`` completions, ``T`` completion tokens, ``V`` vocabulary. ``mask`` is 1 on completion tokens up to and
including the first EOS and 0 after it (padding). Nothing here knows about models or Lightning.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers import TopKLogitsWarper, TopPLogitsWarper

ScaleRewards = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
# the loss types whose policy term is PPO's clipped surrogate (the others: cispo, sapo, vespo)
CLIPPED: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# where the policy term's sum is divided by the step's tokens (dapo_num_items)
STEP_TOKENS: tuple[str, ...] = ("dapo", "cispo", "vespo")
ImportanceSamplingLevel = Literal["token", "sequence"]
VespoParameters = tuple[float, float, float, float]  # k_pos, lambda_pos, k_neg, lambda_neg
# TRL's vllm_importance_sampling_mode values: per token or per sequence; ratios out of bounds clipped or zeroed
SamplingCorrection = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


def group_advantages(
    rewards: Tensor, group_size: int, scale_rewards: ScaleRewards = "group", eps: float = 1e-4,
    batch_rewards: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Group-relative advantages ``r - mean_g``, divided by a std as ``scale_rewards`` says, and each group's std.

    ``rewards`` holds ``B = n_groups * group_size`` values, the ``group_size`` completions of one prompt adjacent.
    ``scale_rewards``: ``group`` divides by the group's std + ``eps`` (DeepSeekMath); ``batch`` by the std of
    ``batch_rewards`` (all rewards of the step, across ranks; default ``rewards``) + ``eps``; ``none`` not at all
    (Dr. GRPO). Stds are the unbiased ones, as in DeepSeekMath and TRL. The second output is always the group std.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    advantages = grouped - mean
    if scale_rewards == "group":
        advantages = advantages / (std + eps)
    elif scale_rewards == "batch":
        advantages = advantages / ((rewards if batch_rewards is None else batch_rewards).std() + eps)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    return advantages.flatten(), std.expand_as(grouped).flatten()


def selective_log_softmax(
    logits: Tensor, index: Tensor, temperature: float = 1.0, chunk_size: int = 4, entropy: bool = False,
    entropy_grad: bool = False, top_k: int | None = None, top_p: float = 1.0,
) -> Tensor | tuple[Tensor, Tensor]:
    """``log_softmax(logits / temperature)[..., index]`` without materialising a second ``[B, T, V]`` tensor; with
    ``entropy``, also each position's entropy (:func:`token_entropy`; with a gradient only if ``entropy_grad``).
    With ``top_k`` or ``top_p`` < 1, the log-softmax is over the tokens sampling keeps (:func:`truncated_away`).

    Works ``chunk_size`` rows at a time: ``logit[index] - logsumexp(logits)`` per row, so a scaled copy of the
    logits exists for one chunk at a time only.
    """
    out, entropies = [], []
    for rows, ids in zip(logits.split(chunk_size), index.split(chunk_size)):
        scores = rows.float()  # half-precision logits lose the small log-prob differences the ratio and KL need
        if temperature != 1.0:
            scores = scores / temperature
        logps, chunk_entropy = _picked_logps(scores, ids, entropy, entropy_grad, top_k, top_p,
                                             own=scores is not rows)
        out.append(logps)
        if entropy:
            entropies.append(chunk_entropy)
    return (torch.cat(out), torch.cat(entropies)) if entropy else torch.cat(out)


def truncates(top_k: int | None, top_p: float) -> bool:
    """Whether top-k or top-p cut the distribution rollouts are drawn from (the conditions of
    ``qmath.decoding.Sampling.warpers``)."""
    return bool(top_k) or top_p < 1.0


@torch.no_grad()
def truncated_away(scores: Tensor, keep: Tensor, top_k: int | None = None, top_p: float = 1.0,
                   rows: int = 64) -> Tensor:
    """Where transformers' top-k and then top-p warpers set ``scores`` (``[..., V]``, already divided by the
    temperature) to -inf, as the decode loop and ``generate`` apply them, except at each position's ``keep`` token
    (``[...]``): a boolean mask of ``scores``' shape.

    The warpers themselves, so that the trainer replays whatever the installed transformers samples with (top-k
    keeps every tie of the k-th score; top-p drops the ascending-sorted tokens whose cumulative probability is at
    most ``1 - top_p``, never the most likely one). ``keep`` (the sampled token) stays in even where the trainer's
    logits, rounded differently from the sampler's, put it just outside: its log-prob is then finite, not -inf.
    ``rows`` positions at a time, because top-p's sort, indices, softmax and cumulative sum are four more
    temporaries of the rows' size.

    >>> truncated_away(torch.tensor([[3.0, 2.0, 2.0, 0.0]]), torch.tensor([0]), top_k=2)  # both ties at the 2nd
    tensor([[False, False, False,  True]])
    >>> truncated_away(torch.tensor([[3.0, 2.0, 2.0, 0.0]]), torch.tensor([3]), top_k=1)  # and the sampled token
    tensor([[False,  True,  True, False]])
    """
    warpers = ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])
    flat = scores.reshape(-1, scores.size(-1))  # top-p's scatter is along dim 1
    removed = torch.empty(flat.shape, dtype=torch.bool, device=flat.device)
    for part, out in zip(flat.split(rows), removed.split(rows)):
        for warper in warpers:
            part = warper(None, part)
        torch.isneginf(part, out=out)
    removed.scatter_(-1, keep.reshape(-1, 1), False)
    return removed.view(scores.shape)


def _picked_logps(scores: Tensor, index: Tensor, entropy: bool, entropy_grad: bool, top_k: int | None,
                  top_p: float, own: bool) -> tuple[Tensor, Tensor | None]:
    """``log_softmax(scores)[..., index]``, over the tokens top-k and top-p keep where they are set, and with
    ``entropy`` the entropy of ``softmax(scores)``. ``own``: ``scores`` is a temporary that may be overwritten."""
    if not truncates(top_k, top_p):
        lse = torch.logsumexp(scores, dim=-1)
        logps = scores.gather(-1, index.unsqueeze(-1)).squeeze(-1) - lse
        return logps, token_entropy(scores, lse, entropy_grad) if entropy else None
    # The entropy stays the policy's over the whole vocabulary: the quantity TRL logs and the 80/20 paper ranks
    # tokens by, comparable across top_p settings, and an entropy bonus's gradient reaches every logit as before.
    entropies = token_entropy(scores, torch.logsumexp(scores, dim=-1), entropy_grad) if entropy else None
    # The sampler returns log-probs renormalised over the kept tokens (TRL's processed log-probs); over the whole
    # vocabulary every ratio to them would carry the kept mass, which is no change of policy. masked_fill's
    # gradient is 0 where it filled: only the kept logits get one.
    removed = truncated_away(scores.detach(), index, top_k, top_p)
    if own and not (entropy and entropy_grad):  # (an entropy with a gradient keeps these scores for backward)
        scores = scores.masked_fill_(removed, -math.inf)
    else:
        scores = scores.masked_fill(removed, -math.inf)
    return scores.gather(-1, index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scores, dim=-1), entropies


def token_entropy(logits: Tensor, logsumexp: Tensor, grad: bool = False) -> Tensor:
    """The entropy of ``softmax(logits)`` over the last dimension, in nats: ``logsumexp - Σ p · logits``, given the
    logits' ``logsumexp``; without a gradient unless ``grad`` (the entropy bonus), which would keep a ``[.., V]``
    softmax for backward.

    >>> token_entropy(torch.zeros(1, 4), torch.logsumexp(torch.zeros(1, 4), dim=-1))  # uniform over 4: log 4
    tensor([1.3863])
    """
    if grad and torch.is_grad_enabled():
        return logsumexp - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
    with torch.no_grad():  # one [.., V] temporary besides the logits: the product overwrites the softmax
        return logsumexp.detach() - torch.softmax(logits, dim=-1).mul_(logits).sum(dim=-1)


def chunked_token_logps(
    hidden: Tensor, weight: Tensor, index: Tensor, temperature: float = 1.0, bias: Tensor | None = None,
    chunk_size: int = 512, recompute_above: int = 256 * 2**20, entropy: bool = False, entropy_grad: bool = False,
    top_k: int | None = None, top_p: float = 1.0,
) -> Tensor | tuple[Tensor, Tensor]:
    """``log_softmax((hidden @ weight.T + bias) / temperature)[..., index]``, ``[B, T]``, from hidden states; with
    ``entropy``, also the entropy of each token's distribution, ``[B, T]`` (TRL's ``entropy``; with a gradient only
    if ``entropy_grad``, for the entropy bonus), from the same chunk of logits. With ``top_k`` or ``top_p`` < 1,
    the log-softmax is over the tokens sampling keeps (:func:`truncated_away`), the entropy still over all.

    ``hidden`` is ``[B, T, H]`` (the last hidden states), ``weight`` the ``[V, H]`` output embedding. The logits
    exist for ``chunk_size`` tokens at a time only, never for the whole batch: a ``[B, T, V]`` tensor is the usual
    out-of-memory in GRPO (8 x 512 tokens x 151,936 vocabulary is 2.5 GB in fp32, and log-softmax and its gradient
    need more copies). With autograd on and the batch's logits over ``recompute_above`` bytes, each chunk is
    checkpointed, so backward recomputes one chunk's logits instead of keeping them all; below it, keeping them
    costs little memory and saves the recomputation (8 x 96 tokens x 49,152 vocabulary: 151 MB; measured 4% of a
    step of the embedded model on CPU).

    The logits and their log-softmax are fp32 whatever the weights' dtype or an enclosing autocast: the k3 KL and
    the ratio are small differences of log-probs, which bf16's 8 bits of mantissa (0.4% of a logit of 10) drown.
    """
    flat, ids = hidden.reshape(-1, hidden.size(-1)), index.reshape(-1)
    weight, bias = weight.float(), None if bias is None else bias.float()  # no copy when already fp32
    grad = torch.is_grad_enabled() and (flat.requires_grad or weight.requires_grad)
    grad = grad and flat.size(0) * weight.size(0) * flat.element_size() > recompute_above
    out, entropies = [], []
    for h, i in zip(flat.split(chunk_size), ids.split(chunk_size)):
        if grad:  # only checkpointing depends on it: without, autograd records the chunk as usual
            chunk = checkpoint(_chunk_logps, h, weight, bias, i, temperature, entropy, entropy_grad, top_k, top_p,
                               use_reentrant=False)
        else:
            chunk = _chunk_logps(h, weight, bias, i, temperature, entropy, entropy_grad, top_k, top_p)
        out.append(chunk[0])
        if entropy:
            entropies.append(chunk[1])
    logps = torch.cat(out).view(index.shape)
    return (logps, torch.cat(entropies).view(index.shape)) if entropy else logps


def _chunk_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor, temperature: float,
                 entropy: bool, entropy_grad: bool, top_k: int | None = None,
                 top_p: float = 1.0) -> tuple[Tensor, Tensor | None]:
    with torch.autocast(hidden.device.type, enabled=False):  # 16-mixed would run the head in fp16
        logits = F.linear(hidden.float(), weight, bias)
    if temperature != 1.0:
        logits = logits.div_(temperature)  # in place: linear's backward does not need its output
    return _picked_logps(logits, index, entropy, entropy_grad, top_k, top_p, own=True)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1; 0 where a row has no such position."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(π‖π_ref): ``exp(ref - logp) - (ref - logp) - 1`` (Schulman), always ≥ 0."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def aggregate(
    per_token: Tensor, mask: Tensor, loss_type: LossType = "grpo", max_completion_length: int | None = None,
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar the way ``loss_type`` says (the names are TRL's).

    - ``grpo``: each sequence's token mean, then the mean over sequences (DeepSeekMath). Long sequences weigh
      less per token, which Dr. GRPO shows biases length.
    - ``bnpo``: token sum ÷ the tokens in this batch.
    - ``dr_grpo``: token sum ÷ (``B`` × ``max_completion_length``), a constant.
    - ``dapo`` (and ``cispo``, ``vespo``): token sum ÷ ``num_items``: :func:`dapo_num_items`, this micro-batch's
      share of the tokens of the whole optimizer step across ranks.
    - ``sapo`` as ``grpo``; ``luspo``: each sequence's token sum, then the mean over sequences (LUSPO: with GSPO's
      one ratio per sequence, each sequence's loss scaled by its length).

    A ``[B, 1]`` per-sequence loss (GSPO's sequence level) counts once per token of its sequence.
    """
    mask = mask.to(per_token.dtype)
    if loss_type in ("grpo", "sapo"):
        return masked_mean(per_token, mask, dim=1).mean()
    if loss_type == "luspo":
        return (per_token * mask).sum(dim=1).mean()
    total = (per_token * mask).sum()
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        return total / (per_token.size(0) * max_completion_length)
    if loss_type in STEP_TOKENS:
        if num_items is None:
            raise ValueError(f"loss_type={loss_type!r} needs num_items, the token count of the whole accumulated batch")
        return total / num_items
    raise ValueError(f"loss_type must be one of {', '.join(get_args(LossType))}, got {loss_type!r}")


def dapo_num_items(step_tokens: Tensor, micro_batches: int) -> Tensor:
    """DAPO's divisor for each micro-batch: the loss tokens of the whole optimizer step (every micro-batch on every
    rank; at least 1) ÷ the number of those micro-batches.

    Lightning divides each micro-batch's loss by the accumulation steps and DDP averages the gradients over ranks,
    so the step's gradient is that of ``token sum ÷ step_tokens``. The clamp is on the step's total, as TRL's: a
    clamp of each share at 1 would shrink the gradient of a step with fewer tokens than micro-batches.

    >>> dapo_num_items(torch.tensor(1.0), micro_batches=4), dapo_num_items(torch.tensor(0.0), micro_batches=2)
    (tensor(0.2500), tensor(0.5000))
    """
    return step_tokens.float().clamp(min=1.0) / micro_batches


def sampling_correction(
    old_logps: Tensor, sampling_logps: Tensor, mask: Tensor, mode: SamplingCorrection = "sequence_mask",
    clip_min: float | None = None, clip_max: float | None = 3.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance weights ``π_old / π_sampling`` for completions drawn from another copy of the policy (a
    half-precision one), TRL's ``vllm_importance_sampling_*`` formula: ``[B, T]`` for ``token_*`` modes, ``[B, 1]``
    for ``sequence_*`` ones (the exponential of the sequence's *summed* log-ratio). ``*_truncate`` clamps the
    ratios to ``[clip_min, clip_max]`` (``None``: unbounded on that side), ``*_mask`` sets the ratios outside it to 0.
    The policy term of the per-token loss is multiplied by it (not the KL term); it carries no gradient.

    Also returns TRL's statistics, each as the values to average or take the extreme of:
    ``sampling/sampling_logp_difference/{mean,max}`` (``|old - sampling|`` on the masked tokens) and
    ``sampling/importance_sampling_ratio/{min,mean,max}`` (the ratios of the masked tokens, or of the sequences).

    >>> old, sampled = torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-1.5, -1.0, -9.0]])
    >>> mask = torch.tensor([[1, 1, 0]])
    >>> sampling_correction(old, sampled, mask, "token_truncate", clip_max=1.5)[0]
    tensor([[1.5000, 0.3679, 1.0000]])
    >>> sampling_correction(old, sampled, mask, "sequence_mask")[0]  # exp(0.5 - 1.0)
    tensor([[0.6065]])
    """
    diff = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)  # a token without a sampling log-prob: 1
    sequence = mode.startswith("sequence_")
    if sequence:
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff.detach())
    if mode.endswith("_truncate"):
        if clip_min is not None or clip_max is not None:
            ratio = ratio.clamp(min=clip_min, max=clip_max)
    elif mode.endswith("_mask"):
        low = -math.inf if clip_min is None else clip_min
        high = math.inf if clip_max is None else clip_max
        ratio = ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
    else:
        raise ValueError(f"unknown sampling correction {mode!r}: one of {', '.join(get_args(SamplingCorrection))}")
    kept = mask.bool()
    delta = (old_logps - sampling_logps).abs().detach()[kept]
    delta = delta[~delta.isnan()]
    ratios = ratio.flatten() if sequence else ratio[kept]
    nothing = torch.zeros(1, device=ratio.device)  # TRL logs 0 for a batch without tokens
    delta, ratios = delta if delta.numel() else nothing, ratios if ratios.numel() else nothing
    stats = {f"sampling/sampling_logp_difference/{kind}": delta for kind in ("mean", "max")}
    return ratio, stats | {f"sampling/importance_sampling_ratio/{kind}": ratios for kind in ("min", "mean", "max")}


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logps: Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: LossType = "grpo",
    max_completion_length: int | None = None,
    num_items: float | Tensor | None = None,
    importance_weights: Tensor | None = None,
    *,
    importance_sampling_level: ImportanceSamplingLevel = "token",
    delta: float | None = None,
    use_bias_correction_kl: bool = False,
    entropies: Tensor | None = None,
    entropy_mask: Tensor | None = None,
    entropy_coef: float = 0.0,
    off_policy_mask: Tensor | None = None,
    sapo_temperature_neg: float = 1.05,
    sapo_temperature_pos: float = 1.0,
    vespo: VespoParameters = (2.0, 3.0, 3.0, 2.0),
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss, TRL's ``_compute_loss``: the policy term of ``loss_type`` per token, masked by
    ``off_policy_mask`` and ``entropy_mask``, weighted by ``importance_weights``, plus ``β·KL``, reduced by
    :func:`aggregate`; less ``entropy_coef`` × the mean entropy of the tokens the policy term acts on.

    - ``importance_sampling_level``: the ratio per token, or per sequence (GSPO: :func:`log_importance_weights`).
    - ``loss_type``: ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo`` and ``luspo`` share PPO's clipped surrogate
      (:func:`clipped_objective`, with INTELLECT-2's ``delta``) and differ in :func:`aggregate`; ``cispo``,
      ``sapo`` and ``vespo`` have their own policy terms (:func:`cispo_objective`, :func:`sapo_objective`,
      :func:`vespo_weights`). ``epsilon_high`` is CISPO's upper bound on the weights.
    - ``use_bias_correction_kl``: the k3 KL of each token multiplied by its ratio (DeepSeek-V3.2); the value is
      the same where the ratio is 1, the gradient is not.
    - ``importance_weights``: :func:`sampling_correction`'s weights (``[B, T]`` or ``[B, 1]``), multiplying the
      policy term as TRL does (``vespo`` folds them into its sequence weight instead); ``None``: the completions
      were drawn from the policy itself.
    - ``entropies``: the policy's per-token entropies (:func:`chunked_token_logps`), for the ``entropy`` statistic
      and, with a gradient, the ``entropy_coef`` bonus; ``entropy_mask``: :func:`high_entropy_mask`'s tokens.
    - ``off_policy_mask``: :func:`off_policy_sequence_mask`, ``[B, 1]``.
    - ``vespo``: VESPO's ``(k_pos, lambda_pos, k_neg, lambda_neg)``.

    Returns the scalar loss and detached statistics under TRL's names: ``kl`` (token mean, only when ``beta`` ≠ 0);
    for the clipped loss types ``clip_ratio/{low,high,region}_mean`` (fractions of the tokens in ``mask``, of the
    sequences at the sequence level) and ``clip_ratio/low_min``, ``clip_ratio/high_max`` (each sequence's
    fraction, to take the extreme of), ``cispo_clip_ratio`` or ``vespo/phi_seq_mean`` for those; ``entropy`` (the
    masked tokens' entropies, to average) when ``entropies`` is given; ``policy_loss`` with an entropy bonus.
    """
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(-1)
    log_ratio = logps - old_logps
    coef_1 = torch.exp(log_importance_weights(log_ratio, mask, importance_sampling_level))
    stats: dict[str, Tensor] = {}
    if loss_type == "cispo":
        cap = epsilon if epsilon_high is None else epsilon_high
        per_token, clipped = cispo_objective(coef_1, logps, advantages, cap)
        stats["cispo_clip_ratio"] = _token_or_sequence_mean(clipped.float(), mask)
    elif loss_type == "sapo":
        per_token = sapo_objective(coef_1, advantages, sapo_temperature_neg, sapo_temperature_pos)
    elif loss_type == "vespo":
        phi = vespo_weights(log_ratio, mask, advantages, importance_weights, *vespo)
        per_token = phi * adv * logps
        stats["vespo/phi_seq_mean"] = phi.detach().flatten()
    else:
        per_token, low, high = clipped_objective(coef_1, advantages, epsilon, epsilon_high, delta)
        stats |= _clip_stats(low, high, mask)
    per_token = -per_token
    if off_policy_mask is not None:
        per_token = per_token * off_policy_mask
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    if importance_weights is not None and loss_type != "vespo":
        per_token = per_token * importance_weights
    if ref_logps is not None and beta != 0.0:
        kl = k3_kl(logps, ref_logps)
        if use_bias_correction_kl:
            kl = kl * coef_1
        per_token = per_token + beta * kl
        stats["kl"] = masked_mean(kl.detach(), mask)
    loss = aggregate(per_token, mask, loss_type, max_completion_length, num_items)
    if entropies is not None:
        stats["entropy"] = entropies.detach()[mask.bool()]
        if entropy_coef != 0.0:
            acting = mask if entropy_mask is None else mask * entropy_mask
            stats["policy_loss"] = loss.detach()
            loss = loss - entropy_coef * masked_mean(entropies, acting)
    elif entropy_coef != 0.0:
        raise ValueError("entropy_coef needs the entropies")
    return loss, stats


def _token_or_sequence_mean(values: Tensor, mask: Tensor) -> Tensor:
    """The mean over the masked tokens of a ``[B, T]`` statistic; over the sequences of a ``[B, 1]`` one (TRL)."""
    return values.mean() if values.size(1) == 1 else masked_mean(values, mask)


def _clip_stats(low: Tensor, high: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """TRL's clip statistics: the clipped fractions, and each sequence's (rows without tokens left out), whose
    extremes over the step are ``clip_ratio/low_min`` and ``clip_ratio/high_max``."""
    low, high = low.float(), high.float()
    stats = {"clip_ratio/low_mean": _token_or_sequence_mean(low, mask),
             "clip_ratio/high_mean": _token_or_sequence_mean(high, mask),
             "clip_ratio/region_mean": _token_or_sequence_mean(torch.maximum(low, high), mask)}
    if low.size(1) == 1:
        return stats | {"clip_ratio/low_min": low.flatten(), "clip_ratio/high_max": high.flatten()}
    rows = mask.sum(dim=1) > 0
    return stats | {"clip_ratio/low_min": masked_mean(low, mask, dim=1)[rows],
                    "clip_ratio/high_max": masked_mean(high, mask, dim=1)[rows]}


def log_importance_weights(log_ratio: Tensor, mask: Tensor, level: ImportanceSamplingLevel = "token") -> Tensor:
    """The log of the importance ratio π_θ / π_old: per token, ``[B, T]``, or per sequence, ``[B, 1]``: the mean of
    its tokens' log-ratios (GSPO, Zheng et al. 2025: the geometric mean of the token ratios, so that one sequence
    has one ratio whatever its length).

    >>> log_importance_weights(torch.tensor([[0.2, -0.1, 9.0]]), torch.tensor([[1.0, 1.0, 0.0]]), "sequence")
    tensor([[0.0500]])
    """
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {level!r}")


def clipped_objective(
    ratio: Tensor, advantages: Tensor, epsilon: float, epsilon_high: float | None = None, delta: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped objective ``min(ρ A, clip(ρ, 1 - ε, 1 + ε_high) A)`` of ratios ``ρ`` (``[B, T]`` or
    ``[B, 1]``), and where the clip bit from below and from above.

    ``delta`` (INTELLECT-2's two-sided clipping): the unclipped ratio is capped at ``delta`` too, so that a
    negative advantage cannot scale an ever larger ratio; the clip statistics see the capped ratio, as TRL's.
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(-1)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * adv
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    low = (ratio < 1 - epsilon) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    return torch.min(ratio * adv, clipped), low, high


def clipped_surrogate(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, epsilon: float, epsilon_high: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`clipped_objective` of the token ratios ``ρ = exp(logp - old_logp)``: ``(surrogate [B, T],
    low_clipped [B, T] bool, high_clipped [B, T] bool)``."""
    return clipped_objective(torch.exp(logps - old_logps), advantages, epsilon, epsilon_high)


def cispo_objective(ratio: Tensor, logps: Tensor, advantages: Tensor, epsilon_high: float) -> tuple[Tensor, Tensor]:
    """CISPO's objective (MiniMax-M1): ``sg(min(ρ, ε_max)) · A · log π``, a REINFORCE term whose weight is the
    clipped ratio without a gradient, so that no token's gradient is dropped by the clip, only bounded; and where
    the weight was clipped (positive advantages above ``ε_max``, TRL's ``cispo_clip_ratio``).

    >>> ratio, logps = torch.tensor([[1.0, 6.0]]), torch.tensor([[-0.5, -1.0]], requires_grad=True)
    >>> objective, clipped = cispo_objective(ratio, logps, torch.tensor([2.0]), epsilon_high=5.0)
    >>> objective, clipped
    (tensor([[ -1., -10.]], grad_fn=<MulBackward0>), tensor([[False,  True]]))
    """
    adv = advantages.unsqueeze(-1)
    weight = torch.clamp(ratio, max=epsilon_high).detach()
    return weight * adv * logps, (ratio > epsilon_high) & (adv > 0)


def sapo_objective(ratio: Tensor, advantages: Tensor, temperature_neg: float = 1.05,
                   temperature_pos: float = 1.0) -> Tensor:
    """SAPO's soft-gated objective (Gao et al. 2025): ``4/τ · σ(τ (ρ - 1)) · A``, with ``τ`` = ``temperature_pos``
    for positive advantages and ``temperature_neg`` otherwise. At ``ρ = 1`` it equals ``2/τ · A`` with the gradient
    ``A · ∇ρ`` of the unclipped objective; away from 1 the gate fades the gradient smoothly instead of cutting it.

    >>> sapo_objective(torch.tensor([[1.0]]), torch.tensor([1.0]))
    tensor([[2.]])
    """
    adv = advantages.unsqueeze(-1)
    tau = adv.new_full(adv.shape, temperature_neg).masked_fill(adv > 0, temperature_pos)
    return torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv


@torch.no_grad()
def vespo_weights(
    log_ratio: Tensor, mask: Tensor, advantages: Tensor, importance_weights: Tensor | None = None,
    k_pos: float = 2.0, lambda_pos: float = 3.0, k_neg: float = 3.0, lambda_neg: float = 2.0,
) -> Tensor:
    """VESPO's sequence weight ``φ(w) = e^λ w^k e^{-λ w}`` (1 at ``w = 1``), ``[B, 1]``, without a gradient; the
    loss is ``-φ · A · log π`` per token.

    ``w`` is the sequence's importance ratio, the exponential of its *summed* token log-ratios (clamped to ±20
    each), times the ``importance_weights`` of a rollout copy (per token: their logs summed, each at least 1e-8);
    ``log w`` is clamped to ``[log 1e-8, 20]`` as in TRL. ``k``, ``λ`` are ``k_pos``, ``lambda_pos`` where the
    advantage is ≥ 0, else ``k_neg``, ``lambda_neg``; ``λ`` at least 1e-4.

    >>> vespo_weights(torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([1.0]))
    tensor([[1.]])
    """
    floor = math.log(1e-8)
    log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(dim=-1, keepdim=True)
    if importance_weights is not None:
        if importance_weights.size(-1) != log_ratio.size(-1):
            raise ValueError("vespo needs per-token importance weights (a token_* sampling correction mode)")
        log_w = log_w + (importance_weights.log().clamp(floor, 20.0) * mask).sum(dim=-1, keepdim=True)
    log_w = log_w.clamp(floor, 20.0)
    positive = advantages.unsqueeze(-1) >= 0
    k = log_w.new_full(log_w.shape, k_neg).masked_fill(positive, k_pos)
    lam = log_w.new_full(log_w.shape, lambda_neg).masked_fill(positive, lambda_pos).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def off_policy_sequence_mask(advantages: Tensor, logps: Tensor, sampling_logps: Tensor, mask: Tensor,
                             threshold: float) -> Tensor:
    """DeepSeek-V3.2's off-policy sequence mask, ``[B, 1]``: 0 for a sequence with a negative advantage whose mean
    log-ratio ``log π_sampling - log π_θ`` over its tokens exceeds ``threshold``, 1 otherwise. A token without a
    sampling log-prob (NaN) counts 0.

    >>> off_policy_sequence_mask(torch.tensor([-1.0, -1.0, 1.0]), torch.full((3, 2), -2.0),
    ...                          torch.tensor([[-1.0, -1.0], [-2.0, -2.0], [-1.0, -1.0]]), torch.ones(3, 2), 0.5)
    tensor([[0.],
            [1.],
            [1.]])
    """
    drift = torch.nan_to_num(sampling_logps - logps.detach(), nan=0.0)
    mean = (drift * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages.unsqueeze(-1) >= 0) | (mean <= threshold)).to(mask.dtype)


def entropy_threshold(entropies: Tensor, top_entropy_quantile: float) -> Tensor:
    """The entropy above which a token is in the top ``top_entropy_quantile`` (ρ) of ``entropies`` (every rank's
    completion tokens of a micro-batch, flat): their ``1 - ρ`` quantile; ``inf`` when there are none."""
    if entropies.numel() == 0:
        return torch.tensor(math.inf, device=entropies.device)
    return torch.quantile(entropies.float(), 1 - top_entropy_quantile)


def high_entropy_mask(entropies: Tensor, mask: Tensor, threshold: Tensor) -> Tensor:
    """The completion tokens whose entropy is at least ``threshold`` (:func:`entropy_threshold`): "Beyond the 80/20
    rule" (Wang et al. 2025) trains on the forking tokens only, ``[B, T]`` of the mask's dtype.

    >>> high_entropy_mask(torch.tensor([[0.1, 2.0, 3.0]]), torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor(1.0))
    tensor([[0., 1., 0.]])
    """
    return ((entropies.detach() >= threshold) & mask.bool()).to(mask.dtype)


def completion_mask(completion_ids: Tensor, eos_token_ids: Tensor | list[int]) -> tuple[Tensor, Tensor]:
    """Mask of real completion tokens (up to and including the first EOS) and which rows ended with an EOS.

    Everything after the first EOS is padding, whatever ``generate`` wrote there.
    """
    eos_ids = torch.as_tensor(eos_token_ids, device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos_ids)
    terminated = is_eos.any(dim=1)
    first_eos = torch.where(terminated, is_eos.int().argmax(dim=1), completion_ids.size(1))
    positions = torch.arange(completion_ids.size(1), device=completion_ids.device)
    return (positions.unsqueeze(0) <= first_eos.unsqueeze(1)).long(), terminated
