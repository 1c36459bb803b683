"""Resuming: exactly, after a signal or a kill -9, and only into the model a checkpoint was trained from."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning import Callback
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from qmath.__main__ import main
from qmath.checkpointing import AtomicCheckpointIO, BackgroundCheckpointIO, CheckpointOnSignal
from qmath.cli import QMathCLI, resolve_args
from qmath.data import GSM8K
from qmath.module import GRPO
from tests.conftest import ROOT
from tests.test_fit import scalars, tiny_config

LAST = ("lightning_logs", "cpu", "checkpoints", "last.ckpt")


def test_a_checkpoint_of_another_vocabulary_is_refused_before_training(tiny_model, in_tmp):
    config = str(tiny_config(in_tmp, tiny_model))
    main(["fit", "--config", "cpu", "--config", config, "--trainer.max_steps", "1"])
    other = shutil.copytree(tiny_model, in_tmp / "other")
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<extra>"])  # same weights, one more token: ids no longer mean the same
    tokenizer.save_pretrained(other)
    with pytest.raises(ValueError, match=r"another base model or vocabulary: model_name_or_path .*vocab_size 400 "
                                         r"\(now 401\).*--model.model_name_or_path it was trained from"):
        main(["fit", "--config", "cpu", "--config", config, "--model.model_name_or_path", str(other),
              "--trainer.max_steps", "2", "--ckpt_path", "last"])
    assert torch.load(in_tmp.joinpath(*LAST), weights_only=True)["global_step"] == 1  # nothing trained


def test_a_checkpoint_with_other_weight_shapes_is_refused(tiny_model, in_tmp):
    config = str(tiny_config(in_tmp, tiny_model))
    main(["fit", "--config", "cpu", "--config", config, "--trainer.max_steps", "1"])
    ckpt = torch.load(in_tmp.joinpath(*LAST), weights_only=True)
    del ckpt["qmath_base"]  # as from a checkpoint that does not record its base
    torch.save(ckpt, in_tmp.joinpath(*LAST))
    wider = shutil.copytree(tiny_model, in_tmp / "wider")
    base = LlamaConfig.from_pretrained(tiny_model)
    base.hidden_size, base.intermediate_size = 48, 96
    LlamaForCausalLM(base).save_pretrained(wider)
    with pytest.raises(ValueError, match="weight shapes"):
        main(["fit", "--config", "cpu", "--config", config, "--model.model_name_or_path", str(wider),
              "--trainer.max_steps", "2", "--ckpt_path", "last"])


class SignalAt(Callback):
    """Sends this process ``signum`` at the end of optimizer step 3, as a scheduler or SLURM would."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.sent_at: float | None = None

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == 3 and self.sent_at is None:
            self.sent_at = time.monotonic()
            os.kill(os.getpid(), self.signum)


def rewards_by_step(log_dir: Path) -> dict[int, float]:
    return dict(scalars(log_dir)["train/reward"])


