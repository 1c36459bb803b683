"""End-to-end `fit` through `main([...])` on a tiny random model made in the test."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

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
        # the generator's default mix, not cpu.yaml's: the recorded runs (test_golden) drew their problems from it
        "data": {"num_train": 40, "num_val": 4, "max_prompt_length": 1024, "num_few_shot": 0,
                 "difficulty": [0.5, 0.4, 0.1]},
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


def test_fit_trains_logs_and_checkpoints(tiny_model, in_tmp, capsys):
    cli = main(["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model))])
    assert cli.trainer.global_step == 2
    summary = capsys.readouterr().out
    params = sum(p.numel() for p in cli.model.policy.parameters())
    for line in (f"  model        {tiny_model}", f"  parameters   {params:,} ({params:,} trainable); a frozen copy is "
                 "the KL reference (beta 0.04)", "  devices      1 x cpu", "precision 32-true",
                 "= 1 prompts, 8 completions per optimizer step", "synthetic: 40 training prompts, 4 held-out",
                 "  logs         lightning_logs/cpu/version_0 (tensorboard --logdir lightning_logs)",
                 "lightning_logs/cpu/checkpoints (last.ckpt every 1 steps"):
        assert line in summary, summary
    assert {"train/reward", "train/accuracy", "val/accuracy_strict"} <= set(cli.trainer.progress_bar_metrics)
    # stdout is not a terminal here, so a status line per logged step (log_every_n_steps: 1) and per validation
    status = [line for line in summary.splitlines() if line.startswith("qmath: step ")]
    assert [s.split(" | ")[0] for s in status] == ["qmath: step 1/2", "qmath: step 2/2"], summary
    assert all(" | reward " in s and " | accuracy " in s and " s/step" in s for s in status)
    assert " | ETA 0:" in status[0] and "ETA" not in status[1]  # the time left, until there is none
    assert "qmath: validation at step 2 | accuracy_lenient " in summary

    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = cli.model.policy.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, f"only {changed} changed"
    reference = cli.model.reference.state_dict()  # the frozen base weights, untouched by training
    assert all(torch.equal(before[k], reference[k]) for k in before)

    logged = scalars(in_tmp / "lightning_logs" / "cpu" / "version_0")
    for name in [f"train/rewards/{n}/mean" for n in [*REWARDS, "length"]] + [
        "train/reward", "train/reward_std", "train/frac_reward_zero_std", "train/completions/mean_length",
        "train/completions/clipped_ratio", "train/kl", "train/clip_ratio/region_mean", "train/loss", "lr-AdamW",
        "val/accuracy_strict", "val/format_rate",
    ]:
        assert name in logged, f"{name} missing from {sorted(logged)}"
    assert [step for step, _ in logged["train/reward"]] == [0, 1]
    # the logged total is the weighted sum of the components at each step
    total = [sum(dict(logged[f"train/rewards/{n}/mean"])[s] for n in [*REWARDS, "length"]) for s in (0, 1)]
    assert [v for _, v in logged["train/reward"]] == pytest.approx(total, rel=1e-5)

    events = EventAccumulator(str(in_tmp / "lightning_logs" / "cpu" / "version_0"), size_guidance={"tensors": 0})
    events.Reload()
    table = events.Tensors("completions/text_summary")[0].tensor_proto.string_val[0].decode()
    assert table.startswith("| prompt | completion | xmlcount | soft_format | strict_format | int | correctness | "
                            "length | reward | advantage |")
    assert len(table.splitlines()) == 2 + 4  # header, rule, and num_samples rows
    check_hparams_and_layout(events, [*REWARDS, "length"], logged)

    ckpt = torch.load(in_tmp / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all(k.startswith("policy.") for k in keys), [k for k in keys if not k.startswith("policy.")]
    assert ckpt["global_step"] == 2
    assert len(ckpt["optimizer_states"]) == 1


def check_hparams_and_layout(events: EventAccumulator, rewards: list[str], logged: dict) -> None:
    """The HParams entry lists the run's own scalars as metrics (so it shows their final values), and the
    custom-scalars layout has one chart with every reward component."""
    from tensorboard.plugins.custom_scalar.layout_pb2 import Layout
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    experiment = HParamsPluginData.FromString(events.SummaryMetadata("_hparams_/experiment").plugin_data.content)
    metrics = [m.name.tag for m in experiment.experiment.metric_infos]
    assert {"train/reward", "train/accuracy", "val/accuracy_strict", "val/accuracy_lenient", "val/format_rate",
            "train/rewards/correctness/mean"} <= set(metrics)
    assert all(m in logged for m in metrics), [m for m in metrics if m not in logged]  # each has a final value
    session = HParamsPluginData.FromString(events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content)
    assert session.session_start_info.hparams["num_generations"].number_value == 8
    assert session.session_start_info.hparams["max_prompt_length"].number_value == 1024  # the data's too
    assert hparams_entries(Path(events.path)) == 1  # and no second entry with Lightning's `hp_metric`
    layout = Layout.FromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for category in layout.category for c in category.chart}
    rewards_chart = next(tags for title, tags in charts.items() if title.startswith("rewards"))
    assert rewards_chart == [f"^train/rewards/{n}/mean$" for n in rewards] + ["^train/reward$"]
    for title, tags in charts.items():  # every pattern draws a logged scalar: the layout follows the names
        for tag in tags:
            assert any(re.search(tag, name) for name in logged), (title, tag)
    # training scalars under train/, held-out ones under val/ (HF's Trainer's sections), none at the top level
    # (and Lightning's own: LearningRateMonitor's lr-AdamW, the epoch)
    assert all(name.startswith(("train/", "val/", "test/", "lr-")) or name == "epoch" for name in logged), logged


def hparams_entries(log_dir: Path) -> int:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return sum(value.tag == "_hparams_/session_start_info" for file in log_dir.glob("events.*")
               for event in EventFileLoader(str(file)).Load() for value in event.summary.value)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_continues_from_last(tiny_model, in_tmp, lora):
    """2 steps, then `--ckpt_path last` to 4, against 4 in one go. The checkpoint is the one written at the end of
    fit, after the last step's validation, as the shipped configs write it when max_steps is not a multiple of their
    interval (a signal's mid-run save is tests/test_resume.py's): the same weights, the same prompts, and each value
    logged at the step it belongs to, a callback's too."""
    path = tiny_config(in_tmp, tiny_model)
    settings = yaml.safe_load(path.read_text())
    settings["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 100  # the only save: the end of fit's
    path.write_text(yaml.safe_dump(settings))
    config = str(path)
    # validations at steps 2 and 4 in both: the stopped run's validation at 2 precedes its save, as the uninterrupted
    # run's precedes its step 3 (with LoRA dropout on, the generators after it are what step 3 draws from)
    four = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
            *(["--model.lora_r", "4", "--model.lora_alpha", "8"] if lora else [])]
    straight = main(["fit", "--config", "cpu", "--config", config, *four, "--trainer.logger.init_args.name", "once"])
    main(["fit", "--config", "cpu", "--config", config, "--trainer.max_steps", "2", *four[2:]])
    resumed = main(["fit", "--config", "cpu", "--config", config, *four, "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 4
    logged = scalars(in_tmp / "lightning_logs" / "cpu" / "version_1")
    assert [step for step, _ in logged["train/reward"]] == [2, 3]  # continues, does not restart at step 0
    assert [step for step, _ in logged[min(k for k in logged if k.startswith("lr-AdamW"))]] == [2, 3]
    once = scalars(in_tmp / "lightning_logs" / "once" / "version_0")["train/reward"]
    assert logged["train/reward"] == pytest.approx(once[2:], rel=1e-5)
    # the data position came back: step 4 drew the same prompts as in the run that never stopped
    assert resumed.model.last_rollout["question"] == straight.model.last_rollout["question"]
    for a, b in zip(straight.model.policy.parameters(), resumed.model.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_validate_loads_no_reference(tiny_model, in_tmp):
    cli = main(["validate", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model))])
    assert cli.model.reference is None
    assert len(cli.model.val_records) == 4 and {"correct", "correct_lenient", "format"} <= set(
        vars(cli.model.val_records[0]))


def test_beta_zero_loads_no_reference(tiny_model, in_tmp):
    cli = main(["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)),
                "--model.beta", "0", "--trainer.max_steps", "1"])
    assert cli.model.reference is None
    assert "train/kl" not in scalars(in_tmp / "lightning_logs" / "cpu" / "version_0")


@pytest.mark.parametrize("num_iterations", [1, 2])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_fit_each_loss_type_and_iterations(tiny_model, in_tmp, monkeypatch, loss_type, num_iterations):
    from qmath.module import GRPO

    calls = {"prepare": 0, "policy": 0, "reference": 0}
    prepare, token_logps = GRPO.prepare, GRPO.token_logps

    def counting_prepare(self, batch):
        calls["prepare"] += 1
        return prepare(self, batch)

    def counting_logps(self, model, rollout, *args, **kwargs):
        calls["policy" if model is self.policy else "reference"] += 1
        return token_logps(self, model, rollout, *args, **kwargs)

    monkeypatch.setattr(GRPO, "prepare", counting_prepare)
    monkeypatch.setattr(GRPO, "token_logps", counting_logps)
    cli = main(["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)),
                "--model.loss_type", loss_type, "--model.num_iterations", str(num_iterations),
                "--model.epsilon_high", "0.28", "--trainer.max_steps", "4", "--trainer.val_check_interval", "4"])
    assert cli.trainer.global_step == 4
    # one rollout per μ steps; one policy forward per step (π_old comes free); one reference forward per rollout
    assert calls == {"prepare": 4 // num_iterations, "policy": 4, "reference": 4 // num_iterations}
    logged = scalars(in_tmp / "lightning_logs" / "cpu" / "version_0")
    assert [s for s, _ in logged["train/loss"]] == [0, 1, 2, 3]
    assert all(math.isfinite(v) for _, v in logged["train/loss"])
    rewards = [v for _, v in logged["train/reward"]]
    assert len(rewards) == 4
    if num_iterations == 2:  # each rollout's rewards are logged at both steps that train on it
        assert rewards[0] == rewards[1] and rewards[2] == rewards[3]
    clipped = [v for _, v in logged["train/clip_ratio/region_mean"]]
    if num_iterations == 1:
        assert clipped == [0.0] * 4  # ρ = 1: the clip never binds
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert any(not torch.equal(before[k], v) for k, v in cli.model.policy.state_dict().items())


def test_reused_rollout_moves_the_ratio_and_clips(tiny_model, in_tmp):
    # lr 1e-2 moves the tiny model far in one step, so the second pass over the rollout sees ρ ≠ 1 and clips
    main(["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)), "--model.num_iterations", "2"])
    clipped = dict(scalars(in_tmp / "lightning_logs" / "cpu" / "version_0")["train/clip_ratio/region_mean"])
    assert clipped[0] == 0.0 and clipped[1] > 0.0


def test_resume_between_reuses_of_a_rollout(tiny_model, in_tmp):
    config = str(tiny_config(in_tmp, tiny_model))
    mu = ["--model.num_iterations", "2", "--trainer.val_check_interval", "3"]
    straight = main(["fit", "--config", "cpu", "--config", config, *mu, "--trainer.max_steps", "3",
                     "--trainer.logger.init_args.name", "once"])
    main(["fit", "--config", "cpu", "--config", config, *mu, "--trainer.max_steps", "1"])  # stops mid-rollout
    ckpt = torch.load(in_tmp / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt", weights_only=True)
    rollouts = ckpt["qmath_rollouts"]  # one rank's, one micro-batch, its π_old kept
    assert [len(r["micro_batches"]) for r in rollouts] == [1]
    assert rollouts[0]["micro_batches"][0]["old_logps"] is not None
    resumed = main(["fit", "--config", "cpu", "--config", config, *mu, "--trainer.max_steps", "3",
                    "--ckpt_path", "last"])
    assert resumed.model.last_rollout["question"] == straight.model.last_rollout["question"]
    for a, b in zip(straight.model.policy.parameters(), resumed.model.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_accumulation_samples_the_whole_step_at_once(tiny_model, in_tmp):
    cli = main(["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)),
                "--trainer.accumulate_grad_batches", "2", "--data.batch_size", "2", "--model.loss_type", "dapo",
                "--model.num_generations", "4", "--trainer.max_steps", "2"])
    assert cli.trainer.global_step == 2
    # one rollout of 2 micro-batches x 2 prompts x 4 generations per optimizer step, split in two
    assert len(cli.model.last_rollout["completion"]) == 16
    assert [len(m.texts) for m in cli.model.micro_batches] == [8, 8]
    tokens = sum(int(m.loss_mask.sum()) for m in cli.model.micro_batches)
    assert cli.model.micro_batches[0].num_items.item() == pytest.approx(tokens / 2)


def group_reward(completions, question, **_):
    """Informative only for questions of even length: the other groups all score 0."""
    return [float(len(c) % 3) if len(q) % 2 == 0 else 0.0 for c, q in zip(completions, question)]


def test_dynamic_sampling_drops_and_refills(tiny_model, in_tmp):
    reward = {"class_path": "qmath.rewards.FunctionReward",
              "init_args": {"function": "tests.test_fit.group_reward", "name": "group"}}
    overrides = in_tmp / "dynamic.yaml"
    overrides.write_text(yaml.safe_dump({"model": {"rewards": [reward]}}))
    main(["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)), "--config", str(overrides),
          "--model.dynamic_sampling", "true", "--model.max_sampling_rounds", "8", "--data.batch_size", "2",
          "--model.num_generations", "4", "--trainer.max_steps", "4", "--trainer.val_check_interval", "4"])
    logged = {k: [v for _, v in vs] for k, vs in scalars(in_tmp / "lightning_logs" / "cpu" / "version_0").items()}
    assert sum(logged["train/dynamic_sampling/dropped_groups"]) > 0
    assert sum(logged["train/dynamic_sampling/drawn_prompts"]) > 0
    assert logged["train/frac_reward_zero_std"] == [0.0] * 4  # every trained group carries a gradient


def test_mask_truncated_completions_zeroes_their_loss(tiny_model, in_tmp):
    # the random tiny model rarely emits EOS within 8 tokens: every completion is truncated, so nothing trains
    cli = main(["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)),
                "--model.mask_truncated_completions", "true", "--model.beta", "0", "--trainer.max_steps", "1"])
    micro = cli.model.micro_batches[0]
    assert not micro.terminated.any()
    assert micro.loss_mask.sum() == 0
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert all(torch.equal(before[k], v) for k, v in cli.model.policy.state_dict().items())


def test_generation_kwargs_reach_the_rollouts(tiny_model, in_tmp):
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(tiny_model).eos_token_id
    args = ["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)), "--trainer.max_steps", "1",
            "--model.max_completion_length", "6"]
    with warnings.catch_warnings(record=True) as caught:  # (pytest.warns would re-emit the unrelated ones)
        warnings.simplefilter("always")
        main([*args, "--model.generation_kwargs", f"{{sequence_bias: [[[{eos}], 100.0]]}}"])  # ends every answer
        main([*args, "--model.generation_kwargs", "{min_new_tokens: 6}"])  # ...or makes it write 6 tokens
    said = [str(w.message) for w in caught if "change the distribution rollouts are sampled from" in str(w.message)]
    assert [s.split("]")[0] for s in said] == ["model.generation_kwargs ['sequence_bias'",
                                                "model.generation_kwargs ['min_new_tokens'"]
    short, forced = (scalars(in_tmp / "lightning_logs" / "cpu" / f"version_{v}") for v in (0, 1))
    assert short["train/completions/max_length"] == [(0, 1.0)]
    assert forced["train/completions/min_length"] == [(0, 6.0)]
    assert forced["train/completions/clipped_ratio"] == [(0, 1.0)]


def test_weight_decay_spares_biases_and_norms_as_hf_trainer_does(qwen_like):
    from functools import partial

    from qmath.module import GRPO

    module = GRPO(model_name_or_path=str(qwen_like), optimizer=partial(torch.optim.AdamW, lr=1e-5, weight_decay=0.1))
    module.configure_model()
    decay, spared = module.configure_optimizers().param_groups
    names = {id(p): n for n, p in module.named_parameters()}
    assert (decay["weight_decay"], spared["weight_decay"]) == (0.1, 0.0)
    spared_names = {names[id(p)] for p in spared["params"]}
    layers = module.policy.config.num_hidden_layers
    # Qwen2's q/k/v biases and every RMSNorm scale (two per layer and the final one), nothing else
    assert len(spared_names) == layers * 5 + 1
    assert all(n.endswith((".q_proj.bias", ".k_proj.bias", ".v_proj.bias", "layernorm.weight")) or
               n == "policy.model.norm.weight" for n in spared_names), spared_names
    assert all(p.ndim == 2 for p in decay["params"])  # the matrices and the embedding
    from transformers import Trainer  # its own rule (the method does not use `self`), which qmath's repeats

    trainers = {f"policy.{n}" for n in Trainer.get_decay_parameter_names(None, module.policy)}
    assert {names[id(p)] for p in decay["params"]} == trainers & set(names.values())  # (less the tied lm_head)
    module.optimizer = partial(torch.optim.AdamW, lr=1e-5, weight_decay=0.0)
    assert len(module.configure_optimizers().param_groups) == 1  # without decay, one group (one lr-AdamW)


def test_val_check_interval_counts_optimizer_steps_whatever_the_accumulation(tiny_model, in_tmp):
    main(["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)), "--trainer.max_steps", "4",
          "--trainer.accumulate_grad_batches", "2", "--trainer.val_check_interval", "2", "--data.batch_size", "1",
          "--model.num_generations", "2"])
    logged = scalars(in_tmp / "lightning_logs" / "cpu" / "version_0")
    # after optimizer steps 2 and 4 (logged, as the training scalars, at the 0-based index of the step before),
    # not after every second micro-batch, that is every step
    assert [step for step, _ in logged["val/format_rate"]] == [1, 3]


def test_a_checkpoint_with_one_parameter_group_resumes_into_the_two(qwen_like):
    """Checkpoints written before weight decay spared biases and norms hold one group; resuming splits it, each
    parameter keeping its own Adam moments (by position they would land on other parameters)."""
    from functools import partial

    from qmath.checkpointing import two_decay_groups
    from qmath.module import GRPO

    module = GRPO(model_name_or_path=str(qwen_like), optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1))
    module.configure_model()
    trainable = module._trainable()
    old = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.1)  # as configure_optimizers built it before
    old_schedule = torch.optim.lr_scheduler.StepLR(old, step_size=1, gamma=0.5)
    torch.manual_seed(0)
    for p in trainable:
        p.grad = torch.randn_like(p)
    old.step()
    old_schedule.step()
    checkpoint = {"optimizer_states": [old.state_dict()], "lr_schedulers": [old_schedule.state_dict()]}
    new = module.configure_optimizers()
    with pytest.raises(ValueError, match="different number of parameter groups"):
        new.load_state_dict(checkpoint["optimizer_states"][0])
    converted = two_decay_groups(checkpoint, trainable, module.parameter_groups())
    new.load_state_dict(converted["optimizer_states"][0])
    assert [g["weight_decay"] for g in new.param_groups] == [0.1, 0.0]
    assert [g["lr"] for g in new.param_groups] == [5e-4, 5e-4]  # where the old schedule had got to
    for p in trainable:
        assert torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"])
        assert torch.equal(new.state[p]["exp_avg_sq"], old.state[p]["exp_avg_sq"])
    schedule = torch.optim.lr_scheduler.StepLR(new, step_size=1, gamma=0.5)
    schedule.load_state_dict(converted["lr_schedulers"][0])
    new.step()
    schedule.step()
    assert [g["lr"] for g in new.param_groups] == [2.5e-4, 2.5e-4]  # both groups on the one schedule
    assert two_decay_groups({"optimizer_states": [new.state_dict()]}, trainable, module.parameter_groups()) == {}
