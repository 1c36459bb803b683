import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmath.rewards import (
    FunctionReward,
    RewardError,
    correctness_reward,
    default_rewards,
    extract_hash_answer,
    extract_xml_answer,
    int_reward,
    last_number,
    parse_number,
    score,
    soft_format_reward,
    strict_format_reward,
    xmlcount_reward,
)

GOOD = "<reasoning>\nFirst, 2 * 3 = 6.\nThen 6 + 1 = 7.\n</reasoning>\n<answer>\n7\n</answer>"


def test_multiline_reasoning_passes_strict_and_soft():
    assert strict_format_reward([GOOD]) == [0.5]
    assert strict_format_reward([GOOD + "\n"]) == [0.5]
    assert soft_format_reward([GOOD]) == [0.5]
    assert xmlcount_reward([GOOD]) == [0.5]


@pytest.mark.parametrize(
    "text",
    [
        "<reasoning>\nx\n</reasoning>\n<answer>\n7\n</answer>\nThe answer is 7.",  # text after </answer>
        "<reasoning>\nx\n</reasoning>\n<answer>\n7\n</answer>\n<answer>\n8\n</answer>",  # two answers
        "<reasoning>x</reasoning><answer>7</answer>",  # no newlines
        "<reasoning>\nx\n</reasoning>\n7",  # no answer tags
        "The answer is 7",
    ],
)
def test_strict_format_rejects(text):
    assert strict_format_reward([text]) == [0.0]


def test_soft_format_tolerates_spacing_and_trailing_text_but_needs_both_blocks():
    assert soft_format_reward(["<reasoning>a\n\nb</reasoning>\n\n<answer> 7 </answer> and more"]) == [0.5]
    assert soft_format_reward(["<answer>7</answer>", "<reasoning>only</reasoning>", ""]) == [0.0, 0.0, 0.0]


def test_xmlcount_partial_tags_and_trailing_penalty():
    assert xmlcount_reward(["<reasoning>\nonly reasoning\n</reasoning>\n"]) == [0.25]
    trailing = GOOD + "\n" + "x" * 10
    assert xmlcount_reward([trailing]) == [pytest.approx(0.5 - 0.010)]
    assert xmlcount_reward(["nothing"]) == [0.0]


def test_correctness_compares_numbers():
    completions = [
        "<reasoning>\n..\n</reasoning>\n<answer>\n1,000\n</answer>",
        "<reasoning>\n..\n</reasoning>\n<answer>\n$-12\n</answer>",
        "<reasoning>\n..\n</reasoning>\n<answer>\n12\n</answer>",
        "<reasoning>\nno answer tag, but 5\n</reasoning>",
        "<answer>\n7.0\n</answer>",
    ]
    assert correctness_reward(completions, answer=["1000", "-12", "-12", "5", "7"]) == [2.0, 2.0, 0.0, 0.0, 2.0]


def test_int_reward():
    assert int_reward(["<answer>\n-4\n</answer>", "<answer>\n12,345\n</answer>", "<answer>\n4.5\n</answer>",
                       "<answer>\nfour\n</answer>", "<answer>\n\n</answer>"]) == [0.5, 0.5, 0.0, 0.0, 0.0]


def test_ground_truth_and_number_parsing():
    assert extract_hash_answer("Natalia sold 48+24 = 72 clips.\n#### 72") == "72"
    assert extract_hash_answer("a\n#### $1,250") == "1250"
    assert extract_hash_answer("#### -3") == "-3"
    assert parse_number("1,000") == parse_number("1000.0") == parse_number("$1000.")
    assert parse_number("") is None and parse_number("12 apples") is None
    assert last_number("pay $3, then 4 more: 7.") == parse_number("7")
    assert extract_xml_answer("<answer>\n1\n</answer><answer>\n2\n</answer>") == "2"


def test_score_names_the_failing_reward_and_a_sample():
    def boom(completions, **_):
        raise KeyError("gold")

    with pytest.raises(RewardError, match=r"'boom'.*KeyError.*\n.*hello"):
        score([FunctionReward(boom)], ["hello"], {})
    with pytest.raises(RewardError, match="returned 1 values for 2"):
        score([FunctionReward(lambda completions, **_: [1.0], name="short")], ["a", "b"], {})
    for bad in (float("nan"), float("inf"), None, "1"):
        with pytest.raises(RewardError, match="returned"):
            score([FunctionReward(lambda completions, bad=bad, **_: [bad], name="bad")], ["a"], {})


def test_reward_errors_zero_scores_and_counts_the_failures():
    def boom(completions, **_):
        raise KeyError("gold")

    rewards = [FunctionReward(boom), FunctionReward(lambda completions, **_: [1.0], name="short"),
               FunctionReward(lambda completions, **_: [float("inf"), None, 0.5], name="shaky"),
               FunctionReward(int_reward, "int")]
    errors: dict[str, int] = {}
    texts = ["<answer>\n1\n</answer>", "x", "y"]
    scores = score(rewards, texts, {}, on_error="zero", errors=errors)
    assert scores == [[0.0] * 3, [0.0] * 3, [0.0, 0.0, 0.5], [0.5, 0.0, 0.0]]
    assert errors == {"boom": 3, "short": 3, "shaky": 2}
    with pytest.raises(RewardError, match="or set model.reward_errors: zero"):
        score(rewards, texts, {})
    with pytest.raises(ValueError, match="model.reward_errors must be 'raise' or 'zero'"):
        score(rewards, texts, {}, on_error="ignore")


def test_function_reward_from_import_path():
    reward = FunctionReward("qmath.rewards.int_reward", weight=2.0)
    assert reward.name == "int" and reward.weight == 2.0
    assert reward(["<answer>\n3\n</answer>"]) == [0.5]
    with pytest.raises(ValueError, match="cannot import"):
        FunctionReward("qmath.rewards.nope")


ALLOWED = {"soft_format": {0.0, 0.5}, "strict_format": {0.0, 0.5}, "int": {0.0, 0.5}, "correctness": {0.0, 2.0}}
tags = st.sampled_from(["<reasoning>", "</reasoning>", "<answer>", "</answer>", "\n", "1,000", "-7", "$", "####"])
texts = st.lists(st.one_of(st.text(max_size=20), tags), max_size=12).map("".join)


@given(texts, st.text(max_size=10))
def test_rewards_never_raise_and_stay_in_their_documented_sets(text, truth):
    for reward in default_rewards():
        (value,) = reward([text], answer=[truth])
        assert isinstance(value, float) and math.isfinite(value)
        if reward.name == "xmlcount":
            assert value <= 0.5 and round(value * 1000) == pytest.approx(value * 1000)
        else:
            assert value in ALLOWED[reward.name]


@given(texts)
def test_extraction_never_raises(text):
    assert isinstance(extract_xml_answer(text), str)
    assert extract_hash_answer(text) is None or isinstance(extract_hash_answer(text), str)
    parse_number(text)
    last_number(text)
