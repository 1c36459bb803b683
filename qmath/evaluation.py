"""Held-out answers graded into records and metric values: one record schema for validation, test and predict.

Greedy answers (and, with ``maj_k``, k sampled answers per problem) come from :class:`qmath.generation.Sampler`;
grading is :mod:`qmath.metrics`. Rows marked ``padding`` only even out the ranks' batch counts
(:class:`qmath.samplers.PaddedDistributedSampler`) and are neither graded nor written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from qmath import memory
from qmath.generation import MAJ_K, seed_for
from qmath.metrics import grade, majority_vote, strict_answer
from qmath.rewards import parse_number
from qmath.stats import sampled_names


@dataclass
class Answer:
    """One graded answer. ``correct`` and ``correct_lenient`` are ``None`` when the row gives no ground truth."""

    index: int  # the row's position in its data set
    question: str
    completion: str
    extracted_answer: str | None  # the number in the last <answer> block
    ground_truth: str | None
    correct: bool | None  # strict: the number in <answer> equals the ground truth
    correct_lenient: bool | None  # the last number in the text equals it
    format: bool  # exactly <reasoning>\n…\n</reasoning>\n<answer>\n…\n</answer>
    completion_tokens: int
    prompt: str | None = None  # the prompt as the model saw it (predict only)

    def prediction(self) -> dict[str, Any]:
        """What ``predict`` writes after the row's own columns."""
        record = asdict(self)
        del record["question"]  # the row's own columns carry it, under its own column name
        return {"index": record.pop("index"), "prompt": record.pop("prompt"), **record}


def graded_rows(batch: dict[str, Any]) -> list[int]:
    """The rows of a held-out batch to grade: all but the padding that evens out the ranks' batch counts."""
    padding = batch.get("padding")
    return [i for i in range(len(batch["question"])) if padding is None or not bool(padding[i])]


def grade_batch(batch: dict[str, Any], texts: list[str], lengths: Tensor, samples: list[str] | None = None,
                k: int | None = None, prompts: list[str] | None = None) -> tuple[list[Answer], dict[str, Tensor]]:
    """The batch's graded answers, and the metric values of its graded rows (``accuracy_strict``,
    ``accuracy_lenient``, ``format_rate``, ``completions/mean_length``; with ``k`` samples per row,
    ``accuracy_mean@k``, ``accuracy_maj@k`` and ``pass@k``)."""
    rows = graded_rows(batch)
    truths = [batch["answer"][i] for i in rows]
    graded = grade([texts[i] for i in rows], truths)
    answers = [
        Answer(index=int(batch["index"][i]), question=batch["question"][i], completion=texts[i],
               extracted_answer=_text(strict_answer(texts[i])), ground_truth=truth,
               correct=strict if truth is not None else None, correct_lenient=lenient if truth is not None else None,
               format=fmt, completion_tokens=int(lengths[i]), prompt=prompts[i] if prompts else None)
        for i, truth, strict, lenient, fmt in zip(rows, truths, graded["accuracy_strict"], graded["accuracy_lenient"],
                                                  graded["format_rate"])
    ]
    if not rows:  # every metric still updated (with nothing): each rank's metric syncs must pair up with its peers'
        names = [*graded, "completions/mean_length"] + (sampled_names(k) if k else [])
        return answers, {name: torch.zeros(0) for name in names}
    values = {name: torch.tensor(v, dtype=torch.float) for name, v in graded.items()}
    values["completions/mean_length"] = lengths[rows].float()
    if k:
        numbers = [parse_number(t) for t in truths]
        picked = [[strict_answer(s) for s in samples[i * k:(i + 1) * k]] for i in rows]
        votes = [majority_vote(p) for p in picked]
        # the share of samples that are right: the sampled accuracy that training's correctness reward sees
        values[f"accuracy_mean@{k}"] = torch.tensor([sum(a is not None and a == n for a in p) / k
                                                     for n, p in zip(numbers, picked)], dtype=torch.float)
        values[f"accuracy_maj@{k}"] = torch.tensor([v is not None and v == n for v, n in zip(votes, numbers)],
                                                   dtype=torch.float)
        values[f"pass@{k}"] = torch.tensor([n is not None and n in p for n, p in zip(numbers, picked)],
                                           dtype=torch.float)
    return answers, values


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


class HeldOutEvaluation:
    """The LightningModule hooks of validation, test and predict: greedy answers of the held-out problems from the
    module's ``sampler`` (and with ``hparams.maj_k`` a majority vote of sampled ones), graded into ``val_metrics``,
    ``test_metrics`` and ``val_records``, or into prediction records."""

    def on_validation_epoch_start(self) -> None:
        self.val_records = []

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluate(batch, batch_idx, self.val_metrics, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluate(batch, batch_idx, self.test_metrics, "test")

    def answer(self, batch: dict[str, Any], samples: int = 0, seed: int = 0) -> tuple[list[str], Tensor]:
        """Greedy completions of the batch's prompts (or ``samples`` sampled ones each, seeded), and their lengths."""
        return self.sampler.answer(batch, samples, seed)

    def evaluate(self, batch: dict[str, Any], batch_idx: int, metrics: torch.nn.ModuleDict, stage: str) -> None:
        """Grade greedy answers (and, with ``maj_k``, a majority vote of samples); update and log ``metrics``."""
        memory.at(self.trainer.global_step, stage)
        texts, lengths = self.answer(batch)
        k = self.hparams.maj_k
        # seeded by (seed, batch, rank), so that an evaluation repeats exactly
        samples = self.answer(batch, k, seed_for(batch_idx, self.global_rank, stream=MAJ_K))[0] if k else None
        answers, values = grade_batch(batch, texts, lengths, samples, k)
        self.val_records += answers
        for name, value in values.items():
            metrics[name].update(value.to(self.device))
            # the metric object, not a tensor: Lightning computes it once per epoch, summed over every rank
            self.log(f"{stage}/{name}", metrics[name], on_step=False, on_epoch=True,
                     prog_bar=name in ("accuracy_strict", "format_rate"), batch_size=max(1, len(answers)))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Greedy answers, one record per problem; :class:`qmath.callbacks.WritePredictions` writes them in order."""
        texts, lengths = self.answer(batch)
        prompts = self.tokenizer.batch_decode([ids[m.bool()] for ids, m in zip(batch["input_ids"],
                                                                               batch["attention_mask"])])
        return [a.prediction() for a in grade_batch(batch, texts, lengths, prompts=prompts)[0]]
