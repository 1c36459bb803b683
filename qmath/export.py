"""``python -m qmath export --ckpt_path CKPT --out DIR``: the trained policy as a plain Hugging Face model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qmath.checkpointing import read_checkpoint
from qmath.errors import CheckpointError
from qmath.models import _checked, load_tokenizer, resolve


def export(ckpt_path: str, out: str) -> Path:
    """Write the checkpoint's policy and its tokenizer (with chat template) to ``out``, for ``from_pretrained``.

    The architecture comes from the base model's config (``model.model_name_or_path`` as saved in the checkpoint),
    the weights all from the checkpoint; the base weights are not read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    # mapped: the policy's tensors are read once, into the model, and the optimizer state never
    checkpoint = read_checkpoint(ckpt_path, mmap=True)
    hparams = checkpoint.get("hyper_parameters", {})
    if "model_name_or_path" not in hparams:
        raise CheckpointError(f"{ckpt_path} is not a qmath checkpoint: it names no model_name_or_path")
    name, remote = hparams["model_name_or_path"], hparams.get("trust_remote_code", False)
    config = AutoConfig.from_pretrained(_checked(resolve(name)), trust_remote_code=remote)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=remote)
    state = {k.removeprefix("policy."): v for k, v in checkpoint["state_dict"].items() if k.startswith("policy.")}
    model.load_state_dict(state, strict=True)
    tokenizer = load_tokenizer(name, remote)
    tokenizer.padding_side = "right"  # the usual default; qmath's left padding is for its own batched sampling
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qmath export", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by `fit`, e.g. .../last.ckpt")
    parser.add_argument("--out", required=True, help="the directory to write (config, safetensors, tokenizer)")
    return parser


def main(args: list[str]) -> Path:
    options = parser().parse_args(args)
    out = export(options.ckpt_path, options.out)
    print(f"qmath: wrote {out}; load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return out
