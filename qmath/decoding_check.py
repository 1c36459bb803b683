"""The decode loop checks itself against the trainer, on every rollout, on the user's own card.

Every rollout carries each token's log-prob under the distribution it was drawn from
(:attr:`qmath.rollout.Rollout.sampling_logps`), and the loss's first pass over it computes the policy's log-probs of
the same tokens (π_old) in the trainer's own precision. With nothing wrong the two differ by rounding alone. A
compiled or captured decode path that is wrong (a CUDA graph that replays a stale buffer, misses a weight update or
was captured badly; a kernel that miscompiles) shows as a difference beyond what the precisions explain. Then that
path is released (its buffers and graphs freed) and rollouts decode eagerly from the next one on, with one warning,
a scalar in TensorBoard (``sampling/decoder_fallback``) and a line at the end of fit: a bad path costs one rollout,
not a run.

The bounds (:data:`BOUNDS`) are the measured differences of a correct decoder at each precision
(``benchmarks/decoding_check.py``, docs/performance.md) with a wide margin: they are there to catch a wrong decoder,
whose tokens' log-probs are off by nats, not to grade rounding. fp16's is bf16's by design: fp16 keeps 3 more
mantissa bits than bf16, so a correct fp16 decoder sits well inside it (its overflows are non-finite values, which
:func:`non_finite_rows` handles).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from qmath.decoding import FIXED
from qmath.rollout import Rollout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bound:
    """The most a correct decoder's log-probs differ from the trainer's: the mean of ``|Δ|`` over a micro-batch's
    completion tokens, and the largest single ``|Δ|``."""

    mean: float
    max: float


# benchmarks/decoding_check.py on the embedded model (docs/performance.md#the-decoding-check): correct decoders'
# largest step mean and largest single token were 1.6e-6 and 3.8e-5 at fp32 (eager and graphs alike), 0.038 and 1.26
# from a bf16 copy; the bounds leave 600x and 5x (13,000x and 3x for one token, which must recur to count)
BOUNDS = {torch.float32: Bound(mean=1e-3, max=0.5), torch.bfloat16: Bound(mean=0.2, max=4.0)}
BOUNDS[torch.float16] = BOUNDS[torch.bfloat16]


def bound_for(*dtypes: torch.dtype) -> Bound:
    """The loosest bound of the precisions involved (the decoder's weights, the trainer's compute).

    >>> bound_for(torch.float32, torch.bfloat16) == BOUNDS[torch.bfloat16]
    True
    """
    bounds = [BOUNDS.get(d, BOUNDS[torch.bfloat16]) for d in dtypes]
    return Bound(max(b.mean for b in bounds), max(b.max for b in bounds))


def logp_difference(old_logps: Tensor, sampling_logps: Tensor, mask: Tensor) -> Tensor:
    """``|π_old - π_sampling|`` of the masked tokens whose both log-probs are finite, 1-d (one 0 where there are
    none, as TRL logs 0 for a batch without tokens).

    >>> logp_difference(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, float("nan")]]), torch.ones(1, 2))
    tensor([0.5000])
    """
    delta = (old_logps.detach() - sampling_logps).abs()[mask.bool()]
    delta = delta[torch.isfinite(delta)]
    return delta.float() if delta.numel() else torch.zeros(1, device=old_logps.device)


def non_finite_rows(rollout: Rollout) -> Tensor:
    """``[B]``: the completions with a non-finite sampling log-prob on a completion token (an fp16 overflow in the
    decoder's logits); none without sampling log-probs."""
    if rollout.sampling_logps is None:
        return torch.zeros(len(rollout), dtype=torch.bool, device=rollout.completion_mask.device)
    finite = torch.isfinite(rollout.sampling_logps) | ~rollout.completion_mask.bool()
    return ~finite.all(dim=1)


def finite_rows(module: Any, rollout: Rollout) -> Tensor:
    """``[B]``: the completions whose sampling log-probs are finite; the others get no loss. A rollout copy that
    overflowed (fp16) on any rank is dropped on every rank (``module``: a :class:`qmath.module.GRPO`): rollouts read
    the policy from then on."""
    bad = non_finite_rows(rollout)
    forms, step = module.forms, module.trainer.global_step
    if forms.rollout_model is not None and module.trainer.strategy.reduce_boolean_decision(
            rollout.copied and bool(bad.any()), all=False):
        rank_zero_warn(f"model.rollout_dtype {module.hparams.rollout_dtype}: the rollout copy's logits overflowed at "
                       f"step {step} (non-finite log-probs); it is dropped, and rollouts read the policy from now on "
                       "(sampling/rollout_copy_dropped). Set rollout_dtype: null to skip it.")
        module.sampler.use_rollout_model(None)
        forms.drop_rollout_copy()
    elif bad.any():
        log.warning("step %d: %d completions have non-finite sampling log-probs and get no loss", step,
                    int(bad.sum()))
    return ~bad


def decoding_flags(module: Any) -> dict[str, Tensor]:
    """Whether a compiled or captured decoder has been released (it failed to compile or capture, or the check found
    it wrong), and whether the rollout copy was dropped (it overflowed): TensorBoard scalars, every step."""
    return {"sampling/decoder_fallback": torch.tensor(float(bool(module.sampler.failed))),
            "sampling/rollout_copy_dropped": torch.tensor(float(module.forms.copy_dropped))}


def precisions(module: Any) -> list[torch.dtype]:
    """The dtypes the decoders' and the trainer's log-probs are computed in: the policy's weights, the rollout copy's,
    a mixed precision's autocast, and fp16 for TF32 matmuls (``float32_matmul_precision`` "high" or "medium" keep
    fp16's 10 mantissa bits, not fp32's 23)."""
    dtypes = [module.policy.dtype]
    if module.forms.rollout_model is not None:
        dtypes.append(module.forms.rollout_model.dtype)
    autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(module.trainer.precision))
    tf32 = torch.get_float32_matmul_precision() != "highest"
    return dtypes + ([autocast] if autocast else []) + ([torch.float16] if tf32 else [])


