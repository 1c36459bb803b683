"""A seeded generator of GSM8K-style word problems with integer answers.

Each problem has one to three arithmetic steps. The solution text is written the way GSM8K writes it: one line per
step with the calculation, then ``#### <answer>``. The same seed always gives the same problems.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

NAMES = ["Ava", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jack", "Kofi", "Lena", "Mateo",
         "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "cards", "shells", "balloons"]
FRIENDS = ["her brother", "his sister", "a friend", "a neighbour", "the teacher", "a classmate"]

Problem = tuple[str, list[str], int]


def _add(r: random.Random) -> Problem:
    name, item, a, b = r.choice(NAMES), r.choice(ITEMS), r.randint(3, 60), r.randint(2, 40)
    return (f"{name} has {a} {item}. Then {name} gets {b} more {item}. How many {item} does {name} have now?",
            [f"{a} + {b} = {a + b}"], a + b)


def _sub(r: random.Random) -> Problem:
    name, item, friend = r.choice(NAMES), r.choice(ITEMS), r.choice(FRIENDS)
    a = r.randint(10, 90)
    b = r.randint(1, a - 1)
    return (f"{name} had {a} {item} and gave {b} of them to {friend}. How many {item} does {name} have left?",
            [f"{a} - {b} = {a - b}"], a - b)


def _mul(r: random.Random) -> Problem:
    name, item, a, b = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 12), r.randint(2, 12)
    return (f"{name} buys {a} bags of {item}. Each bag has {b} {item}. How many {item} does {name} buy?",
            [f"{a} * {b} = {a * b}"], a * b)


def _div(r: random.Random) -> Problem:
    item, n, each = r.choice(ITEMS), r.randint(2, 9), r.randint(2, 15)
    total = n * each
    return (f"{total} {item} are shared equally among {n} children. How many {item} does each child get?",
            [f"{total} / {n} = {each}"], each)


def _wage(r: random.Random) -> Problem:
    name, rate, hours = r.choice(NAMES), r.randint(8, 30), r.randint(2, 10)
    return (f"{name} earns ${rate} per hour and works {hours} hours. How many dollars does {name} earn?",
            [f"{rate} * {hours} = {rate * hours}"], rate * hours)


def _add_mul(r: random.Random) -> Problem:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b, c = r.randint(2, 30), r.randint(2, 6), r.randint(2, 10)
    return (f"{name} has {a} {item} and buys {b} packs with {c} {item} in each pack. "
            f"How many {item} does {name} have now?",
            [f"{b} * {c} = {b * c}", f"{a} + {b * c} = {a + b * c}"], a + b * c)


def _give_buy(r: random.Random) -> Problem:
    name, item, friend = r.choice(NAMES), r.choice(ITEMS), r.choice(FRIENDS)
    a = r.randint(10, 60)
    b, c = r.randint(1, a - 1), r.randint(2, 30)
    return (f"{name} has {a} {item}. {name} gives {b} to {friend} and then buys {c} more. "
            f"How many {item} does {name} have now?",
            [f"{a} - {b} = {a - b}", f"{a - b} + {c} = {a - b + c}"], a - b + c)


def _change(r: random.Random) -> Problem:
    name, item = r.choice(NAMES), r.choice(ITEMS[:6])
    n, price = r.randint(2, 8), r.randint(1, 9)
    bill = r.choice([b for b in (10, 20, 50, 100) if b >= n * price])
    return (f"{name} buys {n} {item} at ${price} each and pays with a ${bill} bill. How many dollars of change does "
            f"{name} get?", [f"{n} * {price} = {n * price}", f"{bill} - {n * price} = {bill - n * price}"],
            bill - n * price)


def _pages(r: random.Random) -> Problem:
    name = r.choice(NAMES)
    a = r.randint(5, 30)
    b = r.randint(1, 2 * a - 1)
    tue, wed = 2 * a, 2 * a - b
    return (f"{name} reads {a} pages on Monday, twice as many pages on Tuesday, and {b} fewer pages on Wednesday "
            f"than on Tuesday. How many pages does {name} read in the three days?",
            [f"{a} * 2 = {tue}", f"{tue} - {b} = {wed}", f"{a} + {tue} + {wed} = {a + tue + wed}"], a + tue + wed)


def _boxes(r: random.Random) -> Problem:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    per, boxes = r.randint(3, 12), r.randint(2, 9)
    used = r.randint(1, per * boxes - 1)
    return (f"A box holds {per} {item}. {name} fills {boxes} boxes and then uses {used} of the {item}. "
            f"How many {item} are left?",
            [f"{per} * {boxes} = {per * boxes}", f"{per * boxes} - {used} = {per * boxes - used}"],
            per * boxes - used)


TEMPLATES: dict[int, list[Callable[[random.Random], Problem]]] = {
    1: [_add, _sub, _mul, _div, _wage],
    2: [_add_mul, _give_buy, _change, _boxes],
    3: [_pages],
}


DEFAULT_MIX = (0.5, 0.4, 0.1)
"""Weights of 1-, 2- and 3-step problems: the held-out set's mix (``make_splits``' training default; the data module's
is one-step problems only)."""


def problems(seed: int, steps_weights: tuple[float, ...] = DEFAULT_MIX) -> Iterator[dict[str, str]]:
    """Endless GSM8K-style rows ``{"question", "answer"}``; ``steps_weights`` weighs problems of 1, 2 and 3 steps."""
    r = random.Random(seed)
    steps = list(TEMPLATES)[: len(steps_weights)]
    while True:
        template = r.choice(TEMPLATES[r.choices(steps, weights=steps_weights)[0]])
        question, lines, answer = template(r)
        yield {"question": question, "answer": "\n".join(lines) + f"\n#### {answer}"}


def make_splits(
    num_train: int, num_val: int, seed: int, train_mix: tuple[float, ...] = DEFAULT_MIX
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Disjoint train and held-out sets: no held-out question appears, word for word, in the train set.

    ``train_mix`` weighs 1-, 2- and 3-step problems in the training set only. The held-out set always uses
    :data:`DEFAULT_MIX`, so that accuracies stay comparable between runs with different training mixes.
    """
    val: list[dict[str, str]] = []
    seen: set[str] = set()
    for row in problems(seed + 1_000_003, DEFAULT_MIX):
        if len(val) == num_val:
            break
        if row["question"] not in seen:
            seen.add(row["question"])
            val.append(row)
    train = []
    for row in problems(seed, train_mix):
        if len(train) == num_train:
            break
        if row["question"] not in seen:
            train.append(row)
    return train, val
