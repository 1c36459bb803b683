"""End-to-end `fit` through `main([...])` on a tiny random model made in the test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qmath.__main__ import main

REWARDS = ["xmlcount", "soft_format", "strict_format", "int", "correctness"]


def length_reward(completions, **_):
    """A reward a random model can move: longer completions score more."""
    return [len(c) / 100 for c in completions]


CALLBACKS = [
    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
     "init_args": {"dirpath": "lightning_logs/cpu/checkpoints", "save_last": True, "every_n_train_steps": 1,
                   "save_top_k": 0, "save_on_train_epoch_end": False}},
    {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
    {"class_path": "qmath.callbacks.LogCompletions", "init_args": {"every_n_steps": 1}},
]


def tiny_config(tmp: Path, model: Path) -> Path:
    """The shipped cpu.yaml's structure with the tiny model and a reward it can earn."""
    rewards = [{"class_path": "qmath.rewards.FunctionReward",
                "init_args": {"function": f"qmath.rewards.{n}_reward", "name": n}} for n in REWARDS]
    rewards.append({"class_path": "qmath.rewards.FunctionReward",
                    "init_args": {"function": "tests.test_fit.length_reward", "name": "length"}})
    config = {
        "model": {"model_name_or_path": str(model), "max_completion_length": 8, "rewards": rewards,
                  "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2, "weight_decay": 0.0}}},
        "data": {"num_train": 40, "num_val": 4, "max_prompt_length": 1024, "num_few_shot": 0},
        "trainer": {"max_steps": 2, "val_check_interval": 2, "enable_model_summary": False,
                    "enable_progress_bar": False, "callbacks": CALLBACKS},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_fit_trains_logs_and_checkpoints(tiny_model, in_tmp):
    from transformers import AutoModelForCausalLM

    cli = main(["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model))])
    assert cli.trainer.global_step == 2

    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = cli.model.policy.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, f"only {changed} changed"

    logged = scalars(in_tmp / "lightning_logs" / "cpu" / "version_0")
    for name in [f"rewards/{n}/mean" for n in [*REWARDS, "length"]] + [
        "reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
        "kl", "clip_ratio/region_mean", "loss", "lr-AdamW", "val/accuracy_strict", "val/format_rate",
    ]:
        assert name in logged, f"{name} missing from {sorted(logged)}"
    assert [step for step, _ in logged["reward"]] == [0, 1]
    # the logged total is the weighted sum of the components at each step
    total = [sum(dict(logged[f"rewards/{n}/mean"])[s] for n in [*REWARDS, "length"]) for s in (0, 1)]
    assert [v for _, v in logged["reward"]] == pytest.approx(total, rel=1e-5)

    events = EventAccumulator(str(in_tmp / "lightning_logs" / "cpu" / "version_0"), size_guidance={"tensors": 0})
    events.Reload()
    assert "completions/text_summary" in events.Tags()["tensors"]

    ckpt = torch.load(in_tmp / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all(k.startswith("policy.") for k in keys), [k for k in keys if not k.startswith("policy.")]
    assert ckpt["global_step"] == 2
    assert len(ckpt["optimizer_states"]) == 1


def test_resume_continues_from_last(tiny_model, in_tmp):
    config = str(tiny_config(in_tmp, tiny_model))
    four = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4"]
    straight = main(["fit", "--config", "cpu", "--config", config, *four, "--trainer.logger.init_args.name", "once"])
    main(["fit", "--config", "cpu", "--config", config])
    resumed = main(["fit", "--config", "cpu", "--config", config, *four, "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 4
    logged = scalars(in_tmp / "lightning_logs" / "cpu" / "version_1")
    assert [step for step, _ in logged["reward"]] == [2, 3]  # continues, does not restart at step 0
    # the data position came back: step 4 drew the same prompts as in the run that never stopped
    assert resumed.model.last_rollout["question"] == straight.model.last_rollout["question"]
    for a, b in zip(straight.model.policy.parameters(), resumed.model.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_beta_zero_loads_no_reference(tiny_model, in_tmp):
    cli = main(["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)),
                "--model.beta", "0", "--trainer.max_steps", "1"])
    assert cli.model.reference is None
    assert "kl" not in scalars(in_tmp / "lightning_logs" / "cpu" / "version_0")
