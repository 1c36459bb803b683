"""DAPO's dynamic sampling (Yu et al. 2025): groups whose rewards all agree have zero advantage and carry no
gradient, so they are replaced by groups of further prompts, drawn from the data module."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qmath.errors import ConfigError
from qmath.generation import PROMPTS, seed_for
from qmath.rollout import Rollout


def informative(total: Tensor, group: int) -> Tensor:
    """Which groups' weighted rewards differ: ``[n_groups]`` bool.

    >>> informative(torch.tensor([1.0, 1.0, 0.0, 1.0]), group=2).tolist()
    [False, True]
    """
    grouped = total.view(-1, group)
    return (grouped.max(dim=1).values - grouped.min(dim=1).values) > 1e-6


def resample(module: Any, rollout: Rollout, raw: Tensor) -> tuple[Rollout, Tensor, dict[str, Tensor]]:
    """Keep ``module``'s informative groups, refilling from further prompts for at most ``max_sampling_rounds``
    rounds; if still short, top up with uninformative groups (they carry only the KL term)."""
    hp, trainer = module.hparams, module.trainer
    g = hp.num_generations
    wanted = len(rollout) // g
    datamodule = getattr(trainer, "datamodule", None)
    if not hasattr(datamodule, "draw"):
        raise ConfigError("model.dynamic_sampling needs a data module with a draw(n, seed) method, such as "
                          "qmath.data.GSM8K, to take further prompts from")
    kept = informative(module.total_reward(raw), g)
    dropped, drawn = int((~kept).sum()), 0
    for round_ in range(hp.max_sampling_rounds):
        missing = wanted - int(kept.sum())
        # All ranks run a round while any rank needs one: under FSDP, generate is a collective. A rank that needs
        # none samples one prompt to keep in step, and keeps its own groups.
        if not trainer.strategy.reduce_boolean_decision(missing > 0, all=False):
            break
        missing = max(missing, 1)
        seed = seed_for(trainer.global_step, module.global_rank, round_, stream=PROMPTS)
        drawn_rows = datamodule.draw(missing, seed)
        extra = module.rollout({k: v.to(module.device) if isinstance(v, Tensor) else v for k, v in drawn_rows.items()},
                               round_ + 1)
        extra_raw = module.score(extra)
        extra_kept = informative(module.total_reward(extra_raw), g)
        rollout = rollout.cat(extra, module.tokenizer.pad_token_id)
        raw = torch.cat([raw, extra_raw], dim=1)
        kept = torch.cat([kept, extra_kept])
        dropped, drawn = dropped + int((~extra_kept).sum()), drawn + missing
    order = torch.cat([kept.nonzero().flatten(), (~kept).nonzero().flatten()])[:wanted]
    rows = (order.sort().values[:, None] * g + torch.arange(g, device=order.device)).flatten()
    stats = {"dynamic_sampling/dropped_groups": torch.tensor(float(dropped)),
             "dynamic_sampling/drawn_prompts": torch.tensor(float(drawn))}
    return rollout.select(rows), raw[:, rows], stats
