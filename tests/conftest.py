"""Shared fixtures: a tiny random Llama and a byte-level BPE tokenizer, both made here, offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_GSM8K = ROOT.parent / "shared" / "gsm8k"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # `make test` runs pytest-xdist's workers: the cores split among them
    # (each with every core would oversubscribe them, and OpenMP threads that wait spin); set before torch is
    # imported, and inherited by the processes the tests start (DDP ranks, the CLI, benchmarks' children)
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qmath.data import FEW_SHOT
    from qmath.rewards import SYSTEM_PROMPT
    from qmath.synthetic import problems

    corpus = [SYSTEM_PROMPT] + [s["question"] + s["response"] for s in FEW_SHOT]
    stream = problems(0)
    corpus += [f"{row['question']}\n{row['answer']}" for row, _ in zip(stream, range(200))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = chat_template
    return fast


def make_tiny_model(directory: Path, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Save a 2-layer random Llama and its tokenizer as a plain HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(chat_template)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_qwen_like(directory: Path, repetition_penalty: float = 1.5) -> Path:
    """A 2-layer random Qwen2 with Qwen2.5-Instruct's traits: its generation_config.json (sampling defaults, with
    an exaggerated ``repetition_penalty``), two EOS ids (``<|im_end|>``, ``<|endoftext|>``), pad = ``<|endoftext|>``,
    no BOS token. Weights of std 0.5 make its next-token distributions peaked, as a trained model's are, so that a
    penalty visibly moves them."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = make_tokenizer()
    tokenizer.bos_token = None
    end, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         tie_word_embeddings=True, initializer_range=0.5, bos_token_id=end, eos_token_id=im_end,
                         pad_token_id=end)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=end, eos_token_id=[im_end, end], pad_token_id=end,
                                               do_sample=True, repetition_penalty=repetition_penalty,
                                               temperature=0.7, top_p=0.8, top_k=20)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_tiny_gguf(path: Path) -> Path:
    """A GGUF file as llama.cpp's converter writes one: a 2-layer, 64-wide Llama of random fp32 weights with the
    tokenizer above (a byte-level BPE, GGUF's ``gpt2`` model) and a chat template. What a GGUF conversion does, in
    seconds rather than the half-minute the embedded model's 49,152 tokens and quantised blocks take."""
    import gguf
    import numpy as np

    tokenizer = make_tokenizer()
    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(state["vocab"], key=state["vocab"].get)
    special = set(tokenizer.all_special_tokens)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny")
    for add, value in [("block_count", 2), ("context_length", 2048), ("embedding_length", 64),
                       ("feed_forward_length", 128), ("head_count", 4), ("head_count_kv", 2),
                       ("rope_dimension_count", 16), ("rope_freq_base", 10000.0), ("layer_norm_rms_eps", 1e-5),
                       ("vocab_size", len(tokens)), ("tokenizer_model", "gpt2"), ("tokenizer_pre", "default"),
                       ("token_list", tokens), ("token_merges", [" ".join(m) for m in state["merges"]]),
                       ("token_types", [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL
                                        for t in tokens]),
                       ("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
                       ("pad_token_id", tokenizer.pad_token_id), ("chat_template", CHAT_TEMPLATE)]:
        getattr(writer, f"add_{add}")(value)
    shapes = {"token_embd.weight": (len(tokens), 64), "output_norm.weight": (64,)}
    for i in range(2):  # numpy's (out, in) order, as in the HF model; the writer reverses it into GGUF's
        shapes |= {f"blk.{i}.{name}": shape for name, shape in [
            ("attn_norm.weight", (64,)), ("ffn_norm.weight", (64,)), ("attn_q.weight", (64, 64)),
            ("attn_k.weight", (32, 64)), ("attn_v.weight", (32, 64)), ("attn_output.weight", (64, 64)),
            ("ffn_gate.weight", (128, 64)), ("ffn_up.weight", (128, 64)), ("ffn_down.weight", (64, 128))]}
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        writer.add_tensor(name, (0.02 * rng.standard_normal(shape)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns xdist_group marks into its groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's ``--dist loadgroup``, the tests that share a module-scoped fixture (a DDP run, a fitted
    model) go to one worker, so that the fixture is made once, not once per worker."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        shared = sorted(name for name, defs in (info.name2fixturedefs.items() if info else ())
                        if defs and defs[-1].scope == "module")
        if shared:
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}:{shared[0]}"))


@pytest.fixture(scope="session")
def qwen_like(tmp_path_factory) -> Path:
    return make_qwen_like(tmp_path_factory.mktemp("qwen-like"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in a fresh directory so lightning_logs/ lands there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
