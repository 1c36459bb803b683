"""LoRA adapters through PEFT: the base weights stay frozen, and the KL reference is the same network with its
adapters switched off, so no second copy of the model is loaded.

A LoRA checkpoint holds the adapter weights and their optimizer state (and, as every qmath checkpoint, the base
model's identity); the base weights come from ``model.model_name_or_path`` when it is loaded again.
"""

from __future__ import annotations

from typing import Any

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
        return get_peft_model(model, config)
    except ValueError as error:  # PEFT's message for target modules that match nothing
        raise ConfigError(f"model.lora_target_modules {target_modules!r}: {error}") from error


def trainable_keys(module: Any) -> set[str]:
    """The state-dict keys of ``module``'s trainable parameters: what a LoRA checkpoint holds of the weights."""
    return {name for name, p in module.named_parameters() if p.requires_grad}
