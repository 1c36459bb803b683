"""Rollouts from a half-precision copy of the policy (model.rollout_dtype), corrected by importance sampling."""

from __future__ import annotations

import math

import pytest
import torch

from qmath.__main__ import main
from qmath.generation import Sampler
from qmath.grpo import grpo_loss, sampling_correction
from tests.test_fit import scalars, tiny_config

MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


@pytest.fixture(autouse=True)
def native_half_precision(monkeypatch):
    """The copy is made on any CPU here, also one without native bf16 (where it would fall back to the policy)."""
    monkeypatch.setattr("qmath.policy._emulated", lambda *_: False)


def trl_correction(old, sampled, mask, mode, clip_min, clip_max):
    """TRL 1.16's GRPOTrainer._generate_and_score_completions, transcribed: the vLLM importance sampling ratio."""
    diff = torch.nan_to_num((old - sampled) * mask, nan=0.0)
    if mode in ("sequence_mask", "sequence_truncate"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode in ("sequence_truncate", "token_truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = clip_min if clip_min is not None else -math.inf
    high = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < low) | (ratio > high), value=0.0)


@pytest.fixture
def logps():
    torch.manual_seed(0)
    old = -torch.rand(4, 6) * 3
    sampled = old + torch.randn(4, 6) * 0.6  # some tokens far enough to cross the bounds
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] * 5 + [0]])
    sampled[1, 5] = float("nan")  # a padded position may hold anything
    return old, sampled, mask


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bounds", [(None, 3.0), (0.5, 1.5), (0.8, None)])
def test_the_correction_is_trls_formula_in_every_mode(logps, mode, bounds):
    old, sampled, mask = logps
    got, stats = sampling_correction(old, sampled, mask, mode, *bounds)
    expected = trl_correction(old, sampled, mask, mode, *bounds)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.shape == ((4, 1) if mode.startswith("sequence") else (4, 6))
    # TRL's statistics: |old - sampled| over the masked tokens; the ratios of those tokens, or of each sequence
    kept = mask.bool()
    for kind in ("mean", "max"):
        torch.testing.assert_close(stats[f"sampling/sampling_logp_difference/{kind}"], (old - sampled).abs()[kept])
    ratios = expected.flatten() if mode.startswith("sequence") else expected[kept]
    for kind in ("min", "mean", "max"):
        torch.testing.assert_close(stats[f"sampling/importance_sampling_ratio/{kind}"], ratios)
    if mode.endswith("mask") and bounds == (0.5, 1.5):
        assert (got == 0).any() and (got == 1).logical_not().any()  # the bounds were met: the test can fail


def test_the_correction_weighs_the_policy_term_and_not_the_kl():
    torch.manual_seed(1)
    logps = (-torch.rand(3, 5)).requires_grad_()
    old, ref = logps.detach() - 0.1, logps.detach() + 0.2
    advantages, mask = torch.tensor([1.0, -0.5, 0.3]), torch.ones(3, 5)
    weights = torch.tensor([[0.5], [2.0], [0.0]])
    loss, _ = grpo_loss(logps, old, advantages, mask, ref, beta=0.1, loss_type="bnpo", importance_weights=weights)
    ratio = torch.exp(logps - old)
    surrogate = torch.min(ratio * advantages[:, None], ratio.clamp(0.8, 1.2) * advantages[:, None])
    kl = torch.exp(ref - logps) - (ref - logps) - 1
    torch.testing.assert_close(loss, (-surrogate * weights + 0.1 * kl).mean())
    # weights of 1 change nothing, bit for bit
    plain = grpo_loss(logps, old, advantages, mask, ref, beta=0.1, loss_type="bnpo")[0]
    assert torch.equal(plain, grpo_loss(logps, old, advantages, mask, ref, beta=0.1, loss_type="bnpo",
                                        importance_weights=torch.ones(3, 1))[0])


