"""A user's mistake, through `python -m qmath`'s entry point: `qmath: error: …` on stderr, exit status 2, no
traceback. Two cases and `export` run as a user runs them, in processes of their own; the others call the same
entry point in this process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from qmath.checkpointing import AtomicCheckpointIO
from qmath.errors import CheckpointError, ConfigError, QMathError, reported
from tests.conftest import ROOT
from tests.test_fit import tiny_config


def good(n: int, start: int = 0) -> list[dict]:
    return [{"question": f"What is {i} + 2?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
            for i in range(start, start + n)]


def jsonl(rows: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def write(directory: Path, name: str, content: str | bytes) -> str:
    path = directory / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


# name: (arguments after `fit --config cpu --config tiny.yaml`, given the case's directory; what stderr must say)
CASES = {
    "row without an answer": (
        lambda d: ["--data.path", write(d, "rows.jsonl", jsonl([*good(2), {"question": "Q?"}, *good(1, 2)]))],
        "rows.jsonl: of its 4 rows, 1 is invalid:\n  line 3: no text in column 'answer' (missing)"),
    "empty data file": (lambda d: ["--data.path", write(d, "empty.jsonl", "")], "empty.jsonl is empty"),
    "missing data file": (lambda d: ["--data.path", str(d / "nope.jsonl")],
                          "nope.jsonl does not exist; give a .jsonl, .json or .parquet file"),
    "non-UTF-8 bytes": (
        lambda d: ["--data.path", write(d, "latin1.jsonl", jsonl(good(1)).encode()
                                        + b'{"question": "caf\xe9?", "answer": "#### 4"}\n')],
        "latin1.jsonl: of its 2 rows, 1 is invalid:\n  line 2: not UTF-8 text (byte 0xe9 at column 18); save the "
        "file as UTF-8"),
    "missing model directory": (lambda d: ["--model.model_name_or_path", str(d / "no-model")],
                                "no-model does not exist. Give a hub id (org/name), a local HF directory"),
    "num_generations 1": (lambda d: ["--model.num_generations", "1"],
                          "model.num_generations must be at least 2 to form a group, got 1"),
    "temperature 0": (lambda d: ["--model.temperature", "0"], "model.temperature must be positive, got 0"),
    "top_p 1.5": (lambda d: ["--model.top_p", "1.5"], "model.top_p must be in (0, 1] (1: off), got 1.5"),
    "resume with no checkpoint": (
        lambda d: ["--ckpt_path", "last"],
        "/lightning_logs/cpu/checkpoints (where this config saves them). Put the earlier run's checkpoint folder"),
    "max_completion_length 0": (lambda d: ["--model.max_completion_length", "0"],
                                "model.max_completion_length must be positive, got 0"),
    "batch_size 0": (lambda d: ["--data.batch_size", "0"], "data.batch_size must be at least 1 prompt per device"),
    "damaged checkpoint": (
        lambda d: ["--ckpt_path", damaged_beside_a_good_one(d)],
        "last.ckpt is damaged (truncated or overwritten) or not a checkpoint"),
    "unknown config name": (lambda d: ["--config", "t4x3"], "--config t4x3: no such file, and no shipped config"),
    "negative learning rate": (lambda d: ["--model.optimizer.init_args.lr=-1e-5"],
                               "model.optimizer: Invalid learning rate: -1e-05"),
    "negative number without '='": (lambda d: ["--model.optimizer.init_args.lr", "-1e-5"],
                                    "(a negative number needs '=': --model.optimizer.init_args.lr=-1e-5)"),
    "warm-up of 0 steps": (
        lambda d: ["--trainer.max_steps", "10", "--model.lr_scheduler.class_path", "OneCycleLR",
                   "--model.lr_scheduler.init_args.max_lr", "1e-5", "--model.lr_scheduler.init_args.total_steps",
                   "10", "--model.lr_scheduler.init_args.pct_start", "0.1"],
        "model.lr_scheduler: ZeroDivisionError: float division by zero. Make its init_args fit the run (OneCycleLR: "
        "total_steps at least trainer.max_steps, and pct_start × total_steps at least 2 steps of warm-up)"),
    "schedule shorter than the run": (
        lambda d: ["--trainer.max_steps", "3", "--model.lr_scheduler.class_path", "OneCycleLR",
                   "--model.lr_scheduler.init_args.max_lr", "1e-5", "--model.lr_scheduler.init_args.total_steps", "2"],
        "model.lr_scheduler (OneCycleLR) fails at optimizer step 3 of trainer.max_steps 3: Tried to step 3 times."),
    "completions beyond the context": (
        lambda d: ["--model.max_completion_length", "1100"],
        "data.max_prompt_length 1024 + model.max_completion_length 1100 = 2124 tokens, beyond "),
    "option typo": (lambda d: ["--model.tmperature", "1"],
                    "unrecognized arguments: --model.tmperature 1 (did you mean --model.temperature?). The options and "
                    "their types: python -m qmath fit --help"),
    "typo in a config file": (lambda d: ["--config", write(d, "typo.yaml", "model:\n  tmperature: 1\n")],
                              "does not accept option 'model.tmperature'"),
    "value of the wrong type": (lambda d: ["--trainer.max_steps", "ten"], 'Parser key "trainer.max_steps"'),
    "top_k -1": (lambda d: ["--model.top_k=-1"], "model.top_k must be at least 0 (0 or null: off), got -1"),
    "few-shot beyond the examples": (lambda d: ["--data.num_few_shot", "3"],
                                     "data.num_few_shot must be in [0, 2], got 3"),
}


def damaged_beside_a_good_one(directory: Path) -> str:
    checkpoints = directory / "checkpoints"
    checkpoints.mkdir()
    torch.save({"state_dict": {}, "global_step": 10}, checkpoints / "step-10.ckpt")
    good = (checkpoints / "step-10.ckpt").read_bytes()
    (checkpoints / "last.ckpt").write_bytes(good[: len(good) // 2])  # a copy cut short, as a kill mid-copy leaves
    os.utime(checkpoints / "step-10.ckpt", (0, 0))  # older than the damaged one
    return str(checkpoints / "last.ckpt")


def launch(directory: Path, args: list[str], env: dict | None = None) -> subprocess.Popen:
    """`python -m qmath ARGS` in ``directory``, its output to files there (the pipes of several would fill)."""
    with open(directory / "stdout", "w") as out, open(directory / "stderr", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "qmath", *args], cwd=directory, stdout=out, stderr=err,
                                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


# as a user runs them, each in a process of its own: a mistake found reading the data, and one found inside
# Trainer.fit (its teardown included); the others call the same entry point in this process
SUBPROCESS = ("row without an answer", "damaged checkpoint")


def in_process(directory: Path, args: list[str]) -> tuple[int | None, str]:
    """``python -m qmath ARGS`` in ``directory`` without a new process (each would spend seconds importing): the
    exit status and what was written to stderr; an exception instead of the exit is returned as its traceback
    (status ``None``), so that only its own case fails."""
    from qmath.__main__ import cli

    err, cwd = io.StringIO(), os.getcwd()
    os.chdir(directory)
    try:
        with contextlib.redirect_stderr(err):
            cli(args)
        return 0, err.getvalue()
    except SystemExit as exit_:
        return exit_.code, err.getvalue()
    except Exception:
        return None, err.getvalue() + traceback.format_exc()
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model) -> dict[str, tuple[int | None, str]]:
    done, started = {}, {}
    for name, (arguments, _) in CASES.items():
        directory = tmp_path_factory.mktemp(name.replace(" ", "-"))
        args = ["fit", "--config", "cpu", "--config", str(tiny_config(directory, tiny_model)), *arguments(directory)]
        if name in SUBPROCESS:  # side by side with the in-process cases
            started[name] = (directory, launch(directory, args))
        else:
            done[name] = in_process(directory, args)
    for name, (directory, proc) in started.items():
        done[name] = (proc.wait(timeout=300), (directory / "stderr").read_text())
    return done


@pytest.mark.parametrize("case", CASES)
def test_a_users_mistake_is_one_line_with_status_2(runs, case):
    status, stderr = runs[case]
    assert "Traceback" not in stderr, stderr
    assert status == 2, stderr
    assert "qmath: error: " + CASES[case][1] in stderr or ("qmath: error: " in stderr and CASES[case][1] in stderr)
    assert stderr.count("qmath: error:") == 1


def test_a_damaged_checkpoint_names_the_previous_good_one(runs):
    stderr = runs["damaged checkpoint"][1]
    assert "The newest readable checkpoint beside it is " in stderr and "step-10.ckpt" in stderr, stderr


def test_a_damaged_last_ckpt_is_said_when_lightning_loads_it(tmp_path):
    damaged = Path(damaged_beside_a_good_one(tmp_path))
    with pytest.raises(CheckpointError, match=f"{damaged} is damaged.*resume with --ckpt_path .*step-10.ckpt"):
        AtomicCheckpointIO().load_checkpoint(damaged)  # how `--ckpt_path last` reads lightning_logs/.../last.ckpt
    (tmp_path / "checkpoints" / "step-10.ckpt").unlink()
    with pytest.raises(CheckpointError, match="No other readable checkpoint is in .*start again without"):
        AtomicCheckpointIO().load_checkpoint(damaged)


def test_export_of_a_damaged_checkpoint_is_one_line(tmp_path):
    damaged = damaged_beside_a_good_one(tmp_path)
    proc = launch(tmp_path, ["export", "--ckpt_path", damaged, "--out", str(tmp_path / "out")])
    assert proc.wait(timeout=300) == 2
    stderr = (tmp_path / "stderr").read_text()
    assert stderr.startswith(f"qmath: error: {damaged} is damaged") and "Traceback" not in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_bugs_keep_their_traceback_and_qmath_debug_shows_every_one(monkeypatch, capsys):
    def bug():
        with reported():
            raise KeyError("a bug in qmath")

    with pytest.raises(KeyError):  # not a user's mistake: it propagates, and Python prints its traceback
        bug()
    with pytest.raises(SystemExit) as exit_, reported():
        raise ConfigError("model.x must be y")
    assert exit_.value.code == 2 and capsys.readouterr().err == "qmath: error: model.x must be y\n"
    monkeypatch.setenv("QMATH_DEBUG", "1")
    with pytest.raises(ConfigError), reported():
        raise ConfigError("model.x must be y")


def test_a_reward_that_raises_says_where(tiny_model, in_tmp, capsys):
    from qmath.__main__ import cli

    (in_tmp / "boom.yaml").write_text(json.dumps({"model": {"rewards": [{
        "class_path": "qmath.rewards.FunctionReward",
        "init_args": {"function": "tests.test_errors.boom_reward", "name": "boom"}}]}}))
    with pytest.raises(SystemExit) as exit_:
        cli(["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)), "--config", "boom.yaml",
             "--trainer.max_steps", "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "qmath: error: reward 'boom' raised ZeroDivisionError: division by zero (at " in err
    assert f"{Path(__file__).name}:" in err and "in boom_reward)" in err


def boom_reward(completions, **kwargs):
    scale = 1 / 0
    return [scale] * len(completions)


def test_every_user_error_is_a_qmath_error():
    from qmath.module import NonFiniteError
    from qmath.rewards import RewardError
    from qmath.rows import DataError

    assert all(issubclass(e, QMathError) for e in (DataError, RewardError, NonFiniteError, ConfigError))
    assert not RewardError.every_rank and DataError.every_rank  # a rank's own rewards; the shared data


def test_under_ddp_a_data_error_is_said_once_and_the_job_ends(tmp_path, tiny_model):
    config = tiny_config(tmp_path, tiny_model)
    bad = write(tmp_path, "rows.jsonl", jsonl([*good(1), {"question": "Q?"}]))
    start = time.time()
    proc = launch(tmp_path, ["fit", "--config", "cpu", "--config", str(config), "--trainer.strategy", "ddp",
                             "--trainer.devices", "2", "--data.path", bad])
    status = proc.wait(timeout=300)
    stderr = (tmp_path / "stderr").read_text()
    assert status != 0 and "Traceback" not in stderr, stderr
    assert stderr.count("qmath: error:") == 1 and "rows.jsonl: of its 2 rows, 1 is invalid" in stderr, stderr
    print(f"DDP: exit status {status} after {time.time() - start:.0f} s")


def test_resume_with_no_checkpoint_looks_where_lightning_looks(tmp_path):
    """`--ckpt_path last` is refused only where Lightning's own lookup finds nothing: a `last-v1.ckpt` (written
    beside a `last.ckpt` from another run) is one Lightning resumes from, so it passes."""
    from lightning import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from qmath.cli import QMathCLI

    folder = tmp_path / "checkpoints"
    folder.mkdir()

    def check() -> None:
        cli = QMathCLI.__new__(QMathCLI)  # the check alone, on a trainer as the CLI builds it
        cli.config = {"subcommand": "fit", "fit": {"ckpt_path": "last"}}
        cli.trainer = Trainer(callbacks=[ModelCheckpoint(dirpath=str(folder), save_last=True)], logger=False,
                              enable_progress_bar=False, default_root_dir=str(tmp_path))
        cli._check_resume()

    with pytest.raises(ConfigError, match=f"no last checkpoint in {folder}"):
        check()
    (folder / "last-v1.ckpt").write_bytes(b"")
    check()
