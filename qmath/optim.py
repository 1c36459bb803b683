"""The optimizer over the trainable parameters, in HF Trainer's (and so TRL's) two weight-decay groups."""

from __future__ import annotations

from typing import Any

from torch import Tensor

# HF Trainer's names that get no weight decay, besides LayerNorm modules' parameters
TRAINER_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def decay_groups(named_parameters: Any, policy: Any, prefix: str = "policy.") -> list[dict[str, Any]]:
    """The trainable parameters in two groups: weight decay on the weights, none on biases and normalisation weights
    (Qwen2's q/k/v biases, RMSNorm's scales). Empty groups are left out."""
    from torch import nn
    from transformers.trainer_pt_utils import get_parameter_names

    # Trainer.get_decay_parameter_names's rule, through the helper it calls: importing Trainer itself to call it
    # costs 1.2 s of every run's start (the whole HF Trainer module). Its name patterns are repeated here, and
    # tests/test_fit.py checks the groups against Trainer's own method, so that a change there shows.
    decayed = {f"{prefix}{n}" for n in get_parameter_names(policy, [nn.LayerNorm], TRAINER_NO_DECAY_PATTERNS)}
    named = [(n, p) for n, p in named_parameters if p.requires_grad]
    # named: LearningRateMonitor logs lr-AdamW/decay and lr-AdamW/no_decay (the same schedule)
    groups = [{"params": [p for n, p in named if n in decayed], "name": "decay"},
              {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def optimizers(optimizer: Any, lr_scheduler: Any, groups: list[dict[str, Any]], trainable: list[Tensor]) -> Any:
    """What ``configure_optimizers`` returns: ``optimizer`` over ``groups``, or over ``trainable`` in one group when
    there is no weight decay to spare anything from; ``lr_scheduler``, if any, stepped every optimizer step."""
    built = optimizer(groups)
    if len(built.param_groups) > 1 and not built.defaults.get("weight_decay"):
        built = optimizer(trainable)  # one group will do, in the parameters' own order
    if lr_scheduler is None:
        return built
    return {"optimizer": built, "lr_scheduler": {"scheduler": lr_scheduler(built), "interval": "step"}}


FIT_THE_RUN = ("Make its init_args fit the run (OneCycleLR: total_steps at least trainer.max_steps, and "
               "pct_start × total_steps at least 2 steps of warm-up)")


def check_schedule(optimizer: Any, lr_scheduler: Any, max_steps: int) -> None:
    """Build the optimizer and the schedule over one stand-in parameter and step them through ``max_steps``: what
    torch refuses (a negative learning rate, betas outside [0, 1)), or a schedule that fails or goes non-finite or
    negative before the last step (``OneCycleLR`` whose ``total_steps`` is below ``trainer.max_steps``, or whose
    warm-up ``pct_start × total_steps`` rounds below one step: a ``ZeroDivisionError`` at step 1), is said when the
    config is read, naming the step, not hours in. torch's own checks run; none is repeated here."""
    import math
    import warnings

    import torch

    from qmath.errors import ConfigError

    weight = torch.nn.Parameter(torch.zeros(1))
    try:
        built = optimizer([weight])
    except (ValueError, TypeError) as error:
        raise ConfigError(f"model.optimizer: {error}") from error
    if lr_scheduler is None:
        return
    name = "model.lr_scheduler"
    try:
        schedule = lr_scheduler(built)
    except (ValueError, TypeError, ZeroDivisionError) as error:
        raise ConfigError(f"{name}: {type(error).__name__}: {error}. {FIT_THE_RUN}") from error
    name = f"{name} ({type(schedule).__name__})"
    if isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return  # steps on a metric, not a count
    total = getattr(schedule, "total_steps", None)
    if isinstance(total, int) and 0 < max_steps < total:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"{name} is laid out over {total} steps but trainer.max_steps is {max_steps}: the run ends "
                       f"{100 * max_steps / total:.0f}% of the way through its schedule (OneCycleLR: its decay not "
                       f"done). Set its total_steps to {max_steps}")
    steps = max_steps if max_steps > 0 else getattr(schedule, "total_steps", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": nothing to optimize here
        for step in range(1, min(steps, 1_000_000) + 1):  # as Lightning steps it: after every optimizer step
            try:
                schedule.step()
            except (ValueError, ZeroDivisionError, IndexError) as error:
                raise ConfigError(f"{name} fails at optimizer step {step} of trainer.max_steps {steps}: {error}. "
                                  f"{FIT_THE_RUN}") from error
            rates = [group["lr"] for group in built.param_groups]
            if step < steps and not all(math.isfinite(lr) and lr >= 0 for lr in rates):
                raise ConfigError(f"{name} sets the learning rate to {rates[0]} at optimizer step {step}: it must "
                                  "stay finite and non-negative")
