"""Checkpoints written in the background (``BackgroundCheckpointIO``): the caller waits only for a copy, the file on
disk is always a whole checkpoint (the previous one until the rename), a failed write is raised, never lost."""

from __future__ import annotations

import io
import threading

import pytest
import torch

from qmath.checkpointing import AtomicCheckpointIO, BackgroundCheckpointIO
from qmath.errors import CheckpointError


class FullDisk(io.RawIOBase):
    """A file that takes 1,000 bytes, then fails as a full disk does."""

    def __init__(self) -> None:
        self.written = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.written += len(data)
        if self.written > 1000:
            raise OSError(28, "No space left on device")
        return len(data)


class GatedIO(AtomicCheckpointIO):
    """Writes only once the test opens the gate; with ``fail``, into a disk that fills up mid-file."""

    def __init__(self, fail: bool = False) -> None:
        self.gate, self.started, self.fail = threading.Event(), threading.Event(), fail

    def _write(self, checkpoint, tmp) -> None:
        self.started.set()
        assert self.gate.wait(60)
        if self.fail:
            torch.save(checkpoint, FullDisk())  # raises as a full disk makes torch.save raise
        super()._write(checkpoint, tmp)


def state(value: float) -> dict:
    embedding = torch.full((4, 3), value)
    return {"state_dict": {"embed.weight": embedding, "lm_head.weight": embedding, "row": embedding[1]},
            "global_step": int(value)}


def test_a_save_returns_before_the_write_and_the_file_is_the_previous_one_until_the_rename(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(state(1.0), path)
    io = BackgroundCheckpointIO(GatedIO())
    checkpoint = state(2.0)
    io.save_checkpoint(checkpoint, path)  # returns while the write is held at the gate
    assert io.checkpoint_io.started.wait(60)
    checkpoint["state_dict"]["embed.weight"].fill_(3.0)  # training goes on, in place
    assert torch.load(path, weights_only=True)["global_step"] == 1  # the previous checkpoint, whole
    io.checkpoint_io.gate.set()
    io.teardown()  # the end of the run waits for the write
    saved = torch.load(path, weights_only=True)
    assert saved["global_step"] == 2 and saved["state_dict"]["embed.weight"].eq(2.0).all()  # as it was at the save
    tied = saved["state_dict"]["embed.weight"], saved["state_dict"]["lm_head.weight"], saved["state_dict"]["row"]
    assert len({t.untyped_storage().data_ptr() for t in tied}) == 1  # shared storage written once, as torch.save does
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_load_or_the_next_save_waits_for_the_write_in_flight(tmp_path):
    io = BackgroundCheckpointIO(GatedIO())
    io.save_checkpoint(state(1.0), tmp_path / "a.ckpt")
    assert io.checkpoint_io.started.wait(60)
    threading.Timer(0.5, io.checkpoint_io.gate.set).start()
    assert io.load_checkpoint(tmp_path / "a.ckpt")["global_step"] == 1
    io.save_checkpoint(state(2.0), tmp_path / "b.ckpt")
    io.teardown()
    assert torch.load(tmp_path / "b.ckpt", weights_only=True)["global_step"] == 2


def test_a_failed_write_is_raised_at_the_next_save_and_the_previous_checkpoint_stays(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(state(1.0), path)
    io = BackgroundCheckpointIO(GatedIO(fail=True))
    io.save_checkpoint(state(2.0), path)
    io.checkpoint_io.gate.set()
    said = r"last.ckpt failed \((RuntimeError|OSError): .*\); [\d.]+ GiB free there. The previous checkpoint is whole"
    with pytest.raises(CheckpointError, match=said):
        io.save_checkpoint(state(3.0), path)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    io.checkpoint_io.fail = False
    io.save_checkpoint(state(3.0), path)
    io.teardown()
    assert torch.load(path, weights_only=True)["global_step"] == 3


def test_every_run_saves_in_the_background_unless_the_config_names_a_plugin(in_tmp):
    from qmath.cli import QMathCLI, resolve_args
    from qmath.data import GSM8K
    from qmath.module import GRPO

    def checkpoint_io(*args):
        return QMathCLI(GRPO, GSM8K, args=resolve_args(["fit", *args])[1:], run=False).trainer.strategy.checkpoint_io

    assert type(checkpoint_io()) is BackgroundCheckpointIO
    assert type(checkpoint_io("--trainer.plugins", "qmath.checkpointing.AtomicCheckpointIO")) is AtomicCheckpointIO


def test_slurms_requeue_checkpoint_is_written_before_the_save_returns(tmp_path):
    """Lightning's SLURM handler saves ``hpc_ckpt_N.ckpt`` and requeues the job at once, which kills it."""
    io_ = BackgroundCheckpointIO(GatedIO())
    io_.checkpoint_io.gate.set()
    io_.save_checkpoint(state(1.0), tmp_path / "hpc_ckpt_1.ckpt")
    assert io_._pending is None and torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 1
    io_.teardown()


def test_a_failed_write_found_while_an_exception_ends_the_run_is_said_not_raised_in_its_place(tmp_path, caplog):
    io_ = BackgroundCheckpointIO(GatedIO(fail=True))
    io_.save_checkpoint(state(1.0), tmp_path / "last.ckpt")
    io_.checkpoint_io.gate.set()
    with pytest.raises(ValueError, match="the run's own error"):
        try:
            raise ValueError("the run's own error")
        except ValueError:
            io_.teardown()  # as Lightning's exception handler calls it
            raise
    assert "qmath: writing the checkpoint" in caplog.text
    assert io_._writer is None  # the writer thread is shut down all the same
