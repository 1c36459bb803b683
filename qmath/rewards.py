"""Reward functions for the `<reasoning>…</reasoning><answer>…</answer>` GSM8K format.

Each reward is a pure function with TRL's signature, ``(completions, **columns) -> list[float]``: ``completions`` is a
list of strings (the response prefix already prepended) and dataset columns such as ``answer`` arrive as keyword
lists of the same length. The scores are those of the widely used GSM8K GRPO demo, with its two known bugs fixed:
the format regexes use DOTALL so multi-line reasoning matches, and correctness compares numbers, so ``1,000``
equals ``1000`` and negative answers count.

A user adds a reward by subclassing :class:`Reward` (or wrapping any function with :class:`FunctionReward`) and
naming it by ``class_path`` under ``model.rewards`` in YAML.
"""

from __future__ import annotations

import math
import re
import traceback
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from qmath.errors import ConfigError, QMathError

SYSTEM_PROMPT = """Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>"""

# A tag may not appear inside a section, so that two <answer> blocks can't pass as one strict answer.
_BODY = r"(?:(?!</?reasoning>|</?answer>).)+?"
_STRICT = re.compile(rf"^<reasoning>\n{_BODY}\n</reasoning>\n<answer>\n{_BODY}\n</answer>\n?$", re.DOTALL)
_SOFT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_INTEGER = re.compile(r"^-?\d{1,3}(?:,\d{3})+$|^-?\d+$")


def extract_xml_answer(text: str) -> str:
    """The text between the last ``<answer>`` and the following ``</answer>``, stripped.

    >>> extract_xml_answer("<reasoning>\\n2+2\\n</reasoning>\\n<answer>\\n 4 \\n</answer>")
    '4'
    >>> extract_xml_answer("no tags at all")
    'no tags at all'
    """
    return text.split("<answer>")[-1].split("</answer>")[0].strip()


def parse_number(text: str | None) -> Decimal | None:
    """The number written in ``text`` (``$``, ``,`` and a trailing ``.`` ignored), or ``None`` if it is not one.

    >>> parse_number("$1,000.")
    Decimal('1000')
    >>> parse_number("-7.50"), parse_number("seven")
    (Decimal('-7.5'), None)
    """
    if text is None:
        return None
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    if not re.fullmatch(r"-?\d+(?:\.\d+)?", cleaned):
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
        return None
    # normalize() would write 1250 as 1.25E+3; keep integers integral.
    return value.to_integral_value() if value == value.to_integral_value() else value.normalize()


def extract_hash_answer(text: str) -> str | None:
    """GSM8K's ground truth: what follows the last ``#### `` in a solution, with ``,`` and ``$`` removed.

    >>> extract_hash_answer("Natalia sold 48/2 = 24 clips.\\n#### 1,000")
    '1000'
    >>> extract_hash_answer("no marker") is None
    True
    """
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "")


def last_number(text: str) -> Decimal | None:
    """The last number anywhere in ``text``; the lenient way to read an answer.

    >>> last_number("so she has 3 apples and pays $1,250.")
    Decimal('1250')
    """
    matches = _NUMBER.findall(text)
    return parse_number(matches[-1]) if matches else None


def xmlcount_reward(completions: Sequence[str], **_: Any) -> list[float]:
    """0.125 for each of the four tags written once, minus 0.001 per character after the closing answer.

    >>> xmlcount_reward(["<reasoning>\\nx\\n</reasoning>\\n<answer>\\n1\\n</answer>", "<reasoning>\\nx"])
    [0.5, 0.125]
    >>> xmlcount_reward(["<reasoning>\\nx\\n</reasoning>\\n<answer>\\n1\\n</answer>\\nabc"])
    [0.497]
    """
    return [_count_xml(text) for text in completions]


def _count_xml(text: str) -> float:
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
    if text.count("\n</answer>") == 1:
        count += 0.125
        # One newline after the closing tag is fine; anything more is rambling the model should learn to stop.
        trailing = text.split("\n</answer>")[-1]
        count -= max(len(trailing) - (1 if trailing.startswith("\n") else 0), 0) * 0.001
    return round(count, 6)


def strict_format_reward(completions: Sequence[str], **_: Any) -> list[float]:
    """0.5 when the whole completion is exactly ``<reasoning>\\n…\\n</reasoning>\\n<answer>\\n…\\n</answer>``.

    >>> strict_format_reward(["<reasoning>\\nline 1\\nline 2\\n</reasoning>\\n<answer>\\n3\\n</answer>\\n",
    ...                       "<answer>3</answer>"])
    [0.5, 0.0]
    """
    return [0.5 if _STRICT.match(text) else 0.0 for text in completions]


def soft_format_reward(completions: Sequence[str], **_: Any) -> list[float]:
    """0.5 when the completion starts with a reasoning block followed by an answer block, spacing free.

    >>> soft_format_reward(["<reasoning>a\\nb</reasoning> <answer>3</answer> trailing", "I think 3"])
    [0.5, 0.0]
    """
    return [0.5 if _SOFT.match(text) else 0.0 for text in completions]


def int_reward(completions: Sequence[str], **_: Any) -> list[float]:
    """0.5 when the extracted answer is an integer (a sign and thousands commas allowed).

    >>> int_reward(["<answer>\\n-12\\n</answer>", "<answer>\\n1,000\\n</answer>", "<answer>\\n1.5\\n</answer>"])
    [0.5, 0.5, 0.0]
    """
    return [0.5 if _INTEGER.match(extract_xml_answer(text)) else 0.0 for text in completions]


