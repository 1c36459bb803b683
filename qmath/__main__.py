"""``python -m qmath {fit,validate,test,predict} --config t4x2.yaml``: GRPO on GSM8K through LightningCLI.

``python -m qmath export`` writes a checkpoint's policy as a Hugging Face model directory; ``python -m qmath --version``
prints qmath's, torch's and transformers' versions.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import ArgsType

from qmath import export
from qmath.callbacks import EndAllRanksOnException, RunSummary, StatusLines, TensorBoardLayout
from qmath.checkpointing import CheckpointOnSignal
from qmath.cli import QMathCLI, resolve_args
from qmath.data import GSM8K
from qmath.errors import reported
from qmath.module import GRPO
from qmath.shutdown import exit_without_teardown
from qmath.versions import versions


def main(args: ArgsType = None) -> QMathCLI | Path | None:
    """Build and run the CLI; ``args`` as on the command line (``None``: ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] in (["--version"], ["-V"]):
        print(versions())
        return None
    if argv[:1] == ["export"]:  # not a Trainer method, so not a LightningCLI subcommand
        return export.main(argv[1:])
    if args is None:  # keep sys.argv as the one source, as LightningCLI expects
        sys.argv[1:] = resolve_args(sys.argv[1:])
    else:
        args = resolve_args(list(args))
    return QMathCLI(
        GRPO,
        GSM8K,
        args=args,
        seed_everything_default=0,
        trainer_defaults={"precision": "32-true", "log_every_n_steps": 1,
                          "callbacks": [CheckpointOnSignal(), EndAllRanksOnException(), RunSummary(),
                                        TensorBoardLayout(), StatusLines()]},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def cli(args: ArgsType = None) -> None:
    """:func:`main`, with a user's mistake said in one line (``qmath: error: …``, exit status 2)."""
    with reported():
        main(args)


def run() -> None:
    """The ``qmath`` command and ``python -m qmath``: :func:`cli`, then the process ends without the interpreter's
    teardown (:mod:`qmath.shutdown`)."""
    cli()
    exit_without_teardown(0)


if __name__ == "__main__":
    run()
