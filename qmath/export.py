"""``python -m qmath export --ckpt_path CKPT --out DIR``: the trained policy as a plain Hugging Face model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qmath.checkpointing import read_checkpoint
from qmath.errors import CheckpointError
from qmath.lora import add_adapters, trainable_keys
from qmath.models import _checked, load_model, load_tokenizer, resolve

DTYPES = ("float32", "bfloat16", "float16")


def export(ckpt_path: str, out: str, adapter: bool = False, dtype: str = "float32") -> Path:
    """Write the checkpoint's policy and its tokenizer (with chat template) to ``out``, for ``from_pretrained``.

    The architecture comes from the base model's config (``model.model_name_or_path`` as saved in the checkpoint),
    the weights all from the checkpoint; the base weights are not read. A LoRA checkpoint holds adapters only: the
    base weights are loaded, the adapters folded into them (or, with ``adapter``, written as a PEFT adapter
    directory, for ``PeftModel.from_pretrained`` over the base model).

    ``dtype`` is what the weights are written in: ``float32`` as trained, or ``bfloat16``/``float16``, half the
    bytes, what a merged model is usually shared in (``config.json`` says which). A weight that float16 cannot hold
    is refused rather than written as ``inf``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    # mapped: the policy's tensors are read once, into the model, and the optimizer state never
    checkpoint = read_checkpoint(ckpt_path, mmap=True)
    hparams = checkpoint.get("hyper_parameters", {})
    if "model_name_or_path" not in hparams:
        raise CheckpointError(f"{ckpt_path} is not a qmath checkpoint: it names no model_name_or_path")
    name, remote = hparams["model_name_or_path"], hparams.get("trust_remote_code", False)
    state = {k.removeprefix("policy."): v for k, v in checkpoint["state_dict"].items() if k.startswith("policy.")}
    if hparams.get("lora_r"):
        model = _with_adapters(name, remote, hparams, state, ckpt_path)
        if adapter:
            _cast(model, dtype, ckpt_path)
            model.save_pretrained(out)  # adapter_config.json (naming the base model) and the adapter weights
            load_tokenizer(name, remote).save_pretrained(out)
            return Path(out)
        model = model.merge_and_unload()  # W + B·A·alpha/r, the plain model again
        # as the full-weight path: the config's own ids, not the base checkpoint's sampling settings
        model.generation_config = GenerationConfig.from_model_config(model.config)
    elif adapter:
        raise CheckpointError(f"--adapter: {ckpt_path} was trained without LoRA (model.lora_r 0): it has no adapter")
    else:
        config = AutoConfig.from_pretrained(_checked(resolve(name)), trust_remote_code=remote)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=remote)
        model.load_state_dict(state, strict=True)
    _cast(model, dtype, ckpt_path)
    tokenizer = load_tokenizer(name, remote)
    tokenizer.padding_side = "right"  # the usual default; qmath's left padding is for its own batched sampling
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


def _cast(model: torch.nn.Module, dtype: str, ckpt_path: str) -> None:
    """Cast every weight (with ``--adapter``: the adapters, which are all it holds) to ``dtype``, in place;
    ``save_pretrained`` then writes that dtype into ``config.json``."""
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype}: give one of {', '.join(DTYPES)}")
    target = getattr(torch, dtype)
    if target == torch.float16:  # bf16 has fp32's range; fp16 tops out at 65504
        largest = max((p.detach().abs().max().item() for p in model.parameters() if p.numel()), default=0.0)
        if largest > torch.finfo(torch.float16).max:
            raise CheckpointError(f"--dtype float16: {ckpt_path} holds a weight of magnitude {largest:.4g}, beyond "
                                  "float16's 65504; export as bfloat16 (same size, fp32's range) or float32")
    model.to(target)


def _with_adapters(name: str, remote: bool, hparams: dict, state: dict, ckpt_path: str):
    model = add_adapters(load_model(name, remote, dtype=torch.float32), hparams["lora_r"], hparams["lora_alpha"],
                         hparams["lora_dropout"], hparams["lora_target_modules"])
    missing = trainable_keys(model) - state.keys()
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_path}: its adapters do not fit the LoRA settings it names ({len(missing)} "
                              f"missing, {len(unexpected)} unexpected, e.g. {sorted(missing or unexpected)[0]})")
    return model.eval()


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qmath export", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by `fit`, e.g. .../last.ckpt")
    parser.add_argument("--out", required=True, help="the directory to write (config, safetensors, tokenizer)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="the weights' dtype on disk: float32 as trained, or bfloat16/float16 at half the size "
                             "(what a merged model is usually shared in)")
    parser.add_argument("--adapter", action="store_true",
                        help="a LoRA checkpoint: write the PEFT adapter directory instead of the merged model")
    return parser


def main(args: list[str]) -> Path:
    options = parser().parse_args(args)
    out = export(options.ckpt_path, options.out, options.adapter, options.dtype)
    how = (f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<its base model>), {str(out)!r})"
           if options.adapter else f"AutoModelForCausalLM.from_pretrained({str(out)!r})")
    print(f"qmath: wrote {out}; load it with {how}")
    return out
