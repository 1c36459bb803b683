"""What each step logs, under TRL's names: the torchmetrics objects that accumulate it over an optimizer step's
micro-batches (computed across ranks, then reset), and a scored rollout's statistics."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import MaxMetric, MeanMetric, MinMetric, SumMetric

from qmath.metrics import GRADES, grade
from qmath.rollout import Rollout

TRAIN_STATS = ["loss", "reward", "accuracy", "reward_std", "reward_std/group_mean", "frac_reward_zero_std",
               "completions/mean_length", "completions/clipped_ratio", "kl", "clip_ratio/low_mean",
               "clip_ratio/high_mean", "clip_ratio/region_mean", "dynamic_sampling/dropped_groups",
               "dynamic_sampling/drawn_prompts", "completions_per_step", "sampling/sampling_logp_difference/mean",
               "sampling/importance_sampling_ratio/mean", "entropy", "policy_loss", "cispo_clip_ratio",
               "vespo/phi_seq_mean", "completions/mean_terminated_length", "sampling/decoder_fallback",
               "sampling/rollout_copy_dropped"]
# the extremes over every micro-batch and rank, not a mean of each rank's extreme
EXTREMES = {"completions/min_length": MinMetric, "completions/max_length": MaxMetric,
            "sampling/sampling_logp_difference/max": MaxMetric, "sampling/importance_sampling_ratio/min": MinMetric,
            "sampling/importance_sampling_ratio/max": MaxMetric, "clip_ratio/low_min": MinMetric,
            "clip_ratio/high_max": MaxMetric, "completions/min_terminated_length": MinMetric,
            "completions/max_terminated_length": MaxMetric}
EVAL_STATS = [*GRADES, "completions/mean_length"]


def train_metrics(reward_names: list[str]) -> torch.nn.ModuleDict:
    """One metric per training statistic: means, the failed-reward count, and the extremes."""
    per_reward = [f"rewards/{n}/{kind}" for n in reward_names for kind in ("mean", "std")]
    means = {name: MeanMetric() for name in per_reward + TRAIN_STATS}
    return torch.nn.ModuleDict(means | {"reward_errors": SumMetric()} | {k: m() for k, m in EXTREMES.items()})


def sampled_names(k: int) -> list[str]:
    """The metrics of ``maj_k``'s k samples per problem: their mean accuracy, the majority vote's, pass@k."""
    return [f"accuracy_mean@{k}", f"accuracy_maj@{k}", f"pass@{k}"]


def eval_metrics(maj_k: int | None) -> torch.nn.ModuleDict:
    """One mean per graded quantity of a held-out evaluation (with ``maj_k``, also its samples' metrics)."""
    names = EVAL_STATS + (sampled_names(maj_k) if maj_k else [])
    return torch.nn.ModuleDict({name: MeanMetric() for name in names})


def rollout_stats(rollout: Rollout, raw: Tensor, total: Tensor, group_std: Tensor, group: int,
                  reward_names: list[str], everyone: dict[str, Tensor]) -> dict[str, Tensor]:
    """A scored rollout's statistics: each reward's and the total's values, TRL's ``reward_std`` and
    ``rewards/<name>/std`` (of every rank's rewards), the groups' spread, the completions' lengths and truncations,
    TRL's lengths of the completions that ended with an EOS on any rank (0 where none did), and the strict accuracy
    of the samples when the rows have answers.

    ``everyone``: every rank's ``raw`` (``[n_rewards, N]``), ``total``, ``lengths`` and ``terminated`` (``[N]``).
    """
    lengths = rollout.completion_mask.sum(dim=1).float()
    ended = everyone["lengths"][everyone["terminated"]]
    ended = ended if ended.numel() else torch.zeros(1, device=lengths.device)
    stats = {f"rewards/{name}/mean": raw[i] for i, name in enumerate(reward_names)} | {
        f"rewards/{name}/std": everyone["raw"][i].std() for i, name in enumerate(reward_names)} | {
        "reward": total, "reward_std": everyone["total"].std(),
        "reward_std/group_mean": group_std[::group], "frac_reward_zero_std": (group_std[::group] < 1e-6).float(),
        "completions/mean_length": lengths, "completions/min_length": lengths.min(),
        "completions/max_length": lengths.max(), "completions/clipped_ratio": (~rollout.terminated).float(),
        "completions/mean_terminated_length": ended.mean(), "completions/min_terminated_length": ended.min(),
        "completions/max_terminated_length": ended.max()}
    if "answer" in rollout.columns:  # the samples' strict accuracy, whatever the rewards are
        stats["accuracy"] = torch.tensor(grade(rollout.texts, rollout.columns["answer"])["accuracy_strict"],
                                         dtype=torch.float)
    return stats
