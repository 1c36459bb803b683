"""`python -m qmath export`: the trained policy as a plain HF directory that generates what the checkpoint does."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qmath.__main__ import main
from qmath.errors import CheckpointError
from qmath.module import GRPO
from tests.test_fit import tiny_config


def test_export_generates_what_the_checkpoint_generates(tiny_model, in_tmp):
    main(["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model))])
    ckpt = in_tmp / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt"
    out = main(["export", "--ckpt_path", str(ckpt), "--out", str(in_tmp / "exported")])

    exported = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template  # the chat template travels with it
    checkpoint = torch.load(ckpt, weights_only=True)
    trained = GRPO(model_name_or_path=checkpoint["hyper_parameters"]["model_name_or_path"])
    trained.configure_model()
    trained.load_state_dict(checkpoint["state_dict"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert any(not torch.equal(a, b) for a, b in zip(exported.parameters(), base.parameters()))  # it was trained

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    expected = trained.policy.eval().generate(**ids, **kwargs)
    torch.testing.assert_close(exported.eval().generate(**ids, **kwargs), expected)


def test_export_names_a_missing_checkpoint(in_tmp):
    with pytest.raises(CheckpointError, match="nope.ckpt: no such checkpoint file"):
        main(["export", "--ckpt_path", "nope.ckpt", "--out", "x"])