def correctness_reward(completions: Sequence[str], answer: Sequence[str], **_: Any) -> list[float]:
    """2.0 when the extracted answer equals the ground truth as a number.

    >>> correctness_reward(["<answer>\\n1,000\\n</answer>", "<answer>\\n-3\\n</answer>", "<answer>\\n</answer>"],
    ...                    answer=["1000", "-3", "0"])
    [2.0, 2.0, 0.0]
    """
    scores = []
    for text, truth in zip(completions, answer, strict=True):
        guess, expected = parse_number(extract_xml_answer(text)), parse_number(truth)
        scores.append(2.0 if guess is not None and guess == expected else 0.0)
    return scores


class Reward:
    """A named, weighted reward. Subclass it and implement :meth:`__call__`, or use :class:`FunctionReward`.

    Args:
        name: the name under which the reward is logged, as ``rewards/<name>/mean``.
        weight: the factor applied to the score before the components are summed into ``reward``.
    """

    def __init__(self, name: str, weight: float = 1.0) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(f"reward name {name!r} must be letters, digits, '_', '.' or '-': it names a metric")
        self.name = name
        self.weight = weight

    def __call__(self, completions: Sequence[str], **columns: Any) -> list[float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, weight={self.weight})"


class FunctionReward(Reward):
    """A reward from a function ``(completions, **columns) -> list[float]``.

    Args:
        function: the function, or its import path such as ``"qmath.rewards.int_reward"``.
        name: the logged name; defaults to the function's name without a ``_reward`` suffix.
        weight: the factor applied to the score before the components are summed into ``reward``.
    """

    def __init__(self, function: Callable[..., list[float]] | str, name: str | None = None, weight: float = 1.0):
        if isinstance(function, str):
            function = _import(function)
        self.function = function
        super().__init__(name or function.__name__.removesuffix("_reward").removesuffix("_func"), weight)

    def __call__(self, completions: Sequence[str], **columns: Any) -> list[float]:
        # By keyword, as TRL calls rewards, so functions written for TRL's signature order work unchanged.
        return self.function(completions=completions, **columns)


def _import(path: str) -> Callable[..., list[float]]:
    import importlib

    module, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"cannot import reward function {path!r}: {error}") from error


def default_rewards() -> list[Reward]:
    """The five GSM8K components, in the order they are logged."""
    return [
        FunctionReward(xmlcount_reward, "xmlcount"),
        FunctionReward(soft_format_reward, "soft_format"),
        FunctionReward(strict_format_reward, "strict_format"),
        FunctionReward(int_reward, "int"),
        FunctionReward(correctness_reward, "correctness"),
    ]


class RewardError(QMathError, RuntimeError):
    """A reward function failed or returned something other than one finite float per completion."""

    every_rank = False  # a rank's own completions: the rank that met it says it


def score(
    rewards: Sequence[Reward],
    completions: Sequence[str],
    columns: dict[str, Sequence[Any]],
    on_error: str = "raise",
    errors: dict[str, int] | None = None,
) -> list[list[float]]:
    """Run every reward on the completions; one list of raw (unweighted) scores per reward.

    A reward that raises, returns the wrong count, or returns a value that is not a finite number is a
    :class:`RewardError` naming the reward and a sample completion (``on_error="raise"``), or scores the affected
    completions 0 and adds their count to ``errors[reward.name]`` (``on_error="zero"``).

    >>> errors = {}
    >>> score([FunctionReward(lambda completions, **_: [1.0, float("nan")], "shaky")], ["a", "b"], {}, "zero", errors)
    [[1.0, 0.0]]
    >>> errors
    {'shaky': 1}
    """
    if on_error not in ("raise", "zero"):
        raise ConfigError(f"model.reward_errors must be 'raise' or 'zero', got {on_error!r}")
    results = []
    for reward in rewards:
        try:
            values = reward(list(completions), **columns)
            if values is None or len(values) != len(completions):
                count = "None" if values is None else len(values)
                raise RewardError(f"reward {reward.name!r} returned {count} values for {len(completions)} completions")
        except Exception as error:
            if on_error == "zero":
                _count(errors, reward.name, len(completions))
                results.append([0.0] * len(completions))
                continue
            if isinstance(error, RewardError):
                raise
            raise RewardError(
                f"reward {reward.name!r} raised {type(error).__name__}: {error}{_where(error)}\n"
                f"on completion: {completions[0][:200]!r}\nFix the reward function, remove it from model.rewards, "
                "or set model.reward_errors: zero to score such completions 0 and count them."
            ) from error
        results.append(_checked(reward.name, values, completions, on_error, errors))
    return results


def _checked(name: str, values: Sequence[Any], completions: Sequence[str], on_error: str,
             errors: dict[str, int] | None) -> list[float]:
    """A reward's values as floats; one that is not a finite number is an error, or 0 and counted."""
    scores = []
    for value, text in zip(values, completions):
        if not isinstance(value, int | float) or not math.isfinite(value):
            if on_error == "raise":
                raise RewardError(
                    f"reward {name!r} returned {value!r} on completion: {text[:200]!r}\n"
                    "Rewards must be finite numbers; fix the reward function, or set model.reward_errors: zero "
                    "to score such completions 0 and count them."
                )
            _count(errors, name, 1)
            value = 0.0
        scores.append(float(value))
    return scores


def _where(error: BaseException) -> str:
    """Where in the reward's code it raised (the innermost frame), since the message replaces the traceback."""
    frames = traceback.extract_tb(error.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno}, in {frames[-1].name})" if frames else ""


def _count(errors: dict[str, int] | None, name: str, n: int) -> None:
    if errors is not None:
        errors[name] = errors.get(name, 0) + n