def test_bfloat16_rollouts_train_log_and_follow_the_weights_through_a_resume(tiny_model, in_tmp, monkeypatch,
                                                                            capsys):
    config = str(tiny_config(in_tmp, tiny_model))
    options = ["--model.rollout_dtype", "bfloat16", "--model.rollout_importance_sampling_mode", "token_truncate"]
    cli = main(["fit", "--config", "cpu", "--config", config, *options, "--trainer.max_steps", "3",
                "--trainer.val_check_interval", "3"])
    assert "; rollouts from a bfloat16 copy of the policy (token_truncate correction)" in capsys.readouterr().out
    module = cli.model
    copy = module.forms.rollout_model
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module.policy.parameters()} == {torch.float32}
    logged = scalars(in_tmp / "lightning_logs/cpu/version_0")
    for name in ("sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
                 "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
                 "sampling/importance_sampling_ratio/max", "loss"):
        values = [v for _, v in logged[f"train/{name}"]]
        assert len(values) == 3 and all(math.isfinite(v) for v in values), (name, values)
    differences = [v for _, v in logged["train/sampling/sampling_logp_difference/mean"]]
    ratios = [v for _, v in logged["train/sampling/importance_sampling_ratio/mean"]]
    # bf16 rounds the logits, so the two distributions differ a little, never a lot (a random tiny model)
    assert all(0 < d < 0.5 for d in differences), differences
    assert all(abs(r - 1) < 0.2 for r in ratios), ratios
    # the copy holds the weights of the last step, rounded: refreshed before each rollout once a step changed them
    module.forms.refresh()
    trained = dict(module.policy.named_parameters())
    for name, weight in copy.named_parameters():
        assert torch.equal(weight, trained[name].to(torch.bfloat16)), name
    # a resumed run's first rollout decodes from the checkpoint's weights, not the base model's the copy loaded
    saved = {k.removeprefix("policy."): v for k, v in torch.load(
        in_tmp / "lightning_logs/cpu/checkpoints/last.ckpt", weights_only=True)["state_dict"].items()}
    seen = []
    rollout = Sampler.rollout

    def recording(self, *args, **kwargs):
        seen.append({n: w.clone() for n, w in self.rollout_model.named_parameters()})
        return rollout(self, *args, **kwargs)

    monkeypatch.setattr(Sampler, "rollout", recording)
    resumed = main(["fit", "--config", "cpu", "--config", config, *options, "--trainer.max_steps", "4",
                    "--trainer.val_check_interval", "4", "--ckpt_path", "last"]).model
    assert resumed.trainer.global_step == 4 and len(seen) == 1
    for name, weight in seen[0].items():
        assert torch.equal(weight, saved[name].to(torch.bfloat16)), name


def test_a_stale_copy_is_refreshed_only_after_a_step_changed_the_weights(tiny_model, in_tmp):
    from qmath.module import GRPO

    module = GRPO(str(tiny_model), rollout_dtype="bfloat16")
    module.configure_model()
    copy = module.forms.load_rollout_copy(torch.device("cpu"))
    assert module.forms.stale
    # the weights in 16 bits, the rotary frequencies in fp32 as the policy's (a cast would round them too)
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    assert {n: b.dtype for n, b in copy.named_buffers()} == {n: b.dtype for n, b in module.policy.named_buffers()}
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.01)
    module.forms.refresh()
    assert not module.forms.stale
    first = {n: w.clone() for n, w in copy.named_parameters()}
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.5)
    module.forms.refresh()  # not stale: no step changed the weights since (a skipped step marks nothing)
    assert all(torch.equal(first[n], w) for n, w in copy.named_parameters())
    module.forms.stale = True
    pointers = [w.data_ptr() for w in copy.parameters()]
    module.forms.refresh()
    assert not all(torch.equal(first[n], w) for n, w in copy.named_parameters())
    assert pointers == [w.data_ptr() for w in copy.parameters()]  # in place: captured CUDA graphs stay valid


