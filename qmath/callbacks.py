"""Callbacks: what the policy writes, and ending a distributed job when one rank fails."""

from __future__ import annotations

from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.trainer.connectors.signal_connector import _get_sigkill_signal
from lightning.pytorch.utilities.exceptions import SIGTERMException


class LogCompletions(Callback):
    """Every ``every_n_steps`` optimizer steps, log a table of sampled completions as TensorBoard text.

    Args:
        every_n_steps: how often to log, in optimizer steps.
        num_samples: how many completions of the latest rollout to show.
    """

    def __init__(self, every_n_steps: int = 10, num_samples: int = 4) -> None:
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        rollout = getattr(pl_module, "last_rollout", None)
        if not rollout or not trainer.is_global_zero or (step - 1) % self.every_n_steps:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("completions", self.table(rollout), global_step=step)

    def table(self, rollout: dict[str, list]) -> str:
        """A markdown table: question, completion, then one column per reward and the advantage."""
        columns = [c for c in rollout if c not in ("question", "completion")]
        header = "| question | completion | " + " | ".join(columns) + " |"
        lines = [header, "|" + " --- |" * (len(columns) + 2)]
        for i in range(min(self.num_samples, len(rollout["completion"]))):
            question = rollout["question"][i] if rollout.get("question") else ""
            cells = [_cell(question), _cell(rollout["completion"][i])]
            cells += [f"{rollout[c][i]:.3f}" for c in columns]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


class EndAllRanksOnException(Callback):
    """When the process that launched the other ranks fails, kill them instead of leaving them to wait for it.

    Lightning already ends the job when a launched rank dies (its process observer), but not when the launching
    rank (rank 0) raises: the others then wait in a collective for a peer that is gone, which on NCCL lasts until
    the process-group timeout (30 minutes). Jobs started by torchrun or SLURM are ended by those launchers instead.
    Added to every run by ``python -m qmath``.
    """

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):  # Lightning raises it on every rank at the same step: none waits
            return
        launcher = trainer.strategy.launcher
        if isinstance(launcher, _SubprocessScriptLauncher) and launcher.procs:
            launcher.kill(_get_sigkill_signal())
