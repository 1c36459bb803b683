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

ScaleRewards = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
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


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0, chunk_size: int = 4) -> Tensor:
    """``log_softmax(logits / temperature)[..., index]`` without materialising a second ``[B, T, V]`` tensor.

    Works ``chunk_size`` rows at a time: ``logit[index] - logsumexp(logits)`` per row, so a scaled copy of the
    logits exists for one chunk at a time only.
    """
    out = []
    for rows, ids in zip(logits.split(chunk_size), index.split(chunk_size)):
        rows = rows.float()  # half-precision logits lose the small log-prob differences the ratio and KL need
        if temperature != 1.0:
            rows = rows / temperature
        picked = rows.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(rows, dim=-1))
    return torch.cat(out)


def chunked_token_logps(
    hidden: Tensor, weight: Tensor, index: Tensor, temperature: float = 1.0, bias: Tensor | None = None,
    chunk_size: int = 512, recompute_above: int = 256 * 2**20,
) -> Tensor:
    """``log_softmax((hidden @ weight.T + bias) / temperature)[..., index]``, ``[B, T]``, from hidden states.

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
    out = []
    for h, i in zip(flat.split(chunk_size), ids.split(chunk_size)):
        if grad:  # only checkpointing depends on it: without, autograd records the chunk as usual
            out.append(checkpoint(_chunk_logps, h, weight, bias, i, temperature, use_reentrant=False))
        else:
            out.append(_chunk_logps(h, weight, bias, i, temperature))
    return torch.cat(out).view(index.shape)


def _chunk_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor, temperature: float) -> Tensor:
    with torch.autocast(hidden.device.type, enabled=False):  # 16-mixed would run the head in fp16
        logits = F.linear(hidden.float(), weight, bias)
    if temperature != 1.0:
        logits = logits.div_(temperature)  # in place: linear's backward does not need its output
    return logits.gather(-1, index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


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


def clipped_surrogate(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, epsilon: float, epsilon_high: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped objective per token, and where the clip bit from below and from above.

    Returns ``(surrogate [B, T], low_clipped [B, T] bool, high_clipped [B, T] bool)``, where
    ``surrogate = min(ρ A, clip(ρ, 1 - ε, 1 + ε_high) A)`` and ``ρ = exp(logp - old_logp)``.
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * adv
    low = (ratio < 1 - epsilon) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    return torch.min(unclipped, clipped), low, high


def aggregate(
    per_token: Tensor, mask: Tensor, loss_type: LossType = "grpo", max_completion_length: int | None = None,
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar the way ``loss_type`` says (the names are TRL's).

    - ``grpo``: each sequence's token mean, then the mean over sequences (DeepSeekMath). Long sequences weigh
      less per token, which Dr. GRPO shows biases length.
    - ``bnpo``: token sum ÷ the tokens in this batch.
    - ``dr_grpo``: token sum ÷ (``B`` × ``max_completion_length``), a constant.
    - ``dapo``: token sum ÷ ``num_items``: :func:`dapo_num_items`, this micro-batch's share of the tokens of the
      whole optimizer step across ranks.
    """
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return masked_mean(per_token, mask, dim=1).mean()
    total = (per_token * mask).sum()
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        return total / (per_token.size(0) * max_completion_length)
    if loss_type == "dapo":
        if num_items is None:
            raise ValueError("loss_type='dapo' needs num_items, the token count of the whole accumulated batch")
        return total / num_items
    raise ValueError(f"loss_type must be 'grpo', 'bnpo', 'dr_grpo' or 'dapo', got {loss_type!r}")


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
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss: ``-(surrogate - β·KL)`` per token, reduced by :func:`aggregate` as ``loss_type`` says.

    ``importance_weights``: :func:`sampling_correction`'s weights (``[B, T]`` or ``[B, 1]``), multiplying the
    surrogate term of each token as TRL does; ``None``: the completions were drawn from the policy itself.

    Returns the scalar loss and detached statistics: ``kl`` (token mean, only when ``beta`` ≠ 0),
    ``clip_ratio/low_mean``, ``clip_ratio/high_mean`` and ``clip_ratio/region_mean`` (fractions of the tokens
    in ``mask``).
    """
    surrogate, low, high = clipped_surrogate(logps, old_logps, advantages, epsilon, epsilon_high)
    per_token = -surrogate if importance_weights is None else -surrogate * importance_weights
    stats = {}
    if ref_logps is not None and beta != 0.0:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
        stats["kl"] = masked_mean(kl.detach(), mask)
    loss = aggregate(per_token, mask, loss_type, max_completion_length, num_items)
    stats["clip_ratio/low_mean"] = masked_mean(low.float(), mask)
    stats["clip_ratio/high_mean"] = masked_mean(high.float(), mask)
    stats["clip_ratio/region_mean"] = masked_mean((low | high).float(), mask)
    return loss, stats


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
