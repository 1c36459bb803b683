"""Precisions a GPU user will try besides 32-true: bf16-true, bf16-mixed and 16-mixed's GradScaler, on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml

from qmath.__main__ import main
from qmath.grpo import chunked_token_logps
from tests.test_fit import scalars, tiny_config


def test_chunked_log_probs_are_fp32_from_bf16_weights_and_under_autocast():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 6, 16) * 3, torch.randn(50, 16)
    index = torch.randint(0, 50, (2, 6))

    def fp32(h, w):
        return torch.log_softmax(F.linear(h.float(), w.float()) / 0.7, dim=-1).gather(-1, index[..., None])[..., 0]

    half_h, half_w = hidden.bfloat16(), weight.bfloat16().requires_grad_()
    got = chunked_token_logps(half_h, half_w, index, temperature=0.7, chunk_size=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, fp32(half_h, half_w), rtol=1e-6, atol=1e-6)
    in_bf16 = torch.log_softmax(F.linear(half_h, half_w) / 0.7, dim=-1).gather(-1, index[..., None])[..., 0]
    assert (in_bf16.float() - got).abs().max() > 1e-3  # what computing in bf16 would have lost
    got.sum().backward()
    assert half_w.grad.dtype == torch.bfloat16 and half_w.grad.isfinite().all()

    with torch.autocast("cpu", dtype=torch.bfloat16):  # as under bf16-mixed: the head must not run in bf16
        under_autocast = chunked_token_logps(hidden, weight, index, temperature=0.7, chunk_size=4)
    torch.testing.assert_close(under_autocast, fp32(hidden, weight), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-true", torch.bfloat16), ("bf16-mixed", torch.float32)])
def test_a_step_under_bf16_has_a_reference_in_the_policys_dtype_and_a_finite_loss(tiny_model, in_tmp, precision,
                                                                                   dtype):
    cli = main(["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)), "--trainer.precision",
                precision, "--trainer.max_steps", "2"])
    module = cli.model
    assert module.policy.dtype == dtype
    assert {p.dtype for p in module.reference.parameters()} == {dtype}
    logged = scalars(in_tmp / "lightning_logs" / "cpu" / "version_0")
    assert len(logged["train/loss"]) == 2 and all(torch.isfinite(torch.tensor(v)) for _, v in logged["train/loss"])
    assert all(v > 0 for _, v in logged["train/kl"][1:])  # the step moved the policy away from its reference
    assert [v for _, v in logged["train/skipped_steps"]] == [0, 0]


def test_gradscaler_overflows_under_16_mixed_are_not_counted_as_failures(tiny_model, in_tmp):
    # A real GradScaler (on CPU, through Lightning's 16-mixed plugin) with a scale so high that the fp16 gradients
    # overflow at every step: the scaler skips those steps and lowers its scale, as it does on a T4 at the start.
    config = in_tmp / "scaler.yaml"
    scaler = {"class_path": "torch.amp.GradScaler", "init_args": {"device": "cpu", "init_scale": 1.0e30}}
    config.write_text(yaml.safe_dump({"trainer": {"precision": None, "plugins": [{
        "class_path": "lightning.pytorch.plugins.precision.MixedPrecision",
        "init_args": {"precision": "16-mixed", "device": "cpu", "scaler": scaler}}]}}))
    cli = main(["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)), "--config", str(config),
                "--trainer.max_steps", "4"])  # more overflowing steps in a row than model.max_skipped_steps (3)
    assert cli.trainer.precision_plugin.scaler.get_scale() == pytest.approx(1.0e30 / 2**4)  # 4 overflows, halved
    assert cli.model.guard.skipped == 0
    assert [v for _, v in scalars(in_tmp / "lightning_logs" / "cpu" / "version_0")["train/skipped_steps"]] == [0] * 4


@pytest.mark.parametrize(("precision", "native", "warned"), [
    ("bf16-mixed", False, True), ("bf16-true", False, True), ("16-mixed", False, True),
    ("bf16-mixed", True, False), ("32-true", False, False), ("64-true", False, False)])
def test_a_16_bit_precision_that_a_cpu_only_emulates_is_said(monkeypatch, precision, native, warned):
    from qmath.policy import emulated_precision

    monkeypatch.setattr("qmath.policy._emulated", lambda dtype, device: not native)
    said = emulated_precision(precision, torch.device("cpu"))
    assert (said is not None) == warned
    if warned:
        name = "bf16" if precision.startswith("bf16") else "fp16"
        assert said.startswith(f"trainer.precision {precision}: this CPU has no native {name} matrix") and (
            "32-true here" in said)
    assert emulated_precision(precision, torch.device("meta")) is None  # no kernels to speak of
