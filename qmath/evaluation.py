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

from qmath.metrics import grade, majority_vote, strict_answer
from qmath.rewards import parse_number


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
    ``accuracy_maj@k`` and ``pass@k``)."""
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
        names = [*graded, "completions/mean_length"] + ([f"accuracy_maj@{k}", f"pass@{k}"] if k else [])
        return answers, {name: torch.zeros(0) for name in names}
    values = {name: torch.tensor(v, dtype=torch.float) for name, v in graded.items()}
    values["completions/mean_length"] = lengths[rows].float()
    if k:
        numbers = [parse_number(t) for t in truths]
        picked = [[strict_answer(s) for s in samples[i * k:(i + 1) * k]] for i in rows]
        votes = [majority_vote(p) for p in picked]
        values[f"accuracy_maj@{k}"] = torch.tensor([v is not None and v == n for v, n in zip(votes, numbers)],
                                                   dtype=torch.float)
        values[f"pass@{k}"] = torch.tensor([n is not None and n in p for n, p in zip(numbers, picked)],
                                           dtype=torch.float)
    return answers, values


def _text(value: Any) -> str | None:
    return None if value is None else str(value)
