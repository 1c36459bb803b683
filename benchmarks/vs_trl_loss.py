"""qmath's GRPO loss against TRL's own ``GRPOTrainer._compute_loss`` on identical tensors, every loss type and option.

    pip install -e ".[vs-trl]"
    python benchmarks/vs_trl_loss.py

TRL's method runs unchanged on a stand-in trainer that hands it fixed log-probs and entropies (instead of running a
model) on one process without accumulation; qmath's :func:`qmath.grpo.grpo_loss` gets the same tensors. fp64, so
that the two agree to rounding: each case prints the largest difference of the loss, of its gradient with respect
to the log-probs (and the entropies, with a bonus), and of each statistic both log. The tensors: 6 completions of
up to 7 tokens with padding, advantages of both signs, log-ratios to π_old far from 0 (μ > 1), a reference model,
and a rollout copy's log-probs (token-level truncated importance sampling), so every term is live.

Measured (seed 0, TRL 1.16.0): the loss and its gradients agree to 1e-16 in every case but ``sapo``, where TRL's
gate temperatures are fp32 constants (``torch.where`` of Python floats): 3e-8 there. The clip fractions differ by
about 1e-9 because qmath logs them in fp32.
"""

from __future__ import annotations

import argparse
import types
from typing import Any

import torch