def unjudged(module: Any) -> str | None:
    """Why the check cannot hold a decoder to account in this run (``None``: it can): π_old comes from a pass with
    dropout on (LoRA's, a model's own), or the sampler draws from logits the trainer does not see."""
    policy = module.policy
    dropout = [m.p for m in policy.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    dropout += [p for a in ("attention_dropout", "hidden_dropout", "dropout")
                if isinstance(p := getattr(policy.config, a, 0), float) and p > 0]
    if dropout:
        return f"dropout ({max(dropout):g}) in the trainer's pass"
    sampling = module.sampler._sampling
    if sampling.min_new_tokens or sampling.bias:
        return "generation_kwargs min_new_tokens or sequence_bias shape the sampled distribution"
    return None


class DecodingCheck:
    """Compares each micro-batch's sampling log-probs with π_old (:meth:`__call__`) and releases a compiled or
    captured decoder of ``sampler`` (:class:`qmath.generation.Sampler`) that disagrees beyond ``bound``."""

    def __init__(self, sampler: Any, bound: Bound, unjudged: str | None = None) -> None:
        self.sampler, self.bound = sampler, bound
        # why differences are not judged in this run (they are still logged): the trainer's pass has dropout on, or
        # the sampler draws from logits the trainer does not see (min_new_tokens, sequence_bias)
        self.unjudged = unjudged
        self.strikes: dict[tuple[bool, str], int] = {}  # consecutive micro-batches whose largest difference is over

    @classmethod
    def for_run(cls, module: Any) -> DecodingCheck:
        """The check of ``module``'s (a :class:`qmath.module.GRPO`) run: its precisions' bound, what it cannot judge."""
        return cls(module.sampler, bound_for(*precisions(module)), unjudged(module))

    def __call__(self, micro: Rollout, old_logps: Tensor, step: int) -> dict[str, Tensor]:
        """TRL's ``sampling/sampling_logp_difference/{mean,max}`` of the micro-batch's completion tokens; a fixed-shape
        decoder that drew them and disagrees is released (from the next rollout on, eager decoding)."""
        if micro.sampling_logps is None:
            return {}
        delta = logp_difference(old_logps, micro.sampling_logps, micro.completion_mask)
        if micro.decoded_by in FIXED and self.unjudged is None:
            self._judge(micro, delta, step)
        return {"sampling/sampling_logp_difference/mean": delta, "sampling/sampling_logp_difference/max": delta}

    def _judge(self, micro: Rollout, delta: Tensor, step: int) -> None:
        key = (micro.copied, micro.decoded_by)
        if key in self.sampler.failed or (micro.copied and self.sampler.rollout_model is None):
            return  # released already, or the copy was dropped (it overflowed) in this very rollout
        mean, worst = float(delta.mean()), float(delta.max())
        # the copy's overflows drop the copy instead (module.GRPO.finite_rows); the policy's own are the decoder's
        overflowed = not micro.copied and bool(non_finite_rows(micro).any())
        # one token's tail under 16-bit rounding is not a wrong decoder: the largest difference must be over its bound
        # on two micro-batches in a row; a mean over the bound is a whole micro-batch off
        self.strikes[key] = self.strikes.get(key, 0) + 1 if worst > self.bound.max else 0
        if not overflowed and mean <= self.bound.mean and self.strikes[key] < 2:
            return
        why = ("non-finite log-probs" if overflowed else f"its log-probs differ from the trainer's by {mean:.3g} on "
               f"average and {worst:.3g} at most, beyond the {self.bound.mean:g} and {self.bound.max:g} that rounding "
               "explains") + f" at step {step}"
        self.sampler.fall_back(micro.copied, micro.decoded_by, why)
