"""DDP across two CPU processes (gloo), through `python -m qmath fit` exactly as a GPU user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning import Callback

from tests.conftest import ROOT
from tests.test_fit import scalars, tiny_config


class RecordRanks(Callback):
    """Writes what each rank trained on, and a checksum of its weights, to ranks-<rank>.json."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        rollout = pl_module.last_rollout
        self.steps.append({"question": rollout["question"], "reward": rollout["reward"]})

    def on_train_end(self, trainer, pl_module) -> None:
        checksum = sum(p.detach().double().sum().item() for p in pl_module.policy.parameters())
        Path(f"ranks-{trainer.global_rank}.json").write_text(json.dumps({"steps": self.steps, "checksum": checksum}))


def test_ddp_ranks_split_prompts_sync_metrics_and_stay_identical(tiny_model, in_tmp):
    config = tiny_config(in_tmp, tiny_model)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["fit", "--config", "cpu", "--config", str(config), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.strategy", "ddp", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
            "--model.num_generations", "4", "--data.batch_size", "2", "--trainer.callbacks+",
            "tests.test_ddp.RecordRanks"]
    run = subprocess.run([sys.executable, "-m", "qmath", *args], cwd=in_tmp, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((in_tmp / f"ranks-{r}.json").read_text()) for r in (0, 1)]
    for step in range(3):
        questions = [r["steps"][step]["question"] for r in ranks]
        # a group's 4 completions share one prompt, on one rank; the ranks' prompts are disjoint
        for q in questions:
            assert len(q) == 8 and q[0:4] == [q[0]] * 4 and q[4:8] == [q[4]] * 4
        assert not set(questions[0]) & set(questions[1])
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-6, abs=1e-6)
    # the logged reward is the mean over both ranks, not rank 0's
    logged = dict(scalars(in_tmp / "lightning_logs" / "cpu" / "version_0")["reward"])
    means = [[sum(r["steps"][s]["reward"]) / 8 for s in range(3)] for r in ranks]
    assert means[0] != means[1]  # otherwise rank 0's value would pass for the global mean
    for step in range(3):
        both = [x for r in ranks for x in r["steps"][step]["reward"]]
        assert logged[step] == pytest.approx(sum(both) / len(both), rel=1e-5)
    # one run's logs and checkpoints, written by rank 0 only
    assert sorted(p.name for p in (in_tmp / "lightning_logs" / "cpu").iterdir()) == ["checkpoints", "version_0"]
    assert torch.load(in_tmp / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt", weights_only=True)[
        "global_step"] == 3
