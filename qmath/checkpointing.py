"""Checkpoints that survive ``kill -9`` and preemption.

Lightning's own "atomic" save writes through an fsspec transaction, which stages the file in the system temp
directory and moves it into place. When that directory is on another file system than the checkpoints (local
``/tmp``, checkpoints on NFS or Lustre, as on most clusters), the move is a copy into ``last.ckpt`` itself, and a
kill during the copy leaves a truncated ``last.ckpt`` that ``--ckpt_path last`` then fails to load.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside its target, fsyncs it, and renames it into place.

    A rename within one directory is atomic, so the target is always either the previous complete checkpoint or
    the new one. Temporary files left by a killed process are removed at the next save. Remote paths (``s3://``
    and the like) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # from a process killed mid-write
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self._write(checkpoint, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)

    def _write(self, checkpoint: dict[str, Any], tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())


def use_atomic_checkpoints(trainer: Any) -> None:
    """Swap the strategy's plain ``TorchCheckpointIO`` for :class:`AtomicCheckpointIO`; leave any other alone."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


class CheckpointOnSignal(Callback):
    """On SIGTERM or SIGUSR1, finish the current step, write ``last.ckpt`` and stop, so that ``--ckpt_path last``
    resumes from there.

    Lightning turns SIGTERM into a ``SIGTERMException`` at the next step boundary on every rank; this writes the
    checkpoint then, where the ``ModelCheckpoint`` keeps ``last.ckpt``. Only for signals: Lightning's
    ``OnExceptionCheckpoint`` writes on any exception, and a state saved after an arbitrary error (a NaN, a reward
    that raised) is not one to resume from. SIGUSR1 (what SLURM sends before a time limit with ``--signal``) is
    handled as SIGTERM, unless Lightning's SLURM auto-requeue has claimed it, which saves and requeues by itself.
    Added to every run by ``python -m qmath``.
    """

    def __init__(self) -> None:
        self._previous: Any = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            self._previous = signal.signal(signal.SIGUSR1, _as_sigterm)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(f"qmath: stopped by a signal after step {trainer.global_step}; saved {path}. "
                       "Resume with --ckpt_path last")


def last_checkpoint_path(trainer: Trainer) -> str:
    """Where ``--ckpt_path last`` looks: the ``ModelCheckpoint``'s ``last.ckpt``, else the default root dir's."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
    return os.path.join(trainer.default_root_dir, "last.ckpt")


def _as_sigterm(signum: int, frame: Any) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
