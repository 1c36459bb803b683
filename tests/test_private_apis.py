"""The private APIs of Lightning, torch and transformers that qmath relies on are still there.

Each is used for a reason given where it is used. If one moves in a new release, qmath would fail at run time or,
for an overridden hook, silently stop doing what it should; this test fails first, naming it.
"""

from __future__ import annotations

import importlib

import pytest

FUNCTIONS = [
    ("lightning.fabric.utilities.logger", "_convert_params"),
    ("lightning.fabric.utilities.logger", "_flatten_dict"),
    ("lightning.fabric.utilities.seed", "_collect_rng_states"),
    ("lightning.fabric.utilities.seed", "_set_rng_states"),
    ("lightning.pytorch.strategies.launchers.subprocess_script", "_SubprocessScriptLauncher"),
    ("lightning.pytorch.trainer.connectors.signal_connector", "_get_sigkill_signal"),
    ("torch", "_foreach_norm"),
]


@pytest.mark.parametrize(("module", "name"), FUNCTIONS, ids=[n for _, n in FUNCTIONS])
def test_private_functions_exist(module, name):
    assert hasattr(importlib.import_module(module), name), f"{module}.{name} is gone: see where qmath uses it"


def test_torchs_cpu_half_precision_probes_exist():
    import torch

    # qmath.policy._emulated: whether a rollout copy's dtype has native kernels on this CPU
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        assert isinstance(getattr(torch.cpu, name)(), bool), f"torch.cpu.{name} is gone"


def test_private_hooks_qmath_overrides_still_exist_in_lightning():
    from lightning.pytorch.cli import LightningCLI

    from qmath.cli import QMathCLI

    for hook in ("_prepare_subcommand_parser", "_parse_ckpt_path"):  # else QMathCLI's override never runs
        assert callable(getattr(LightningCLI, hook, None)), f"LightningCLI.{hook} is gone; QMathCLI overrides it"
        assert getattr(QMathCLI, hook) is not getattr(LightningCLI, hook)


def test_private_attributes_exist(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    from transformers import CompileConfig

    assert hasattr(ModelCheckpoint(every_n_train_steps=5), "_every_n_train_steps")
    # QMathCLI's check of `--ckpt_path last` looks where Lightning's own lookup does
    assert callable(getattr(ModelCheckpoint, "_find_last_checkpoints", None))
    # CheckpointOnSignal tells ModelCheckpoint it has saved this step's last.ckpt (no second 5.5 GiB save)
    for attribute in ("_last_global_step_saved", "_last_checkpoint_saved", "last_model_path"):
        assert hasattr(ModelCheckpoint(save_last=True), attribute), attribute
    # from_every_rank recognises Lightning's SLURM requeue handler (a save inside a signal handler) by its name
    from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

    from qmath.checkpointing import REQUEUE_HANDLER

    assert callable(getattr(_SignalConnector, REQUEUE_HANDLER, None))
    assert callable(getattr(TensorBoardLogger, "_sanitize_params", None))
    # qmath.callbacks.LoggerStepIsGlobalStep sets the logger's step from global_step (a resume from a last.ckpt
    # written at the end of fit would log one step ahead); without the attribute that correction silently does nothing
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    assert "_batches_that_stepped" in _TrainingEpochLoop.__init__.__code__.co_names
    logger = TensorBoardLogger(tmp_path)
    assert hasattr(logger, "_default_hp_metric")
    assert callable(getattr(logger.experiment, "_get_file_writer", None))
    assert hasattr(CompileConfig(), "_compile_all_devices")
    # prompt sharing under activation checkpointing (qmath.compat.cache_kept_under_checkpointing); without it the
    # loss falls back to the plain path, correct but slower, so this says so
    from transformers.modeling_layers import GradientCheckpointingLayer

    assert hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")
