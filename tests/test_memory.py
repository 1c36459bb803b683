"""The worst case of a run's device memory, known before step 1 and refused when it cannot fit (with a stand-in
budget, ``QMATH_MEMORY_BUDGET_GIB``, since this machine has no GPU), and an out-of-memory error mid-run said in one
line with the last checkpoint intact."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from qmath import memory
from qmath.__main__ import cli, main
from qmath.module import GRPO
from tests.test_fit import tiny_config


def fit_args(tmp, model, *extra):
    return ["fit", "--config", "cpu", "--config", str(tiny_config(tmp, model)), *extra]


def test_the_worst_case_is_printed_beside_the_budget_before_step_1(tiny_model, in_tmp, monkeypatch, capsys):
    monkeypatch.setenv(memory.BUDGET_ENV, "64")
    cli_ = main(fit_args(in_tmp, tiny_model, "--trainer.max_steps", "1"))
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("  memory       worst case"))
    assert "GiB per device, at the " in line and "of a 64.00 GiB budget" in line and "activations" in line
    assert out.index("  memory") < out.index("qmath: step 1/1")  # known before the first step
    module = cli_.model
    policy = sum(p.numel() * 4 for p in module.policy.parameters()) + sum(b.nbytes for b in module.policy.buffers())
    plan = memory.plan(module, activations=123)
    # exact parts: fp32 weights, the reference (the same network), AdamW's two moments, one copy of the gradients
    assert plan.parts["weights"] == plan.parts["reference"] == policy
    trainable = sum(p.numel() * 4 for p in module.policy.parameters())
    assert plan.parts["optimizer states"] == 2 * trainable and plan.parts["gradients"] == trainable
    assert plan.parts["DDP buckets"] == 0 and plan.parts["activations"] == 123
    assert plan.phase_bytes("optimizer step") == sum(plan.parts[p] for p in (
        "weights", "reference", "rollout copy", "optimizer states", "KV cache", "gradients",
        "optimizer step temporaries"))


def test_the_activations_are_measured_on_the_worst_micro_batch(tiny_model, in_tmp, monkeypatch):
    """The probe runs the loss's passes over the longest prompt and max_completion_length in every row; longer
    completions measure more, and the probe leaves no gradient and no random draw behind."""
    monkeypatch.setenv(memory.BUDGET_ENV, "64")
    cli_ = main(fit_args(in_tmp, tiny_model, "--trainer.max_steps", "1"))
    module = cli_.model
    micro = memory.worst_micro_batch(module)
    assert micro.completion_ids.shape == (8, 8) and micro.prompt_ids.size(1) == module.trainer.datamodule \
        .longest_prompt()
    state = torch.random.get_rng_state()
    short = memory.measure_activations(module)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(p.grad is None for p in module.policy.parameters())
    module.hparams.max_completion_length = 1024
    long = memory.measure_activations(module)
    assert short is not None and long > short  # (the RSS meter may see 0 for a short one: glibc reuses memory)


def test_ddp_buckets_and_gradients_count_once_with_bucket_view_and_twice_without(tiny_model):
    module = GRPO(model_name_or_path=str(tiny_model))
    module.configure_model()
    data = SimpleNamespace(longest_prompt=lambda: 100, eval_batch_size=16, hparams=SimpleNamespace(batch_size=1))
    optimizer = torch.optim.AdamW(module.policy.parameters())
    trainable = sum(p.numel() * 4 for p in module.policy.parameters())

    def planned(strategy):
        module._trainer = SimpleNamespace(strategy=strategy, optimizers=[optimizer], datamodule=data,
                                          accumulate_grad_batches=1)
        return memory.plan(module, activations=0)

    single = planned(SingleDeviceStrategy(torch.device("cpu")))
    view = planned(DDPStrategy(gradient_as_bucket_view=True))
    copies = planned(DDPStrategy())
    assert single.parts["DDP buckets"] == 0 and single.parts["gradients"] == trainable
    assert view.parts["DDP buckets"] == trainable and view.parts["gradients"] == 0
    assert copies.parts["DDP buckets"] == copies.parts["gradients"] == trainable
    assert copies.peak()[1] - view.peak()[1] == trainable
    # the evaluation's rows (16) set the eager KV cache: 2 layers x K and V x 16 rows x 1 head x 108 slots x 16 dims
    assert single.parts["KV cache"] == 2 * 2 * 16 * 1 * (100 + module.hparams.max_completion_length) * 16 * 4


def test_a_run_that_cannot_fit_is_refused_in_one_line_before_step_1(tiny_model, in_tmp, monkeypatch, capsys):
    monkeypatch.setenv(memory.BUDGET_ENV, "0.001")
    with pytest.raises(SystemExit) as exit_:
        cli(fit_args(in_tmp, tiny_model))
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "Traceback" in line or "qmath" in line]
    assert len(err) == 1 and err[0].startswith("qmath: error: this run needs about "), err
    for words in ("GiB per device at its ", "the device has 0.00 GiB", "model.gradient_checkpointing: true",
                  "model.num_generations", "model.max_completion_length", "model.lora_r", "model.rollout_dtype"):
        assert words in err[0]
    assert not list(in_tmp.rglob("*.ckpt"))  # nothing ran


def test_an_out_of_memory_error_mid_run_is_one_line_and_the_last_checkpoint_stays(tiny_model, in_tmp, monkeypatch,
                                                                                     capsys):
    original = GRPO.token_logps

    def token_logps(self, *args, **kwargs):  # the policy's forward over a micro-batch: where a long one runs out
        if self.trainer.global_step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GRPO, "token_logps", token_logps)
    with pytest.raises(SystemExit) as exit_:
        cli(fit_args(in_tmp, tiny_model, "--trainer.max_steps", "4", "--trainer.val_check_interval", "4"))
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qmath")]
    assert err == ["qmath: error: out of device memory at step 2, in the loss (forward). Lower the run's memory with "
                   f"{memory.LOWER_IT}; checkpoints already written are intact: resume with --ckpt_path last"]
    checkpoint = torch.load(in_tmp / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    # and it resumes
    monkeypatch.setattr(GRPO, "token_logps", original)
    resumed = main(fit_args(in_tmp, tiny_model, "--trainer.max_steps", "3", "--trainer.val_check_interval", "4",
                            "--ckpt_path", "last"))
    assert resumed.trainer.global_step == 3
