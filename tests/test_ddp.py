"""DDP across two CPU processes (gloo), through `python -m qmath fit` exactly as a GPU user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning import Callback
from transformers import GenerationConfig

from tests.conftest import ROOT, make_tiny_model
from tests.test_fit import scalars, tiny_config

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
# An EOS bias (<|im_end|> is id 2 in conftest's tokenizer: its special tokens come first) so that the tiny model's
# completions end at different lengths on each rank, as a real model's do. The top half of the tokens by entropy:
# each step gathers the ranks' different numbers of token entropies for the threshold.
SMALL = ["--model.num_generations", "4", "--data.batch_size", "2", "--trainer.callbacks+", "tests.test_ddp.RecordRanks",
         "--model.generation_kwargs", "{sequence_bias: [[[2], 3.0]]}", "--model.top_entropy_quantile", "0.5"]


class RecordRanks(Callback):
    """Writes what each rank trained on, and a checksum of its weights, to ranks-<rank>.json."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        rollout = pl_module.last_rollout  # as scored at this step; empty on a step that reuses a resumed rollout
        micro = pl_module.micro_batches
        self.steps.append({"question": rollout.get("question"), "reward": rollout.get("reward"),
                           "texts": [t for m in micro for t in m.texts],
                           "lengths": [int(n) for m in micro for n in m.completion_mask.sum(dim=1)],
                           "terminated": [bool(t) for m in micro for t in m.terminated],
                           "tokens": sum(int(m.prompt_mask.sum() + m.completion_mask.sum()) for m in micro),
                           "components": {r.name: rollout.get(r.name) for r in pl_module.rewards}})

    def on_train_end(self, trainer, pl_module) -> None:
        weights = list(pl_module.policy.parameters())
        checksum = sum(p.detach().double().sum().item() for p in weights)
        trainable = sum(p.detach().double().abs().sum().item() for p in weights if p.requires_grad)
        sampler = pl_module.sampler
        Path(f"ranks-{trainer.global_rank}.json").write_text(json.dumps({
            "steps": self.steps, "checksum": checksum, "trainable": trainable,
            "decoding": sampler.mode(pl_module.device), "graphs": sorted(sampler.graphs),
            "compile_error": sampler.compile_error}))


def boom_reward(completions, **_):
    """Raises on the rank named by QMATH_TEST_FAIL_RANK, at the second step, after noting the time."""
    rank = int(os.environ.get("LOCAL_RANK", 0))
    calls = boom_reward.calls = getattr(boom_reward, "calls", 0) + 1
    if rank == int(os.environ["QMATH_TEST_FAIL_RANK"]) and calls == 2:
        Path("raised-at").write_text(str(time.time()))
        raise ZeroDivisionError(f"boom on rank {rank}")
    return [0.0] * len(completions)


