"""The LightningCLI behind ``python -m qmath``."""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path
from typing import Any

from lightning import Trainer
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from qmath.callbacks import LoggerStepIsGlobalStep, WritePredictions
from qmath.checkpointing import LORA_OPTIONS, read_checkpoint, same_option, use_atomic_checkpoints
from qmath.errors import ConfigError
from qmath.models import model_config
from qmath.optim import check_schedule

PACKAGE_CONFIGS = Path(__file__).parent / "configs"  # in an installed wheel
SOURCE_CONFIGS = Path(__file__).parents[1] / "configs"  # in a source checkout or editable install


def config_dirs() -> list[Path]:
    return [d for d in (PACKAGE_CONFIGS, SOURCE_CONFIGS) if d.is_dir()]


def resolve_config(value: str) -> str:
    """A config path as given, or a bare name (``t4x2``, ``t4x2.yaml``) looked up in the shipped ``configs/``."""
    if Path(value).exists() or "/" in value or "\\" in value:
        return value
    names = [value] if value.endswith((".yaml", ".yml")) else [f"{value}.yaml", value]
    for directory in config_dirs():
        for name in names:
            if (directory / name).is_file():
                return str(directory / name)
    shipped = sorted(p.name for d in config_dirs() for p in d.glob("*.yaml"))
    raise ConfigError(f"--config {value}: no such file, and no shipped config of that name. Shipped: {shipped}")


SUBCOMMANDS = ("fit", "validate", "test", "predict")
DEFAULT_CONFIG = "cpu.yaml"


