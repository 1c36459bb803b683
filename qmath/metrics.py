"""How a GSM8K answer is graded: strict (the number in ``<answer>``), lenient (the last number), format, majority vote.

Pure functions of the texts and the ground truths, so the numbers logged as ``val/*`` and ``test/*`` and written by
``predict`` are graded by one piece of code. The module turns them into torchmetrics ``MeanMetric`` updates, which
sum over every rank before they are logged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from decimal import Decimal

from qmath.rewards import extract_xml_answer, last_number, parse_number, strict_format_reward

GRADES = ("accuracy_strict", "accuracy_lenient", "format_rate")


def strict_answer(text: str) -> Decimal | None:
    """The number inside the last ``<answer>`` block, or ``None``: what ``accuracy_strict`` compares.

    >>> strict_answer("<reasoning>\\n2 + 2\\n</reasoning>\\n<answer>\\n4\\n</answer>"), strict_answer("It is 4.")
    (Decimal('4'), None)
    """
    if "<answer>" not in text:
        return None
    return parse_number(extract_xml_answer(text))


def grade(completions: Sequence[str], truths: Sequence[str | Decimal | None]) -> dict[str, list[bool]]:
    """Per completion: ``accuracy_strict``, ``accuracy_lenient`` and ``format_rate`` (the strict format).

    A ground truth of ``None`` (no answer given) is never matched.

    >>> graded = grade(["<reasoning>\\nx\\n</reasoning>\\n<answer>\\n1,000\\n</answer>", "so 12 - 5 = 7",
    ...                 "<answer>7</answer>"], ["1000", "7", "8"])
    >>> graded["accuracy_strict"], graded["accuracy_lenient"], graded["format_rate"]
    ([True, False, False], [True, True, False], [True, False, False])
    """
    expected = [t if isinstance(t, Decimal) else parse_number(t) for t in truths]
    if len(expected) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(expected)} ground truths")
    return {
        "accuracy_strict": [e is not None and strict_answer(c) == e for c, e in zip(completions, expected)],
        "accuracy_lenient": [e is not None and last_number(c) == e for c, e in zip(completions, expected)],
        "format_rate": [score > 0 for score in strict_format_reward(completions)],
    }


def majority_vote(answers: Sequence[Decimal | None]) -> Decimal | None:
    """The most common answer that is not ``None``; a tie goes to the one that came first (maj@k's vote).

    >>> majority_vote([None, Decimal(3), Decimal(5), Decimal(5), Decimal(3)]), majority_vote([None, None])
    (Decimal('3'), None)
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)
