"""LoRA through PEFT on the tiny model: only adapters train, the reference is the base with its adapters off (no
copy loaded), checkpoints hold the adapters, and export folds them in or writes them as a PEFT directory."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from qmath.__main__ import main
from qmath.module import GRPO
from tests.test_fit import scalars, tiny_config
from tests.test_logps import grouped_rollout

LORA = ["--model.lora_r", "4", "--model.lora_alpha", "8", "--model.lora_dropout", "0.0"]


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("lora")
    import os

    cwd = os.getcwd()
    os.chdir(directory)
    try:
        cli = main(["fit", "--config", "cpu", "--config", str(tiny_config(directory, tiny_model)), *LORA])
    finally:
        os.chdir(cwd)
    return cli, directory


def test_only_the_adapters_train_and_no_reference_copy_is_loaded(trained, tiny_model, capsys):
    cli, directory = trained
    module = cli.model
    assert module.reference is None  # the KL reference is the policy with its adapters off
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    trainable = {n for n, p in module.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, p in module.policy.named_parameters():
        if not p.requires_grad:  # the frozen base weights are the base model's, untouched
            plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(p, base[plain]), name
    assert any(p.abs().sum() > 0 for n, p in module.policy.named_parameters() if "lora_B" in n)  # B starts at 0
    logged = scalars(directory / "lightning_logs" / "cpu" / "version_0")
    assert logged["train/kl"][1][1] > 0  # step 2's policy differs from the base: the adapters moved it
    checkpoint = torch.load(directory / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {f"policy.{n}" for n in trainable}  # the adapters, not the base
    assert len(checkpoint["optimizer_states"][0]["state"]) == len(trainable)


def test_the_reference_is_the_base_model(trained, tiny_model):
    module = trained[0].model
    base = GRPO(model_name_or_path=str(tiny_model), num_generations=4)
    base.configure_model()
    rollout = grouped_rollout(module.policy.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(module.reference_logps(rollout), base.token_logps(base.policy, rollout))
        # and the adapters are on again afterwards: the trained policy is not the base
        assert not torch.allclose(module.token_logps(module.policy, rollout), base.token_logps(base.policy, rollout))


def test_the_summary_says_what_trains_and_what_the_reference_saves(tiny_model, in_tmp, capsys, monkeypatch):
    # as under transformers < 5.15, for the summary (the loss's own check is imported elsewhere, and unchanged)
    monkeypatch.setattr("qmath.compat.checkpointing_can_keep_cache", lambda: False)
    main(["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)), *LORA,
          "--trainer.max_steps", "1", "--model.gradient_checkpointing", "true"])
    out = capsys.readouterr().out
    assert "trainable); LoRA r=4, alpha=8.0 on all-linear; the KL reference (beta 0.04) is the base with the " \
           "adapters off: no copy loaded" in out
    assert "qmath fit: qmath " in out and ", torch " in out  # the versions first
    assert "  warning      transformers " in out and "is older than 5.15" in out


def test_lora_under_checkpointing_shares_prompts_with_the_same_values(tiny_model):
    from unittest import mock

    module = GRPO(model_name_or_path=str(tiny_model), num_generations=4, gradient_checkpointing=True, lora_r=4,
                  lora_dropout=0.0)
    module.configure_model()
    # log-probs from hidden states in chunks, through PEFT's wrapper
    assert module.forms.linear_heads[id(module.policy)]
    for name, p in module.policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # adapters that change the output
    rollout = grouped_rollout(module.policy.config.vocab_size)
    values = []
    for share in (True, False):
        with mock.patch("qmath.logprobs.groups_share_prompts", lambda *a, share=share: share):
            values.append(module.token_logps(module.policy, rollout))
            (values[-1] * rollout.completion_mask).sum().backward()
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-5)


def test_export_folds_the_adapters_in_or_writes_them(trained, tiny_model, tmp_path):
    from peft import PeftModel

    cli, directory = trained
    last = directory / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt"
    main(["export", "--ckpt_path", str(last), "--out", str(tmp_path / "merged")])
    main(["export", "--ckpt_path", str(last), "--out", str(tmp_path / "adapter"), "--adapter"])
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    ids = torch.tensor([[5, 9, 13, 7]])
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": cli.model.tokenizer.pad_token_id}
    policy = cli.model.policy.eval()
    with torch.no_grad():
        expected = policy.generate(input_ids=ids, **kwargs)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(merged.generate(input_ids=ids, **kwargs), expected)
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "adapter")
        torch.testing.assert_close(adapted.eval().generate(input_ids=ids, **kwargs), expected)
        torch.testing.assert_close(merged(ids).logits, policy(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_a_lora_checkpoint_is_evaluated_with_its_own_lora_options(trained, tiny_model, in_tmp, capsys):
    directory = trained[1]
    ckpt = directory / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt"
    config = str(tiny_config(in_tmp, tiny_model))
    validate = ["validate", "--config", "cpu", "--config", config, "--ckpt_path", str(ckpt), "--data.num_val", "2"]

    def scaling(cli) -> float:  # what PEFT multiplies the adapters' update by: alpha / r
        layers = cli.model.policy.modules()
        return next(m.scaling["default"] for m in layers if isinstance(getattr(m, "scaling", None), dict))

    # the config leaves the LoRA options at their defaults (no LoRA): the checkpoint's r and alpha
    cli = main(validate)
    assert (cli.model.hparams.lora_r, cli.model.hparams.lora_alpha, scaling(cli)) == (4, 8.0, 2.0)
    assert "holds LoRA adapters (r=4, alpha=8.0 on all-linear); evaluating with those" in capsys.readouterr().out
    # the rank given, alpha left at its default: the checkpoint's alpha, not the adapters at another strength
    assert scaling(main([*validate, "--model.lora_r", "4"])) == 2.0
    # a value given that contradicts the checkpoint, even the default value: an error naming both
    for option, value, saved in (("lora_alpha", "16", "8.0"), ("lora_r", "0", "4"), ("lora_r", "8", "4")):
        with pytest.raises(ValueError, match=rf"other LoRA options than given: model\.{option} {value}\S* "
                                             rf"\(the checkpoint's: {saved}\)"):
            main([*validate, f"--model.{option}", value])
    # resuming `fit` with other LoRA options: the difference named, not "another base model"
    resumed = in_tmp / "lightning_logs" / "cpu" / "checkpoints"
    resumed.mkdir(parents=True)
    (resumed / "last.ckpt").write_bytes(ckpt.read_bytes())
    with pytest.raises(ValueError, match=r"other LoRA options: lora_alpha 8.0 \(now 16.0\).*--model.lora_alpha 8.0"):
        main(["fit", "--config", "cpu", "--config", config, "--model.lora_r", "4", "--model.lora_alpha", "16",
              "--trainer.max_steps", "3", "--ckpt_path", "last"])


def test_lora_options_are_checked(in_tmp):
    from qmath.errors import ConfigError

    with pytest.raises(ConfigError, match="model.lora_r must be at least 0"):
        GRPO(lora_r=-1)
    with pytest.raises(ConfigError, match=r"model.lora_dropout must be in \[0, 1\)"):
        GRPO(lora_dropout=1.0)


def test_compiled_decoding_through_adapters_answers_as_eager(qwen_like):
    """t4x2-lora.yaml decodes with the compiled backend on a GPU: the static cache and the compiled step must see
    the adapters (one compile on CPU, about 20 s)."""
    from qmath.generation import Sampler

    module = GRPO(model_name_or_path=str(qwen_like), max_completion_length=12, num_generations=4, lora_r=4,
                  lora_dropout=0.0)
    module.configure_model()
    for name, p in module.policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # adapters that change the answers
    encoded = module.tokenizer(["Tom has 3 boxes.", "A baker sells 24 muffins?"], return_tensors="pt", padding=True)
    ids, mask = encoded.input_ids.repeat_interleave(4, 0), encoded.attention_mask.repeat_interleave(4, 0)
    compiled = Sampler(module.policy, module.tokenizer, 12, temperature=0.8, backend="compiled")
    eager = module.sampler.generate(ids, mask, greedy=True, group=4)[0]
    assert torch.equal(compiled.generate(ids, mask, greedy=True, group=4)[0], eager)
    assert compiled.compile_error is None and compiled.graphs  # compiled through PEFT's layers, not a fallback
    with module.policy.disable_adapter():
        assert not torch.equal(module.sampler.generate(ids, mask, greedy=True, group=4)[0], eager)


def _adapted(model_path, **options):
    options = {"lora_dropout": 0.0} | options
    module = GRPO(model_name_or_path=str(model_path), num_generations=4, max_completion_length=10, temperature=1.0,
                  lora_r=4, **options)
    module.configure_model()
    for name, p in module.policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # adapters that change the output
    return module


def test_merged_generation_samples_the_trained_policy_and_restores_the_base_bit_for_bit(tiny_model):
    from qmath.compat import cache_argument
    from qmath.generation import Sampler

    module = _adapted(tiny_model)
    policy, merged = module.policy, module.sampler.merged
    base = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    ids = torch.tensor([[5, 9, 13, 7, 2, 11]] * 8)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        policy.eval()
        expected = policy(input_ids=ids).logits
        with merged():
            folded = policy(input_ids=ids).logits
            assert any(not torch.equal(base[n], p) for n, p in policy.named_parameters() if not p.requires_grad)
            fold = [p.clone() for p in policy.parameters() if not p.requires_grad]
        torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)  # the same function, one matmul a layer
        with torch.autocast("cpu", dtype=torch.bfloat16), merged():  # 16-mixed: the fold stays in fp32
            assert all(torch.equal(a, p) for a, p in zip(fold, (p for p in policy.parameters() if not p.requires_grad)))
        for name, p in policy.named_parameters():
            if not p.requires_grad:
                assert torch.equal(p, base[name]), name  # restored exactly, not by subtracting the update again
        torch.testing.assert_close(policy(input_ids=ids).logits, expected, rtol=0, atol=0)  # adapters on again
    unmerged = Sampler(policy, module.tokenizer, 10, temperature=1.0)
    for seed in range(3):  # seeded draws: the same completions as sampling through the unmerged adapters
        assert torch.equal(module.sampler.generate_seeded(ids, mask, seed, group=4)[0],
                           unmerged.generate_seeded(ids, mask, seed, group=4)[0])
    # the shared prefill hands generate its cache under the base model's name (PEFT's forward takes **kwargs)
    assert cache_argument(policy) == cache_argument(policy.get_base_model())
    with policy.disable_adapter():  # the caller asked for the base: nothing is folded in
        base_answers = module.sampler.generate(ids, mask, greedy=True)[0]
    plain = GRPO(model_name_or_path=str(tiny_model), num_generations=4, max_completion_length=10)
    plain.configure_model()
    assert torch.equal(base_answers, plain.sampler.generate(ids, mask, greedy=True)[0])


def test_merged_generation_is_an_option(tiny_model):
    from qmath.lora import MergedForGeneration

    assert isinstance(_adapted(tiny_model).sampler.merged, MergedForGeneration)
    assert not isinstance(_adapted(tiny_model, lora_merge_for_generation=False).sampler.merged, MergedForGeneration)


def test_rollouts_in_training_mode_prefill_the_prompts_without_adapter_dropout(tiny_model):
    """Rollouts run while the policy is in training mode; the shared prompt prefill must run in eval mode as
    generate does, or LoRA's dropout perturbs the prompts' KV cache (and sampling depends on whether it is shared)."""
    from unittest import mock

    import qmath.generation

    module = _adapted(tiny_model, lora_dropout=0.5, lora_merge_for_generation=False)
    r = grouped_rollout(module.policy.config.vocab_size)
    module.policy.train()
    completions = []
    for prefill in (qmath.generation.shared_prefill, lambda *args: {}):
        with mock.patch.object(qmath.generation, "shared_prefill", prefill):
            completions.append(module.sampler.generate(r.prompt_ids, r.prompt_mask, greedy=True, group=4)[0])
    assert torch.equal(*completions)
    assert module.policy.training  # and training mode is back
