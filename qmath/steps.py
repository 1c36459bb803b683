"""Optimizer steps that cannot put a NaN into the weights: a step whose loss or gradient is not finite is skipped
(the weights and the optimizer state stay as they were), counted, and after too many in a row training stops."""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor

from qmath.errors import QMathError

log = logging.getLogger(__name__)


class NonFiniteError(QMathError, FloatingPointError):
    """Training met non-finite values it cannot step past; the message says what to change. Every rank raises it
    at the same step (they agree on each step's finiteness)."""


def gradient_norms(module: Any) -> Tensor:
    """Each gradient's L2 norm (``[n]``, empty without gradients): read once per step, for the logged norm and the
    finiteness check alike."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.stack(torch._foreach_norm(grads)) if grads else torch.zeros(0, device=module.device)


def gradient_norm(module: Any, norms: Tensor) -> Tensor:
    """The global L2 norm of the gradients before clipping (HF Trainer's ``grad_norm``) from
    :func:`gradient_norms`, as ``clip_grad_norm_`` computes it; under FSDP each rank holds a shard's gradients,
    and the squares are summed across ranks (by every rank, with gradients or not). NaN or inf where a gradient is."""
    squared = torch.linalg.vector_norm(norms.float()) ** 2
    if isinstance(module.trainer.strategy, FSDPStrategy):
        # with cpu_offload the gradients, and so their norms, are in host memory, which NCCL cannot reduce
        squared = module.trainer.strategy.reduce(squared.to(module.device), reduce_op="sum")
    return squared.sqrt()


class FiniteSteps:
    """Decides, before each optimizer step, whether it may run; ``limit``: skipped steps in a row that stop training.

    Under 16-mixed, fp16 gradients that overflow are the GradScaler's to handle: it skips that step itself and
    lowers its scale, which is how it finds the scale to use, so only a non-finite loss counts there.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.skipped = 0  # over the whole run (checkpointed)
        self.in_a_row = 0
        self.loss_not_finite = False  # set by the training step of this optimizer step's micro-batches

    def check(self, module: Any, norms: Tensor | None = None) -> bool:
        """Whether the step runs; if not, drops ``module``'s gradients so that AdamW leaves every parameter as it
        was, decay and moments included. ``norms``: :func:`gradient_norms`, if already read."""
        finite = not self.loss_not_finite
        self.loss_not_finite = False
        trainer = module.trainer
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            norms = gradient_norms(module) if norms is None else norms
            finite = finite and bool(torch.isfinite(norms).all())
        # all ranks must agree (under FSDP each sees only its shard of the gradients)
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.in_a_row = 0
            return True
        for p in module.parameters():
            p.grad = None
        self.skipped += 1
        self.in_a_row += 1
        log.warning("step %d: non-finite loss or gradient; the optimizer step is skipped (%d in a row)",
                    trainer.global_step, self.in_a_row)
        return False

    def enforce_limit(self, step: int) -> None:
        """Raise :class:`NonFiniteError` once ``limit`` steps in a row were skipped."""
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient (model."
                f"max_skipped_steps={self.limit}), the last at step {step}. The weights are the last finite ones and "
                "no checkpoint holds a NaN. Lower the learning rate, clip gradients harder "
                "(trainer.gradient_clip_val), or check the rewards and the model's precision; resume with "
                "--ckpt_path last."
            )
