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
