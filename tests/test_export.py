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
    check_half_precision_exports(ckpt, exported, ids, in_tmp)


def check_half_precision_exports(ckpt, exported, ids, tmp):
    """``--dtype bfloat16``/``float16``: every tensor on disk in that dtype, ``config.json`` saying so, half the
    bytes, and logits within the dtype's rounding of the float32 export's. Each weight rounds to 8 (bf16) or 11
    (fp16) significant bits, a relative error of at most 2^-9 or 2^-12; through the tiny model's 2 layers that stays
    well under 5% (bf16) and 1% (fp16) of the logits' spread, while a wrong cast (a transposed or missing weight)
    moves them by about their whole spread."""
    import json

    from safetensors import safe_open

    with torch.no_grad():
        reference = exported.float()(**ids).logits
    full = sum(f.stat().st_size for f in (tmp / "exported").glob("*.safetensors"))
    for dtype, bound in (("bfloat16", 0.05), ("float16", 0.01)):
        out = main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp / dtype), "--dtype", dtype])
        assert json.loads((out / "config.json").read_text())["dtype"] == dtype
        files = sorted(out.glob("*.safetensors"))
        for file in files:
            with safe_open(file, "pt") as f:
                assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16" if dtype == "bfloat16" else "F16"}  # noqa: SIM118
        assert sum(f.stat().st_size for f in files) < 0.55 * full
        half = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype))
        with torch.no_grad():
            logits = half.float()(**ids).logits
        assert (logits - reference).abs().max() < bound * reference.std(), dtype


def test_a_float16_export_refuses_weights_beyond_its_range(tiny_model, in_tmp):
    from qmath.checkpointing import read_checkpoint

    model = GRPO(model_name_or_path=str(tiny_model))
    model.configure_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(k for k in state if k.endswith("mlp.down_proj.weight"))
    state[name][0, 0] = 1e5  # representable in bfloat16, inf in float16
    torch.save({"state_dict": state, "hyper_parameters": {"model_name_or_path": str(tiny_model)}}, in_tmp / "x.ckpt")
    assert read_checkpoint(str(in_tmp / "x.ckpt"))["state_dict"][name][0, 0] == 1e5
    with pytest.raises(CheckpointError, match="holds a weight of magnitude 1e[+]05, beyond float16's 65504"):
        main(["export", "--ckpt_path", str(in_tmp / "x.ckpt"), "--out", str(in_tmp / "fp16"), "--dtype", "float16"])
    assert not (in_tmp / "fp16").exists()  # nothing half-written
    main(["export", "--ckpt_path", str(in_tmp / "x.ckpt"), "--out", str(in_tmp / "bf16"), "--dtype", "bfloat16"])
    assert (in_tmp / "bf16" / "config.json").is_file()


def test_export_names_a_missing_checkpoint(in_tmp):
    with pytest.raises(CheckpointError, match="nope.ckpt: no such checkpoint file"):
        main(["export", "--ckpt_path", "nope.ckpt", "--out", "x"])
