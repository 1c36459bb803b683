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
    """On SIGTERM or SIGUSR1, finish the current optimizer step, write ``last.ckpt`` and stop on every rank, so that
    ``--ckpt_path last`` continues exactly.

    The signal handler only sets a flag. At the end of each optimizer step the ranks agree on it (one boolean
    all-reduce) and, if any rank was signalled, all save and stop together. This replaces Lightning's own SIGTERM
    handler during training, which runs a collective inside the signal handler: with the signal arriving on two
    ranks at different points of their step (Lightning forwards rank 0's SIGTERM to the ranks it launched), those
    collectives pair with the wrong partners and the job hangs (measured here: rank 1 died, rank 0 waited in a
    barrier). Lightning's ``OnExceptionCheckpoint`` is no substitute either: it saves after any exception (a NaN, a
    reward that raised), a state not to resume from. SIGUSR1 (what SLURM sends before a time limit with
    ``--signal``) is left to Lightning's SLURM auto-requeue when that has claimed it. Added to every run by
    ``python -m qmath``.
    """

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self.signalled = False

    def _flag(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.signalled = False
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            if signum == signal.SIGUSR1 and signal.getsignal(signum) not in (signal.SIG_DFL, None):
                continue  # Lightning's SLURM auto-requeue
            self._previous[signum] = signal.signal(signum, self._flag)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-way through an optimizer step's micro-batches
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        trainer.should_stop = True
        rank_zero_info(f"qmath: stopped by a signal after step {trainer.global_step}; saved {path}. "
                       "Resume with --ckpt_path last")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def last_checkpoint_path(trainer: Trainer) -> str:
    """Where ``--ckpt_path last`` looks: the ``ModelCheckpoint``'s ``last.ckpt``, else the default root dir's."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
    return os.path.join(trainer.default_root_dir, "last.ckpt")