def fit(cwd: Path, *args: str, env: dict | None = None, timeout: float = 600,
        subcommand: str = "fit") -> subprocess.CompletedProcess:
    """`python -m qmath fit ARGS` in ``cwd``; the whole process group is killed if it outlives ``timeout``."""
    proc = subprocess.Popen([sys.executable, "-m", "qmath", subcommand, *args], cwd=cwd, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)  # returns once every rank has closed the pipes
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the job hung for {timeout} s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def ranks(directory: Path) -> list[dict]:
    return [json.loads((directory / f"ranks-{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def ddp_run(tiny_model, tmp_path_factory) -> Path:
    """Three optimizer steps on two ranks, a checkpoint after each."""
    directory = tmp_path_factory.mktemp("ddp")
    run = fit(directory, "--config", "cpu", "--config", str(tiny_config(directory, tiny_model)), *DDP, *SMALL,
              "--trainer.max_steps", "3", "--trainer.val_check_interval", "3")
    assert run.returncode == 0, run.stderr[-3000:]
    return directory


def test_ddp_ranks_split_prompts_sync_metrics_and_stay_identical(ddp_run):
    records = ranks(ddp_run)
    for step in range(3):
        questions = [r["steps"][step]["question"] for r in records]
        # a group's 4 completions share one prompt, on one rank; the ranks' prompts are disjoint
        for q in questions:
            assert len(q) == 8 and q[0:4] == [q[0]] * 4 and q[4:8] == [q[4]] * 4
        assert not set(questions[0]) & set(questions[1])
    assert records[0]["checksum"] == pytest.approx(records[1]["checksum"], rel=1e-6, abs=1e-6)
    # the logged reward is the mean over both ranks, not rank 0's
    logged = dict(scalars(ddp_run / "lightning_logs" / "cpu" / "version_0")["train/reward"])
    means = [[sum(r["steps"][s]["reward"]) / 8 for s in range(3)] for r in records]
    assert means[0] != means[1]  # otherwise rank 0's value would pass for the global mean
    for step in range(3):
        both = [x for r in records for x in r["steps"][step]["reward"]]
        assert logged[step] == pytest.approx(sum(both) / len(both), rel=1e-5)
    # one run's logs and checkpoints, written by rank 0 only
    assert sorted(p.name for p in (ddp_run / "lightning_logs" / "cpu").iterdir()) == ["checkpoints", "version_0"]
    assert sorted(p.name for p in (ddp_run / "lightning_logs" / "cpu" / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(ddp_run / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt", weights_only=True)[
        "global_step"] == 3


def test_ddp_compiled_decoding_compiles_its_planned_graph_on_each_rank(tiny_model, in_tmp):
    """t4x2.yaml's decoding under DDP, where Lightning runs training_step inside DDP's forward (dynamo would hand a
    graph it compiles there to its DDPOptimizer): each rank compiles the one planned shape (8 rows, for rollouts and
    the 3 held-out problems per rank alike) and decodes compiled throughout; the ranks stay identical."""
    run = fit(in_tmp, "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)), *DDP, *SMALL,
              "--model.generation_backend", "compiled", "--trainer.max_steps", "2", "--trainer.val_check_interval",
              "2", "--data.num_val", "6", "--model.rollout_dtype", "null")  # t4x2.yaml's fp32 rollouts
    assert run.returncode == 0, run.stderr[-3000:]
    records = ranks(in_tmp)
    for record in records:
        assert record["decoding"] == "compiled" and record["compile_error"] is None
        assert [rows for rows, _ in record["graphs"]] == [8]
    assert "outside the planned shapes" not in run.stderr
    assert records[0]["checksum"] == pytest.approx(records[1]["checksum"], rel=1e-6, abs=1e-6)


def test_ddp_lora_resumed_between_reuses_of_a_rollout_repeats_each_ranks_samples_and_dropout(tiny_model,
                                                                                            tmp_path_factory):
    """LoRA with dropout, each rollout used for two steps (num_iterations 2), stopped after step 0 (the end of fit
    there: its last.ckpt) and resumed to step 3, against the 4 steps in one go. Resumed, each rank trains on its own
    saved rollout (not rank 0's), then draws its own samples, and its LoRA dropout continues that rank's own stream
    (the checkpoint holds every rank's generators)."""
    from tests.test_lora import LORA

    options = [*LORA, "--model.lora_dropout", "0.5", "--model.num_iterations", "2", "--trainer.val_check_interval", "4"]
    straight, stopped = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("stopped")
    for directory, steps in ((straight, 4), (stopped, 1)):  # step 1 reuses step 0's rollout
        run = fit(directory, "--config", "cpu", "--config", str(tiny_config(directory, tiny_model)), *DDP, *SMALL,
                  *options, "--trainer.max_steps", str(steps))
        assert run.returncode == 0, run.stderr[-3000:]
    records = ranks(straight)
    assert records[0]["checksum"] == pytest.approx(records[1]["checksum"], rel=1e-6, abs=1e-6)
    for step in (0, 2):  # the steps that draw a rollout: the ranks' prompts are disjoint
        assert not set(records[0]["steps"][step]["question"]) & set(records[1]["steps"][step]["question"])
    assert records[0]["steps"][1]["texts"] != records[1]["steps"][1]["texts"]  # so rank 0's would not pass for 1's
    assert scalars(straight / "lightning_logs" / "cpu" / "version_0")["train/kl"][1][1] > 0  # the adapters moved
    checkpoint = torch.load(stopped / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"])
    assert len(checkpoint["qmath_rng_states"]) == 2  # one per rank
    resumed = fit(stopped, "--config", "cpu", "--config", str(tiny_config(stopped, tiny_model)), *DDP, *SMALL,
                  *options, "--trainer.max_steps", "4", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = ranks(stopped)
    for rank in (0, 1):  # the same samples, and adapters trained through the same dropout masks
        assert [s["texts"] for s in after[rank]["steps"]] == [s["texts"] for s in records[rank]["steps"][1:]]
        assert after[rank]["trainable"] == pytest.approx(records[rank]["trainable"], rel=1e-6)
        assert after[rank]["checksum"] == pytest.approx(records[rank]["checksum"], rel=1e-6, abs=1e-6)


def test_ddp_logs_trl_reward_std_and_length_extremes_over_both_ranks(ddp_run):
    records, logged = ranks(ddp_run), scalars(ddp_run / "lightning_logs" / "cpu" / "version_0")
    for step in range(3):
        both = torch.tensor([x for r in records for x in r["steps"][step]["reward"]])
        # TRL's reward_std: over all the step's rewards
        assert dict(logged["train/reward_std"])[step] == pytest.approx(both.std().item(), rel=1e-5)
        lengths = [r["steps"][step]["lengths"] for r in records]
        assert dict(logged["train/completions/min_length"])[step] == min(lengths[0] + lengths[1])
        assert dict(logged["train/completions/max_length"])[step] == max(lengths[0] + lengths[1])
        # TRL's per-reward std, and the terminated lengths, over both ranks' completions
        for name in records[0]["steps"][step]["components"]:
            values = torch.tensor([x for r in records for x in r["steps"][step]["components"][name]])
            assert dict(logged[f"train/rewards/{name}/std"])[step] == pytest.approx(values.std().item(), rel=1e-5)
        ended = [n for r in records for n, t in zip(r["steps"][step]["lengths"], r["steps"][step]["terminated"]) if t]
        for kind, expected in (("mean", sum(ended) / max(len(ended), 1)), ("min", min(ended, default=0)),
                               ("max", max(ended, default=0))):
            assert dict(logged[f"train/completions/{kind}_terminated_length"])[step] == pytest.approx(expected)
        # num_tokens: every rank's prompt and completion tokens, cumulative
        tokens = sum(r["steps"][s]["tokens"] for r in records for s in range(step + 1))
        assert dict(logged["train/num_tokens"])[step] == tokens
    # the ranks' extremes differ at some step, so a mean of per-rank extremes would have failed above
    assert any(min(r["steps"][s]["lengths"]) != min(records[0]["steps"][s]["lengths"]) or
               max(r["steps"][s]["lengths"]) != max(records[0]["steps"][s]["lengths"])
               for r in records[1:] for s in range(3))


def rank_reward(completions, **_):
    """Informative groups on rank 0 (rewards alternate), uninformative ones on rank 1 (all zero)."""
    informative = int(os.environ.get("LOCAL_RANK", 0)) == 0
    return [float(i % 2) if informative else 0.0 for i in range(len(completions))]


class CountRollouts(Callback):
    """Counts each rank's rollout calls (one per sampling round) and writes them to rollouts-<rank>.json."""

    def setup(self, trainer, pl_module, stage) -> None:
        self.calls = 0
        rollout = pl_module.rollout

        def counted(*args, **kwargs):
            self.calls += 1
            return rollout(*args, **kwargs)

        pl_module.rollout = counted

    def on_train_end(self, trainer, pl_module) -> None:
        Path(f"rollouts-{trainer.global_rank}.json").write_text(json.dumps(self.calls))


def test_dynamic_sampling_runs_the_same_rounds_on_every_rank(tiny_model, in_tmp):
    config = yaml.safe_load(tiny_config(in_tmp, tiny_model).read_text())
    config["model"]["rewards"] = [{"class_path": "qmath.rewards.FunctionReward",
                                   "init_args": {"function": "tests.test_ddp.rank_reward", "name": "rank"}}]
    (in_tmp / "dynamic.yaml").write_text(yaml.safe_dump(config))
    run = fit(in_tmp, "--config", "cpu", "--config", "dynamic.yaml", *DDP, *SMALL, "--model.dynamic_sampling",
              "true", "--model.max_sampling_rounds", "2", "--trainer.max_steps", "2", "--trainer.callbacks+",
              "tests.test_ddp.CountRollouts", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # rank 1 needs both extra rounds at each step, rank 0 none: under FSDP a round on one rank alone would hang
    calls = [json.loads((in_tmp / f"rollouts-{r}.json").read_text()) for r in (0, 1)]
    assert calls == [2 * 3, 2 * 3]
    records = ranks(in_tmp)
    for step in records[0]["steps"]:  # rank 0 keeps its own informative groups, none drawn for the round
        assert step["reward"] == [0.0, 1.0] * 4


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_an_exception_on_one_rank_ends_the_job_within_seconds(tiny_model, in_tmp, failing_rank):
    config = yaml.safe_load(tiny_config(in_tmp, tiny_model).read_text())
    config["model"]["rewards"].append({"class_path": "qmath.rewards.FunctionReward",
                                       "init_args": {"function": "tests.test_ddp.boom_reward", "name": "boom"}})
    (in_tmp / "boom.yaml").write_text(yaml.safe_dump(config))
    run = fit(in_tmp, "--config", "cpu", "--config", "boom.yaml", *DDP, "--trainer.max_steps", "4",
              env={"QMATH_TEST_FAIL_RANK": str(failing_rank)}, timeout=300)
    ended = time.time()
    assert run.returncode != 0
    assert f"reward 'boom' raised ZeroDivisionError: boom on rank {failing_rank}" in run.stderr
    # the other rank waits in a collective for the failed one; it must not wait there for the 30-minute timeout
    gap = ended - float((in_tmp / "raised-at").read_text())
    print(f"rank {failing_rank} raised; the job ended {gap:.1f} s later, exit code {run.returncode}")
    assert gap < 30


def test_the_t4x2_config_runs_with_only_model_data_hardware_and_length_changed(tmp_path):
    """configs/t4x2.yaml: 2-process DDP, validations, checkpoints, LogCompletions, the learning-rate schedule to its
    end. 20 steps with validations, checkpoints and completion tables every 10, the schedule's total shortened with
    them (its 10% warm-up is then 2 steps; OneCycleLR ends the run if stepped past its total: that the shipped total
    covers the shipped 400 steps is tested in test_configs.py); the shipped 400 steps on 2 CPU processes would be
    minutes more of the same steps."""
    model = make_tiny_model(tmp_path / "model")
    # the tiny model's rollouts end at once (an EOS bias): 512-token answers from a random model would make this a
    # long test without proving more about the distributed section
    eos = GenerationConfig.from_pretrained(model).eos_token_id
    run = fit(tmp_path, "--config", str(ROOT / "configs" / "t4x2.yaml"), "--model.model_name_or_path", str(model),
              "--model.generation_kwargs", f"{{sequence_bias: [[[{eos}], 100.0]]}}", "--data.path", "synthetic",
              "--trainer.accelerator", "cpu", "--trainer.max_steps", "20", "--trainer.val_check_interval", "10",
              "--model.lr_scheduler.init_args.total_steps", "20", timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "x 2 device(s) = 2 prompts, 16 completions per optimizer step" in run.stdout
    logs = tmp_path / "lightning_logs" / "t4x2"
    assert sorted(p.name for p in logs.iterdir()) == ["checkpoints", "version_0"]
    assert torch.load(logs / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20
    logged = scalars(logs / "version_0")
    assert [s for s, _ in logged["val/accuracy_strict"]] == [9, 19]
    assert len(logged["train/reward"]) == 20
    lr = [v for _, v in logged["lr-AdamW/decay"]]
    assert max(lr) == pytest.approx(5e-6, rel=1e-3) and lr[-1] < 1e-3 * max(lr)  # warmed up, then decayed to ~0


def test_a_failing_launcher_kills_ranks_that_would_wait_for_it():
    """What NCCL does to a rank whose peer died (waits for the timeout) is played here by a sleeping process."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    from qmath.callbacks import EndAllRanksOnException

    launcher = _SubprocessScriptLauncher.__new__(_SubprocessScriptLauncher)
    launcher.procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])]
    trainer = SimpleNamespace(strategy=SimpleNamespace(launcher=launcher))
    EndAllRanksOnException().on_exception(trainer, None, RuntimeError("rank 0 failed"))
    assert launcher.procs[0].wait(timeout=10) == -signal.SIGKILL


class SigtermRank0(Callback):
    """SIGTERM to rank 0 only (the process a user or scheduler signals) at the end of step 2."""

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == 2 and trainer.global_rank == 0:
            Path("signalled-at").write_text(str(time.time()))
            os.kill(os.getpid(), signal.SIGTERM)


def test_ddp_sigterm_to_rank_0_stops_all_ranks_after_a_save_and_resumes(ddp_run, tiny_model, in_tmp):
    path = tiny_config(in_tmp, tiny_model)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 100  # the only last.ckpt: the signal's
    path.write_text(yaml.safe_dump(config))
    args = ["--config", "cpu", "--config", str(path), *DDP, *SMALL, "--trainer.val_check_interval", "3"]
    stopped = fit(in_tmp, *args, "--trainer.max_steps", "3", "--trainer.callbacks+", "tests.test_ddp.SigtermRank0",
                  timeout=300)
    ended = time.time()
    assert stopped.returncode == 0, stopped.stderr[-3000:]  # both ranks stopped after the same step
    assert ended - float((in_tmp / "signalled-at").read_text()) < 30
    checkpoint = torch.load(in_tmp / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    resumed = fit(in_tmp, *args, "--trainer.max_steps", "3", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted, after = ranks(ddp_run), ranks(in_tmp)
    for rank in (0, 1):  # each rank's third step: the same prompts, the same samples, the same weights after
        assert after[rank]["steps"] == uninterrupted[rank]["steps"][2:]
        assert after[rank]["checksum"] == pytest.approx(uninterrupted[rank]["checksum"], rel=1e-6, abs=1e-6)
    # the tokens trained on carry on from the checkpoint's count
    resumed_log = scalars(sorted((in_tmp / "lightning_logs" / "cpu").glob("version_*"))[-1])
    assert resumed_log["train/num_tokens"] == scalars(ddp_run / "lightning_logs" / "cpu" / "version_0")[
        "train/num_tokens"][2:]
