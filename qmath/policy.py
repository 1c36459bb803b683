"""The policy and its forms: the weights that train, the frozen KL reference, and the weights rollouts read.

- Training: the causal LM as loaded (with LoRA, wrapped by PEFT: only the adapters train). The LightningModule
  registers it as ``policy``, so checkpoints keep their ``policy.*`` keys.
- Reference: a frozen copy of the base weights, loaded when fit starts, outside the module tree (never in the
  optimizer, the state dict or a checkpoint); with LoRA the same network with its adapters off, no copy at all.
- Rollouts: the policy itself (LoRA: with its adapters folded into the base for the call, see
  :class:`qmath.lora.MergedForGeneration`), or with ``rollout_dtype`` a half-precision copy of it. Decoding reads
  every weight once per token, so a 16-bit copy halves its bandwidth floor; the loss corrects for the difference
  between the two distributions (:func:`qmath.grpo.sampling_correction`). The copy is refreshed in place (captured
  CUDA graphs read its very tensors) before a rollout whenever an optimizer step changed the weights since the
  last refresh: after every step with ``num_iterations`` 1, once per rollout with more, not after skipped steps.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor

from qmath.checkpointing import base_identity
from qmath.compat import enable_activation_checkpointing
from qmath.generation import ids_only
from qmath.logprobs import head_is_linear, token_logps
from qmath.lora import MergedForGeneration, add_adapters, trainable_keys
from qmath.models import load_model, load_tokenizer
from qmath.rollout import Rollout

log = logging.getLogger(__name__)
RolloutDtype = Literal["float16", "bfloat16"]


class Policy:
    """Loads the policy and owns its forms (see the module docstring); ``lora`` holds the LoRA options
    (``lora_r`` 0: none), ``rollout_dtype`` the dtype of the rollout copy (``None``: rollouts read the policy);
    ``temperature``, ``top_k`` and ``top_p`` are the rollouts' sampling, which :meth:`logps` scores under."""

    def __init__(self, model_name_or_path: str, trust_remote_code: bool = False, temperature: float = 1.0,
                 group: int = 1, gradient_checkpointing: bool = False, lora: dict[str, Any] | None = None,
                 rollout_dtype: RolloutDtype | None = None, top_k: int | None = None, top_p: float = 1.0) -> None:
        self.name, self.trust_remote_code = model_name_or_path, trust_remote_code
        self.temperature, self.group, self.gradient_checkpointing = temperature, group, gradient_checkpointing
        self.top_k, self.top_p = top_k, top_p
        self.lora = dict(lora or {"lora_r": 0})
        self.rollout_dtype = rollout_dtype
        self.model: Any = None
        self.tokenizer: Any = None
        self.reference: Any = None  # the frozen copy (full fine-tuning with beta != 0), loaded by load_reference
        self.rollout_model: Any = None  # the half-precision copy rollouts decode from (rollout_dtype)
        self.merged: MergedForGeneration | None = None  # LoRA folded into the base for generation
        self.linear_heads: dict[int, bool] = {}  # id(model) -> whether its log-probs can come from hidden states
        self.base: dict[str, Any] = {}  # what a checkpoint's weights only fit
        self.stale = True  # whether the rollout copy lags the weights
        self.copy_dropped = False  # the copy overflowed and was dropped: rollouts read the policy for the run
        self.sharded = False

    @property
    def lora_r(self) -> int:
        return self.lora["lora_r"]

    def load(self, sharded: bool = False) -> None:
        """Tokenizer, policy and adapters (Lightning moves the policy to its device)."""
        self.sharded = sharded
        self.tokenizer = load_tokenizer(self.name, self.trust_remote_code)
        self.model = load_model(self.name, self.trust_remote_code).train()  # from_pretrained gives eval
        # every generate call gets qmath's explicit config: nothing of the checkpoint's may fill its gaps
        self.model.generation_config = ids_only(self.model.generation_config)
        if self.gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        if self.lora_r:
            lora = self.lora
            self.model = add_adapters(self.model, lora["lora_r"], lora["lora_alpha"], lora["lora_dropout"],
                                      lora["lora_target_modules"])
            if lora.get("lora_merge_for_generation", True) and not sharded:  # (evaluation's, with a rollout copy)
                self.merged = MergedForGeneration(self.model)
        self.linear_heads[id(self.model)] = head_is_linear(self.model)
        self.base = base_identity(self.name, self.tokenizer)

    def load_rollout_copy(self, device: torch.device, make: bool = True) -> Any:
        """The rollout copy, on ``device``, made when training starts (``None`` without one: see
        :meth:`copy_dtype`).

        Loaded from the base checkpoint in its dtype rather than cast from the policy: no second full-precision
        model exists on the device even for a moment, the rotary frequencies stay in fp32 (a cast model's would be
        rounded to 16 bits too, which bends the positions of long completions), and the weights are written in by
        the first :meth:`refresh` (the trained ones, also after a resume), before the first rollout. ``make``: what
        every rank agreed on (a rank whose device cannot have one makes all of them sample from the policy)."""
        if self.rollout_model is not None or self.copy_dtype(device, warn=True) is None or not make:
            return self.rollout_model
        copy = load_model(self.name, self.trust_remote_code, dtype=getattr(torch, self.rollout_dtype))
        copy.generation_config = ids_only(copy.generation_config)
        self.rollout_model = copy.eval().requires_grad_(False).to(device)
        self.stale = True
        return self.rollout_model

    def drop_rollout_copy(self) -> None:
        """Free the rollout copy for the rest of the run (its logits overflowed): rollouts read the policy."""
        self.rollout_model, self.copy_dropped = None, True
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def copy_dtype(self, device: torch.device, warn: bool = False) -> str | None:
        """The dtype the rollout copy has on ``device``, or ``None`` where rollouts read the policy: no
        ``rollout_dtype``, FSDP's sharded weights, the policy's own dtype, or a dtype without native kernels there
        (the copy would decode slower than the policy, and speed is its only point)."""
        dtype, why = self.rollout_dtype and getattr(torch, self.rollout_dtype), None
        if dtype is None:
            return None
        if self.copy_dropped:
            why = "its logits overflowed earlier in this run, and it was dropped"
        elif self.sharded:
            why = "FSDP shards the policy"
        elif dtype.itemsize >= self.model.dtype.itemsize:
            why = f"the policy's own {self.model.dtype} is no wider"
        elif _emulated(dtype, device):
            why = (f"{device} has no native {self.rollout_dtype} matrix products (bfloat16 suits CPUs with AVX-512 "
                   "BF16 or AMX and Ampere or newer GPUs, float16 T4s and V100s)")
        if why and warn:
            log.warning("model.rollout_dtype %s: %s, so rollouts read the policy", self.rollout_dtype, why)
        return None if why else self.rollout_dtype

    def load_reference(self, device: torch.device, beta: float) -> None:
        """Load the frozen reference when the KL term needs one and no adapters can be switched off instead."""
        if beta == 0.0 or self.reference is not None or self.lora_r:
            return
        # in the policy's dtype: this runs outside Lightning's init context, where bf16-true and 16-true would have
        # made the default dtype half precision
        reference = load_model(self.name, self.trust_remote_code, dtype=self.model.dtype)
        self.reference = reference.eval().requires_grad_(False).to(device)
        self.linear_heads[id(self.reference)] = head_is_linear(self.reference)

    def needs_reference(self, beta: float) -> bool:
        return beta != 0.0 and (self.reference is not None or bool(self.lora_r))

    @contextlib.contextmanager
    def as_reference(self) -> Iterator[Any]:
        """The KL reference for the block: the frozen copy, or with LoRA the policy with its adapters off."""
        if self.lora_r:
            with self.model.disable_adapter():  # PEFT's: the base model, for the block's duration
                yield self.model
        else:
            yield self.reference

    def logps(self, model: Any, rollout: Rollout, entropy: bool = False,
              entropy_grad: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Log-probs of the completion tokens under ``model`` at the sampling temperature, over the tokens the
        sampling's top-k and top-p keep of ``model``'s own distribution, ``[B, T]``, and with ``entropy`` each
        token's entropy over the whole vocabulary (:func:`qmath.logprobs.token_logps`). The policy, π_old and the
        KL reference alike: at the start, when the policy is the reference, the KL is exactly 0."""
        linear = self.linear_heads.get(id(model))
        if linear is None:  # a model other than the policy and the reference
            linear = head_is_linear(model)
        return token_logps(model, rollout, self.temperature, self.group, linear, entropy, entropy_grad,
                           self.top_k, self.top_p)

    def checkpointed_keys(self, state_dict_keys: set[str], prefix: str = "policy.") -> set[str]:
        """The weights a checkpoint holds: all of the module's, or with LoRA the adapters only."""
        if self.lora_r:
            return {f"{prefix}{k}" for k in trainable_keys(self.model)}
        return set(state_dict_keys)

    @torch.no_grad()
    def refresh(self) -> None:
        """Write the policy's weights into the rollout copy, in place, if a step changed them since last time."""
        if self.rollout_model is None or not self.stale:
            return
        with torch.autocast(self.model.device.type, enabled=False):  # the sum in the weights' precision
            if self.lora_r:
                self._fold_adapters()
            else:
                own = dict(self.model.named_parameters())
                for name, weight in self.rollout_model.named_parameters():
                    weight.copy_(own[name])
        self.stale = False

    def _fold_adapters(self) -> None:
        """base + each active adapter's update into each adapted layer of the copy; the base stays untouched."""
        from peft.tuners.lora import LoraLayer

        copies = dict(self.rollout_model.named_modules())
        for name, layer in self.model.get_base_model().named_modules():
            if isinstance(layer, LoraLayer):
                weight = layer.get_base_layer().weight
                update = sum(layer.get_delta_weight(adapter) for adapter in layer.active_adapters)
                copies[name].weight.copy_(weight + update)


def _emulated(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``dtype``'s matrix products are emulated on ``device``: bf16 on GPUs before Ampere and on CPUs
    without AVX-512 BF16 or AMX, fp16 on CPUs without AMX-FP16 (oneDNN's own ``bf16 supported`` also says yes for
    plain AVX-512, where it converts)."""
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] < 8
    if device.type != "cpu":
        return False
    # private, what torch's CPU kernels dispatch on (tests/test_private_apis.py checks they are there)
    if dtype == torch.bfloat16:
        return not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return not torch.cpu._is_amx_fp16_supported()


def emulated_precision(precision: str, device: torch.device) -> str | None:
    """What to tell a user whose ``trainer.precision`` runs its matrix products in a 16-bit type that ``device``
    only emulates: bf16 on a CPU without AVX-512 BF16 or AMX converts every operand and is many times slower than
    fp32 (docs/performance.md, "A CPU step, part by part"), and so is bf16 on a GPU before Ampere (a T4); ``None``
    otherwise."""
    half = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision.split("-")[0])
    if half is None or device.type not in ("cpu", "cuda") or not _emulated(half, device):
        return None
    name, where = ("bf16" if half == torch.bfloat16 else "fp16"), ("CPU" if device.type == "cpu" else "GPU")
    return (f"trainer.precision {precision}: this {where} has no native {name} matrix products, so they are "
            "emulated and the step is many times slower than at 32-true (docs/performance.md, \"A CPU step, part "
            "by part\"); use --trainer.precision 32-true" + (" or 16-mixed" if where == "GPU" else "") + " here")
