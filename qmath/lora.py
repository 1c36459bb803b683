"""LoRA adapters through PEFT: the base weights stay frozen, and the KL reference is the same network with its
adapters switched off, so no second copy of the model is loaded.

A LoRA checkpoint holds the adapter weights and their optimizer state (and, as every qmath checkpoint, the base
model's identity); the base weights come from ``model.model_name_or_path`` when it is loaded again.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from qmath.errors import ConfigError

ALL_LINEAR = "all-linear"  # PEFT's name for every linear layer of the blocks (attention and MLP), not the LM head


def add_adapters(model: Any, r: int, alpha: float, dropout: float, target_modules: list[str] | str) -> Any:
    """``model`` wrapped by PEFT with LoRA adapters of rank ``r`` on ``target_modules``; only they train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ConfigError("model.lora_r > 0 needs the package peft: pip install peft") from error
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM", bias="none")
    try:
        with warnings.catch_warnings():  # PEFT 0.21 reads a name transformers 5 deprecated: not the user's to fix
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return get_peft_model(model, config)
    except ValueError as error:  # PEFT's message for target modules that match nothing
        raise ConfigError(f"model.lora_target_modules {target_modules!r}: {error}") from error


def trainable_keys(module: Any) -> set[str]:
    """The state-dict keys of ``module``'s trainable parameters: what a LoRA checkpoint holds of the weights."""
    return {name for name, p in module.named_parameters() if p.requires_grad}


class MergedForGeneration:
    """A context in which ``model`` (a PEFT model) generates with its adapters folded into the base weights, so that
    decoding runs one matmul per linear layer instead of three; the trained policy is the same function.

    Measured on the embedded default (``python benchmarks/lora.py``): unmerged rollouts are 1.12x slower on
    CPU. PEFT's own ``unmerge_adapter`` subtracts the update again, which leaves rounding error in the frozen base
    weights at every step: the KL reference (the base with adapters off) would drift from the initial model and a
    resumed run (base weights fresh from the hub) would sample differently from the uninterrupted one. So the base
    weights of the adapted layers are restored bit for bit from a copy taken once, kept in host memory (pinned when
    the weights are on a GPU), where it costs no GPU memory: 4.9 GiB of host memory per rank for Qwen2.5-1.5B,
    0.4 GiB for the embedded model.
    """

    def __init__(self, model: Any) -> None:
        from peft.tuners.lora import LoraLayer

        self.model = model
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        self._pristine: list[torch.Tensor] | None = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if not self.layers or any(layer.disable_adapters for layer in self.layers):
            yield  # adapters switched off by the caller: generate with the base as it is
            return
        weights = [layer.get_base_layer().weight for layer in self.layers]
        if self._pristine is None:
            pin = torch.cuda.is_available() and weights[0].is_cuda
            self._pristine = [w.detach().to("cpu", copy=True).pin_memory() if pin else w.detach().clone()
                              for w in weights]
        try:
            # in the weights' precision: 16-mixed runs rollouts under autocast, which would round the update to 16 bits
            with torch.no_grad(), torch.autocast(weights[0].device.type, enabled=False):
                for layer, weight in zip(self.layers, weights):
                    for adapter in layer.active_adapters:
                        weight.add_(layer.get_delta_weight(adapter).to(weight.dtype))
            with self.model.disable_adapter():  # PEFT's: the adapter branches off, the merged weights on
                yield
        finally:
            with torch.no_grad():
                for weight, pristine in zip(weights, self._pristine):
                    weight.copy_(pristine, non_blocking=True)