def test_lora_folds_into_the_copy(tiny_model):
    from qmath.module import GRPO

    module = GRPO(str(tiny_model), rollout_dtype="bfloat16", lora_r=4, lora_alpha=8.0, lora_dropout=0.0)
    module.configure_model()
    module.forms.load_rollout_copy(torch.device("cpu"))
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at 0: give the adapters an update to fold
    module.forms.refresh()
    before = {n: w.clone() for n, w in module.forms.rollout_model.named_parameters()}
    module.forms.stale = True  # a step changed the adapters
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    module.forms.refresh()
    merged = module.policy.merge_and_unload(safe_merge=True)  # PEFT's own fold, for comparison (after ours)
    expected = dict(merged.named_parameters())
    folded = 0
    for name, weight in module.forms.rollout_model.named_parameters():
        torch.testing.assert_close(weight, expected[name].to(torch.bfloat16), rtol=0, atol=0)
        folded += not torch.equal(weight, before[name])
    assert folded > 0


def test_without_a_rollout_dtype_nothing_is_copied_or_corrected(tiny_model):
    from qmath.module import GRPO

    module = GRPO(str(tiny_model), rollout_dtype=None)
    module.configure_model()
    assert module.forms.load_rollout_copy(torch.device("cpu")) is None and module.sampler.rollout_model is None
    assert set(module.sampler.decoders) == {(False, "eager"), (False, "compiled"), (False, "graphs")}


def test_impossible_bounds_are_refused_naming_both_keys():
    from qmath.errors import ConfigError

    with pytest.raises(ConfigError, match=r"clip_min \(2.0\) must be below .*clip_max \(1.0\)"):
        main(["fit", "--config", "cpu", "--model.rollout_importance_sampling_clip_min", "2",
              "--model.rollout_importance_sampling_clip_max", "1"])


def test_lora_trains_through_the_copy_and_the_base_stays_untouched(tiny_model, in_tmp):
    from transformers import AutoModelForCausalLM

    cli = main(["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)), "--model.rollout_dtype",
                "bfloat16", "--model.lora_r", "4", "--model.lora_dropout", "0.0", "--trainer.max_steps", "2"])
    module = cli.model
    logged = scalars(in_tmp / "lightning_logs/cpu/version_0")
    assert all(math.isfinite(v) for _, v in logged["train/sampling/importance_sampling_ratio/mean"])
    # the copy holds base + the trained adapters (PEFT's fold), the policy's base weights are the hub's, bit for bit
    module.forms.refresh()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    unmerged = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
                for n, p in module.policy.named_parameters() if not p.requires_grad}
    assert all(torch.equal(unmerged[n], base[n]) for n in unmerged)
    folded = dict(module.policy.merge_and_unload(safe_merge=True).named_parameters())
    for name, weight in module.forms.rollout_model.named_parameters():
        assert torch.equal(weight, folded[name].to(torch.bfloat16)), name


def test_a_copy_decoded_by_transformers_generate_is_said_to_be_uncorrected(tiny_model, in_tmp):
    with pytest.warns(UserWarning, match="returns no sampling log-probs"):
        cli = main(["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)),
                    "--model.rollout_dtype", "bfloat16", "--model.generation_backend", "transformers",
                    "--trainer.max_steps", "1"])
    assert "uncorrected" in cli.model.sampler.describe(torch.device("cpu"))
    assert "train/sampling/importance_sampling_ratio/mean" not in scalars(in_tmp / "lightning_logs/cpu/version_0")


def test_a_dtype_without_native_kernels_falls_back_to_the_policy(tiny_model, monkeypatch, caplog):
    from qmath.module import GRPO

    monkeypatch.setattr("qmath.policy._emulated", lambda dtype, device: dtype == torch.float16)
    module = GRPO(str(tiny_model), rollout_dtype="float16")
    module.configure_model()
    assert module.forms.load_rollout_copy(torch.device("cpu")) is None
    assert "cpu has no native float16 matrix products" in caplog.text and "so rollouts read the policy" in caplog.text


def test_no_copy_that_is_no_narrower_than_the_policy(tiny_model):
    from qmath.module import GRPO

    module = GRPO(str(tiny_model), rollout_dtype="float16")
    module.configure_model()
    cpu = torch.device("cpu")
    assert module.forms.copy_dtype(cpu) == "float16"
    module.policy.to(torch.bfloat16)  # a bf16-true policy: an fp16 copy reads as many bytes, with coarser range
    assert module.forms.copy_dtype(cpu) is None