def resolve_args(args: list[str]) -> list[str]:
    """Resolve each ``--config`` value; a subcommand given no ``--config`` runs the embedded default, ``cpu.yaml``."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    if out and out[0] in SUBCOMMANDS and not any(a == "--config" or a.startswith("--config=") for a in out):
        out[1:1] = ["--config", resolve_config(DEFAULT_CONFIG)]
    return out


def steps_between_validations(trainer: Trainer) -> None:
    """Make an integer ``trainer.val_check_interval`` count optimizer steps, as ``max_steps``,
    ``log_every_n_steps`` and ModelCheckpoint's ``every_n_train_steps`` do; Lightning counts training batches, which
    with ``accumulate_grad_batches`` are micro-batches (and a validation could fall between two of a step's)."""
    if isinstance(trainer.val_check_interval, int) and not getattr(trainer, "_qmath_val_in_steps", False):
        trainer.val_check_interval *= trainer.accumulate_grad_batches
        trainer._qmath_val_in_steps = True


def _did_you_mean(message: str, parser: Any) -> str:
    """The known option closest to each unknown one in jsonargparse's message, if one is close."""
    import difflib

    known = [o.lstrip("-") for action in parser._actions for o in action.option_strings if o.startswith("--")]
    unknown = re.findall(r"(?:unrecognized arguments:|accept option)\s+'?-*([\w.]+)", message)
    close = [m for name in unknown for m in difflib.get_close_matches(name, known, n=1, cutoff=0.8)]
    return f" (did you mean --{close[0]}?)" if close else ""


class NoGPUError(ConfigError, MisconfigurationException):
    """The config asks for a GPU that this machine does not have."""


class QMathCLI(LightningCLI):
    """LightningCLI with the tokenizer linked to the model, atomic checkpoints, and a prediction writer."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        # torch's AdamW default of 1e-3 wrecks a pretrained LM; default to the embedded run's settings instead.
        parser.set_defaults({"model.optimizer": {"class_path": "torch.optim.AdamW",
                                                 "init_args": {"lr": 1e-5, "betas": [0.9, 0.99], "weight_decay": 0.0}}})

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except MisconfigurationException as error:
            import torch

            if torch.cuda.is_available() or "gpu" not in str(error).lower():
                raise
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise NoGPUError(
                f"trainer.accelerator asks for a GPU, but this machine has none that torch can use (torch "
                f"{torch.__version__}, {build}). Run on the CPU with --trainer.accelerator cpu --trainer.devices 1 "
                "--trainer.strategy auto (as configs/cpu.yaml does), or install a CUDA build of torch on a machine "
                f"with an NVIDIA GPU. Lightning said: {error}"
            ) from error
        use_atomic_checkpoints(trainer)
        steps_between_validations(trainer)
        trainer.callbacks.insert(0, LoggerStepIsGlobalStep())  # before any callback that logs
        return trainer

    def before_fit(self) -> None:
        """Checks of the command as a whole, once the trainer is built and before any model loads."""
        self._check_resume()
        self._check_context()
        if self.config.get("subcommand") == "fit":
            check_schedule(self.model.optimizer, self.model.lr_scheduler, self.trainer.max_steps)

    before_validate = before_test = before_predict = before_fit

    def _check_context(self) -> None:
        """A prompt and its completion must fit the model's context (``max_position_embeddings``): past it the
        position embeddings run out or extrapolate, and the KV cache qmath allocates for the longest sequence grows
        with it. The model's config is read for this, never its weights."""
        model, data = self.model.hparams, getattr(self.datamodule, "hparams", {})
        config = model_config(model.model_name_or_path, model.trust_remote_code)
        limit = getattr(config, "max_position_embeddings", None)
        prompt = data.get("max_prompt_length", 0)
        if isinstance(limit, int) and prompt + model.max_completion_length > limit:
            raise ConfigError(f"data.max_prompt_length {prompt} + model.max_completion_length "
                              f"{model.max_completion_length} = {prompt + model.max_completion_length} tokens, beyond "
                              f"{model.model_name_or_path}'s context of {limit} (max_position_embeddings in its "
                              "config.json): lower either")

    def _check_resume(self) -> None:
        """``--ckpt_path last`` with no last checkpoint where the config saves them: Lightning warns (with a hint
        about ``save_last`` that does not apply) and trains from step 0, which after a long run reads as a resume.
        Refused instead, naming the folders looked in, as HF's Trainer does for ``resume_from_checkpoint``; leaving
        ``--ckpt_path`` out starts afresh. The lookup is Lightning's own for ``"last"`` (every ModelCheckpoint's
        ``last*.ckpt``, an OnExceptionCheckpoint's file; remote folders through fsspec), so that both agree."""
        subcommand = self.config.get("subcommand")
        if self.config[subcommand].get("ckpt_path") != "last":
            return
        savers = [c for c in self.trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
        if not any(c.dirpath for c in savers):  # a folder named after the logger's next version: Lightning decides
            return
        candidates = {c.ckpt_path for c in self.trainer.callbacks if isinstance(c, OnExceptionCheckpoint)}
        for saver in savers:  # (private: tests/test_private_apis.py checks it is still there)
            candidates |= saver._find_last_checkpoints(self.trainer)
        if not any(get_filesystem(path).exists(path) for path in candidates if path):
            folders = ", ".join(str(c.dirpath) for c in savers if c.dirpath)
            raise ConfigError(f"--ckpt_path last: no last checkpoint in {folders} (where this config saves them). "
                              "Put the earlier run's checkpoint folder there (on Kaggle: copy it from the earlier "
                              "version's output), give the file as --ckpt_path PATH, or leave --ckpt_path out to "
                              "start at step 0")

    # Private LightningCLI hooks overridden here: if Lightning renames one, this override would silently stop
    # running, so tests/test_private_apis.py checks that LightningCLI still has both.
    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":  # --predictions.path; the writer is added to the trainer's callbacks
            parser.add_lightning_class_args(WritePredictions, "predictions")
        # a checkpoint is data, not code: torch.load may only rebuild tensors and plain containers
        parser.set_defaults(weights_only=True)
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._given = [a for a in (sys.argv[1:] if args is None else args) if isinstance(a, str)]  # see below
        # A typo or a value of the wrong type is a user's mistake: said in one line, not after jsonargparse's usage
        # text (over 100 lines for `fit`), with where to find the options instead.
        subcommands = getattr(parser, "_subcommands_action", None)
        parsers = [parser, *(subcommands.choices.values() if subcommands else ())]
        for each in parsers:
            each.exit_on_error = False
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as error:
            command = next((a for a in self._given if a in self.subcommands()), "fit")
            message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
            message += _did_you_mean(message, (subcommands.choices.get(command) if subcommands else None) or parser)
            if "expected one argument" in message and any(re.fullmatch(r"-\.?\d.*", a) for a in self._given):
                message += " (a negative number needs '=': --model.optimizer.init_args.lr=-1e-5)"
            raise ConfigError(f"{message}. The options and their types: python -m qmath {command} --help") from None

    def _parse_ckpt_path(self) -> None:
        """From a checkpoint file, take only what its weights need: the base model, and with LoRA the adapters'
        options (``lora_r``, ``lora_alpha``, ``lora_target_modules``; ``lora_dropout`` too, unused outside fit).

        LightningCLI would apply every saved model hyperparameter over the config and the command line, so that
        ``validate --ckpt_path run.ckpt --model.max_completion_length 256`` would silently evaluate at the training
        length. The weights need the right architecture and vocabulary, which the base model names, and adapters
        evaluated at their trained scale: ``lora_alpha`` is no shape, so a wrong one loads cleanly and evaluates the
        adapters at another strength. A LoRA option set (on the command line, or in a config to another value than
        the default) that contradicts the checkpoint is an error naming both.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        # mapped, not read: only the hyperparameters are wanted, of a file that can be several GiB
        saved = read_checkpoint(ckpt_path, mmap=True).get("hyper_parameters", {})
        model = self.config[subcommand].model
        base, configured = saved.get("model_name_or_path"), model.model_name_or_path
        taken: dict[str, Any] = {}
        if base and base != configured:
            print(f"qmath: {ckpt_path} was trained from {base}; using it instead of {configured}", flush=True)
            taken["model_name_or_path"] = base
        if "lora_r" in saved:  # qmath's own checkpoints; a foreign one keeps the config's
            taken |= self._lora_options(ckpt_path, saved, model)
        if taken:
            self.config = self.parser.parse_object({subcommand: {"model": taken}}, self.config)

    def _lora_options(self, ckpt_path: str, saved: dict[str, Any], model: Any) -> dict[str, Any]:
        from qmath.module import GRPO

        defaults = {k: v.default for k, v in inspect.signature(GRPO.__init__).parameters.items()}
        taken, contradicting = {}, []
        # a checkpoint without adapters: only its rank (0) matters; a config's LoRA settings without a rank are inert
        keys = (*LORA_OPTIONS, "lora_dropout") if saved.get("lora_r") else ("lora_r",)
        for key in keys:
            if key not in saved or same_option(model.get(key), saved[key]):
                continue
            given = not same_option(model.get(key), defaults[key]) or any(
                a == f"--model.{key}" or a.startswith(f"--model.{key}=") for a in self._given)
            if given and key != "lora_dropout":  # dropout does not act outside fit
                contradicting.append(f"model.{key} {model.get(key)!r} (the checkpoint's: {saved[key]!r})")
            taken[key] = saved[key]
        if contradicting:
            raise ConfigError(f"{ckpt_path} was trained with other LoRA options than given: "
                              f"{', '.join(contradicting)}. Leave them out (the checkpoint's are used) or give the "
                              "checkpoint's")
        if saved.get("lora_r") and set(LORA_OPTIONS) & taken.keys():
            print(f"qmath: {ckpt_path} holds LoRA adapters (r={saved['lora_r']}, alpha={saved.get('lora_alpha')} on "
                  f"{saved.get('lora_target_modules')}); evaluating with those", flush=True)
        return taken