class CountSaves(Callback):
    """The global step of every checkpoint this process writes."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.steps.append(trainer.global_step)


# ModelCheckpoint saving every step (so also at the signalled one), and saving only every 100 (so it has written
# no last.ckpt of its own, and would at the end of training); a validation is due later (step 6)
@pytest.mark.parametrize(("signum", "every"), [(signal.SIGTERM, 1), (signal.SIGUSR1, 100)],
                         ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_saves_last_and_the_resumed_run_repeats_the_uninterrupted_one(tiny_model, in_tmp, signum, every):
    path = tiny_config(in_tmp, tiny_model)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = every
    path.write_text(yaml.safe_dump(config))
    config = str(path)
    six = ["--trainer.max_steps", "6", "--trainer.val_check_interval", "6"]
    straight = main(["fit", "--config", "cpu", "--config", config, *six, "--trainer.logger.init_args.name", "once"])
    shutil.rmtree(in_tmp.joinpath(*LAST).parent)  # its checkpoints: the runs below start afresh
    signaller, saves = SignalAt(signum), CountSaves()
    cli = QMathCLI(GRPO, GSM8K, args=resolve_args(["fit", "--config", "cpu", "--config", config, *six])[1:], run=False,
                   trainer_defaults={"callbacks": [signaller, CheckpointOnSignal(), saves]})
    cli.trainer.fit(cli.model, cli.datamodule)  # stops cleanly after the step that was signalled
    seconds = time.monotonic() - signaller.sent_at
    assert cli.trainer.global_step == 3
    checkpoints = in_tmp.joinpath(*LAST).parent
    assert sorted(p.name for p in checkpoints.glob("last*.ckpt")) == ["last.ckpt"]  # no last-v1.ckpt
    assert saves.steps.count(3) == 1 and max(saves.steps) == 3  # and one save of the signalled step (5.5 GiB on t4x2)
    assert torch.load(in_tmp.joinpath(*LAST), weights_only=True)["global_step"] == 3
    stopped = scalars(in_tmp / "lightning_logs" / "cpu" / "version_0")
    assert not [k for k in stopped if k.startswith("val/")]  # the stop ran no validation
    assert seconds < 10, seconds  # a save and the teardown
    assert cli.trainer.limit_val_batches == 1.0  # a trainer used again validates again
    resumed = main(["fit", "--config", "cpu", "--config", config, *six, "--ckpt_path", "last"])
    assert sorted(p.name for p in checkpoints.glob("last*.ckpt")) == ["last.ckpt"]  # the resumed run overwrites it
    for a, b in zip(straight.model.policy.parameters(), resumed.model.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    once = rewards_by_step(in_tmp / "lightning_logs" / "once" / "version_0")
    after = rewards_by_step(in_tmp / "lightning_logs" / "cpu" / "version_1")
    assert sorted(dict(stopped["train/reward"])) == [0, 1, 2] and sorted(after) == [3, 4, 5]
    assert {**dict(stopped["train/reward"]), **after} == pytest.approx(once, rel=1e-5)  # as if never stopped
    validated = [[step for step, _ in scalars(in_tmp / "lightning_logs" / name / version)["val/format_rate"]]
                 for name, version in (("once", "version_0"), ("cpu", "version_1"))]
    assert validated[0] == validated[1] and len(validated[0]) == 1  # at step 6, on schedule


class SlowSecondSave(Callback):
    """Makes the second checkpoint write stall halfway, leaving time to kill the process during it; the write runs
    in the background, as every run's does."""

    def setup(self, trainer, pl_module, stage) -> None:
        trainer.strategy.checkpoint_io = BackgroundCheckpointIO(SlowAtomicCheckpointIO())


class SlowAtomicCheckpointIO(AtomicCheckpointIO):
    saves = 0

    def _write(self, checkpoint, tmp) -> None:
        SlowAtomicCheckpointIO.saves += 1
        if SlowAtomicCheckpointIO.saves < 2:
            return super()._write(checkpoint, tmp)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
            Path("writing").touch()
            time.sleep(120)


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_last_loadable(tiny_model, in_tmp):
    config = str(tiny_config(in_tmp, tiny_model))
    three = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3"]
    proc = subprocess.Popen([sys.executable, "-m", "qmath", "fit", "--config", "cpu", "--config", config, *three,
                             "--trainer.callbacks+", "tests.test_resume.SlowSecondSave"], cwd=in_tmp,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not (in_tmp / "writing").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the second checkpoint write never started"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    checkpoints = in_tmp / "lightning_logs" / "cpu" / "checkpoints"
    assert [p.name for p in checkpoints.glob(".last.ckpt.*.tmp")]  # the half-written file is there ...
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 1  # ... and last.ckpt intact
    resumed = main(["fit", "--config", "cpu", "--config", config, *three, "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 3
    assert not list(checkpoints.glob(".last.ckpt.*.tmp"))  # cleared by the next save
    straight = main(["fit", "--config", "cpu", "--config", config, *three, "--trainer.logger.init_args.name", "once"])
    for a, b in zip(straight.model.policy.parameters(), resumed.model.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_after_a_resume_the_reference_is_the_base_model(tiny_model, in_tmp):
    from transformers import AutoModelForCausalLM

    config = str(tiny_config(in_tmp, tiny_model))
    main(["fit", "--config", "cpu", "--config", config, "--trainer.max_steps", "2"])
    resumed = main(["fit", "--config", "cpu", "--config", config, "--trainer.max_steps", "3", "--ckpt_path", "last"])
    module, micro = resumed.model, resumed.model.micro_batches[0]
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        expected = module.token_logps(base, micro)
        torch.testing.assert_close(module.token_logps(module.reference, micro), expected, rtol=0, atol=0)
        assert not torch.allclose(module.token_logps(module.policy, micro), expected)  # the policy did move


def test_each_rank_takes_its_own_generators_from_a_checkpoint():
    """The selection under the DDP resume tests (whose ranks' generators differ only where their draws did): rank r
    restores entry r of the checkpoint's list, an older checkpoint's single dict goes to every rank, and a rank
    beyond those saved keeps its seeded generators."""
    from qmath.checkpointing import own_rng_states

    saved = [{"torch": torch.tensor([0])}, {"torch": torch.tensor([1])}]
    assert [own_rng_states(saved, rank, 2)["torch"].item() for rank in (0, 1)] == [0, 1]
    assert own_rng_states(saved[0], 1, 2) is saved[0]
    assert own_rng_states(saved, 2, 3) is None and own_rng_states(None, 0, 1) is None
