"""Resuming: a checkpoint only loads into the model it was trained from."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from qmath.__main__ import main
from tests.test_fit import tiny_config

LAST = ("lightning_logs", "cpu", "checkpoints", "last.ckpt")


def test_a_checkpoint_of_another_vocabulary_is_refused_before_training(tiny_model, in_tmp):
    config = str(tiny_config(in_tmp, tiny_model))
    main(["fit", "--config", "cpu", "--config", config, "--trainer.max_steps", "1"])
    other = shutil.copytree(tiny_model, in_tmp / "other")
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<extra>"])  # same weights, one more token: ids no longer mean the same
    tokenizer.save_pretrained(other)
    with pytest.raises(ValueError, match=r"another base model or vocabulary: model_name_or_path .*vocab_size 400 "
                                         r"\(now 401\).*--model.model_name_or_path it was trained from"):
        main(["fit", "--config", "cpu", "--config", config, "--model.model_name_or_path", str(other),
              "--trainer.max_steps", "2", "--ckpt_path", "last"])
    assert torch.load(in_tmp.joinpath(*LAST), weights_only=True)["global_step"] == 1  # nothing trained


def test_a_checkpoint_with_other_weight_shapes_is_refused(tiny_model, in_tmp):
    config = str(tiny_config(in_tmp, tiny_model))
    main(["fit", "--config", "cpu", "--config", config, "--trainer.max_steps", "1"])
    ckpt = torch.load(in_tmp.joinpath(*LAST), weights_only=True)
    del ckpt["qmath_base"]  # as from a checkpoint that does not record its base
    torch.save(ckpt, in_tmp.joinpath(*LAST))
    wider = shutil.copytree(tiny_model, in_tmp / "wider")
    base = LlamaConfig.from_pretrained(tiny_model)
    base.hidden_size, base.intermediate_size = 48, 96
    LlamaForCausalLM(base).save_pretrained(wider)
    with pytest.raises(ValueError, match="weight shapes"):
        main(["fit", "--config", "cpu", "--config", config, "--model.model_name_or_path", str(wider),
              "--trainer.max_steps", "2", "--ckpt_path", "last"])