CASES: dict[str, dict[str, Any]] = {
    "grpo": {"loss_type": "grpo"},
    "bnpo": {"loss_type": "bnpo"},
    "dr_grpo": {"loss_type": "dr_grpo"},
    "dapo, clip-higher": {"loss_type": "dapo", "epsilon_high": 0.28},
    "grpo, sequence level (GSPO)": {"loss_type": "grpo", "importance_sampling_level": "sequence",
                                    "epsilon": 3e-4, "epsilon_high": 4e-4},
    "dapo, delta": {"loss_type": "dapo", "delta": 1.5},
    "cispo": {"loss_type": "cispo", "epsilon_high": 1.3},
    "sapo": {"loss_type": "sapo"},
    "luspo (sequence)": {"loss_type": "luspo", "importance_sampling_level": "sequence"},
    "vespo": {"loss_type": "vespo"},
    "bnpo, bias-corrected KL": {"loss_type": "bnpo", "use_bias_correction_kl": True},
    "grpo, top 30% entropy, bonus": {"loss_type": "grpo", "top_entropy_quantile": 0.3, "entropy_coef": 0.05},
    "dapo, off-policy mask": {"loss_type": "dapo", "off_policy_mask_threshold": 0.05},
    "dr_grpo, every option": {"loss_type": "dr_grpo", "delta": 2.0, "use_bias_correction_kl": True,
                              "top_entropy_quantile": 0.5, "entropy_coef": 0.01, "off_policy_mask_threshold": 0.1},
}
DEFAULTS = {"epsilon": 0.2, "epsilon_high": None, "importance_sampling_level": "token", "delta": None,
            "use_bias_correction_kl": False, "top_entropy_quantile": 1.0, "entropy_coef": 0.0,
            "off_policy_mask_threshold": None, "sapo_temperature_neg": 1.05, "sapo_temperature_pos": 1.0,
            "vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0}
BETA, MAX_LENGTH = 0.04, 7
# the statistics both log: TRL's metric name -> qmath's (the same names), reduced as TRL reduces them
STATS = ["kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
         "clip_ratio/low_min", "clip_ratio/high_max", "cispo_clip_ratio", "vespo/phi_seq_mean", "policy_loss"]


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, t = 6, MAX_LENGTH
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    mask = (torch.arange(t)[None] < lengths[:, None]).double()
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    return {"mask": mask, "old": old, "logps": old + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3,
            "ref": old + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.2,
            "sampling": old + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.1,
            "advantages": torch.tensor([1.2, -0.7, 0.3, -1.5, 0.0, 0.9], dtype=torch.float64),
            "entropies": torch.rand(b, t, generator=g, dtype=torch.float64) * 2}


class OneProcess:
    """What TRL's loss asks of ``accelerate`` on a single process."""

    num_processes, sync_gradients = 1, True

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather

    def reduce(self, x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return x

    def pad_across_processes(self, x: torch.Tensor, dim: int = 0, pad_index: float = 0) -> torch.Tensor:
        return x


def trl_loss(case: dict[str, Any], data: dict[str, torch.Tensor], weights: torch.Tensor) -> tuple:
    """TRL 1.16's ``_compute_loss``, run on a stand-in trainer: (loss, the leaf log-probs, entropies, metrics)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    o = {**DEFAULTS, **case}
    logps = data["logps"].clone().requires_grad_(True)
    entropies = data["entropies"].clone().requires_grad_(True)
    args = types.SimpleNamespace(delta=o["delta"], use_bias_correction_kl=o["use_bias_correction_kl"],
                                 sapo_temperature_neg=o["sapo_temperature_neg"],
                                 sapo_temperature_pos=o["sapo_temperature_pos"], vespo_k_pos=o["vespo_k_pos"],
                                 vespo_lambda_pos=o["vespo_lambda_pos"], vespo_k_neg=o["vespo_k_neg"],
                                 vespo_lambda_neg=o["vespo_lambda_neg"], steps_per_generation=1)
    trainer = types.SimpleNamespace(
        args=args, accelerator=OneProcess(), aux_loss_enabled=False, top_entropy_quantile=o["top_entropy_quantile"],
        off_policy_mask_threshold=o["off_policy_mask_threshold"],
        importance_sampling_level=o["importance_sampling_level"], beta=BETA, loss_type=o["loss_type"],
        epsilon_low=o["epsilon"], epsilon_high=o["epsilon"] if o["epsilon_high"] is None else o["epsilon_high"],
        use_vllm=True, vllm_importance_sampling_correction=True, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=MAX_LENGTH,
        _entropy_bonus_enabled=o["entropy_coef"] != 0.0, entropy_coef=o["entropy_coef"],
        use_adaptive_entropy=False, _metrics={"train": _Metrics()},
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask, get_gamma_weights=GRPOTrainer.get_gamma_weights,
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropies, None))
    trainer.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, trainer)
    b, t = data["mask"].shape
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": data["mask"],
              "advantages": data["advantages"], "old_per_token_logps": data["old"],
              "ref_per_token_logps": data["ref"], "sampling_per_token_logps": data["sampling"],
              "importance_sampling_ratio": weights, "num_items_in_batch": data["mask"].sum()}
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, logps, entropies, trainer._metrics["train"]


class _Metrics(dict):
    def __missing__(self, key: str) -> list:
        self[key] = []
        return self[key]


def qmath_loss(case: dict[str, Any], data: dict[str, torch.Tensor], weights: torch.Tensor) -> tuple:
    from qmath.grpo import entropy_threshold, grpo_loss, high_entropy_mask, off_policy_sequence_mask

    o = {**DEFAULTS, **case}
    logps = data["logps"].clone().requires_grad_(True)
    entropies = data["entropies"].clone().requires_grad_(True)
    mask = data["mask"]
    emask = None
    if o["top_entropy_quantile"] < 1:
        emask = high_entropy_mask(entropies, mask, entropy_threshold(entropies[mask.bool()],
                                                                     o["top_entropy_quantile"]))
    off = None
    if o["off_policy_mask_threshold"] is not None:
        off = off_policy_sequence_mask(data["advantages"], logps, data["sampling"], mask,
                                       o["off_policy_mask_threshold"])
    loss, stats = grpo_loss(
        logps, data["old"], data["advantages"], mask, data["ref"], BETA, o["epsilon"], o["epsilon_high"],
        o["loss_type"], MAX_LENGTH, mask.sum(), weights, importance_sampling_level=o["importance_sampling_level"],
        delta=o["delta"], use_bias_correction_kl=o["use_bias_correction_kl"], entropies=entropies,
        entropy_mask=emask, entropy_coef=o["entropy_coef"], off_policy_mask=off,
        sapo_temperature_neg=o["sapo_temperature_neg"], sapo_temperature_pos=o["sapo_temperature_pos"],
        vespo=(o["vespo_k_pos"], o["vespo_lambda_pos"], o["vespo_k_neg"], o["vespo_lambda_neg"]))
    return loss, logps, entropies, stats


def reduce_like_trl(name: str, value: torch.Tensor) -> float:
    """qmath's statistic as the step's logged value: extremes for the min/max ones, else the mean."""
    value = value.detach().flatten()
    return float(value.min() if name.endswith("_min") else value.max() if name.endswith("_max") else value.mean())


def compare(case: dict[str, Any], data: dict[str, torch.Tensor]) -> dict[str, float]:
    from qmath.grpo import sampling_correction

    weights, _ = sampling_correction(data["old"], data["sampling"], data["mask"], "token_truncate", None, 3.0)
    t_loss, t_logps, t_ent, t_metrics = trl_loss(case, data, weights)
    q_loss, q_logps, q_ent, q_stats = qmath_loss(case, data, weights)
    out = {"loss": abs(t_loss.item() - q_loss.item())}
    t_grads = torch.autograd.grad(t_loss, (t_logps, t_ent), allow_unused=True)
    q_grads = torch.autograd.grad(q_loss, (q_logps, q_ent), allow_unused=True)
    for name, tg, qg in zip(("grad logps", "grad entropies"), t_grads, q_grads):
        if tg is None and qg is None:
            continue
        tg = torch.zeros_like(data["old"]) if tg is None else tg
        qg = torch.zeros_like(data["old"]) if qg is None else qg
        out[name] = (tg - qg).abs().max().item()
    for name in STATS:
        if name in t_metrics and name in q_stats:
            out[name] = abs(t_metrics[name][0] - reduce_like_trl(name, q_stats[name]))
        elif (name in t_metrics) != (name in q_stats):
            out[f"{name} (logged by one side only)"] = float("inf")
    return out


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="of the random tensors")
    args = parser.parse_args(argv)
    data = tensors(args.seed)
    report = {name: compare(case, data) for name, case in CASES.items()}
    width = max(map(len, report))
    for name, diffs in report.items():
        worst = max(diffs.values())
        print(f"{name:<{width}}  max |TRL - qmath| {worst:.1e}  ({len(diffs)} quantities: {', '.join(diffs)})")
    return report


if __name__ == "__main__":
    main()
