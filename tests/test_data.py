from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmath.data import FEW_SHOT, GSM8K, DataError
from qmath.rewards import extract_hash_answer, parse_number, strict_format_reward
from qmath.rows import parse_row, read_file
from qmath.synthetic import TEMPLATES, make_splits, problems
from tests.conftest import SHARED_GSM8K


def test_synthetic_is_seeded_disjoint_and_well_formed():
    train, val = make_splits(300, 50, seed=3)
    assert (train, val) == make_splits(300, 50, seed=3)
    assert make_splits(300, 50, seed=4)[0] != train
    assert not {r["question"] for r in val} & {r["question"] for r in train}
    for row in train + val:
        truth = extract_hash_answer(row["answer"])
        assert truth is not None and parse_number(truth) == int(truth)
        # every step line is a true equation
        for line in row["answer"].splitlines()[:-1]:
            left, right = line.split(" = ")
            assert eval(left.replace("/", "//")) == int(right), line  # noqa: S307 - our own arithmetic text


def test_difficulty_shapes_training_only():
    default_train, default_val = make_splits(200, 40, seed=0)
    easy_train, easy_val = make_splits(200, 40, seed=0, train_mix=(1.0, 0.0, 0.0))
    assert easy_val == default_val  # the held-out benchmark stays fixed
    assert {len(r["answer"].splitlines()) for r in easy_train} == {2}  # one step line plus "#### N"
    assert {len(r["answer"].splitlines()) for r in default_train} == {2, 3, 4}
    with pytest.raises(ValueError, match="data.difficulty"):
        GSM8K(difficulty=(0.0, 0.0, 0.0))


def test_the_start_up_summary_names_a_training_mix_other_than_the_held_out_sets():
    from qmath.rows import Rows

    assert Rows(difficulty=(1.0, 0.0, 0.0)).describe("train") == "synthetic (1-, 2-, 3-step problems weighted 1/0/0)"
    assert Rows(difficulty=(0.5, 0.4, 0.1)).describe("train") == "synthetic"  # the held-out set's own mix
    assert Rows(difficulty=(1.0, 0.0, 0.0)).describe("validation") == "synthetic (held-out set)"
    assert GSM8K().hparams.difficulty == (1.0, 0.0, 0.0)  # what `python -m qmath fit` trains on (cpu.yaml's too)


def test_synthetic_covers_every_template_and_step_count():
    rows = [row for row, _ in zip(problems(0), range(2000))]
    steps = {len(row["answer"].splitlines()) - 1 for row in rows}
    assert steps == set(TEMPLATES)
    assert len({row["question"].split()[1] for row in rows}) > 5  # several templates, not one


def test_few_shot_examples_are_in_the_strict_format():
    assert strict_format_reward([s["response"] for s in FEW_SHOT]) == [0.5] * len(FEW_SHOT)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_jsonl_prompts_render_with_template_and_prefix(tiny_model, tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1:,}"} for i in range(998, 1018)]
    data = GSM8K(path=str(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer_name_or_path=str(tiny_model),
                 val_fraction=0.25, max_prompt_length=4096, batch_size=2)
    data.setup("fit")
    assert len(data.train_rows) == 15 and len(data.val_rows) == 5
    assert {r["question"] for r in data.train_rows}.isdisjoint({r["question"] for r in data.val_rows})
    assert "1000" in {r["answer"] for r in data.train_rows + data.val_rows}  # "1,000" parsed as 1000
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][:, -1].all()  # left padded
    text = data.tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert text.startswith("<|im_start|>system\nRespond in the following format")
    assert FEW_SHOT[0]["question"] in text and text.endswith("<|im_start|>assistant\n<reasoning>\n")
    assert batch["prefix"] == ["<reasoning>\n"] * 2


def test_long_prompts_are_dropped_and_counted(tiny_model, tmp_path, caplog):
    rows = [{"question": "Short?", "answer": "#### 1"}, {"question": "long " * 400 + "?", "answer": "#### 2"}]
    data = GSM8K(path=str(write_jsonl(tmp_path / "p.jsonl", rows)), val_path=str(write_jsonl(tmp_path / "v.jsonl",
                 rows[:1])), tokenizer_name_or_path=str(tiny_model), num_few_shot=0, max_prompt_length=200)
    data.setup("fit")
    assert [r["answer"] for r in data.train_rows] == ["1"]
    assert "Dropped 1 of 2 train prompts longer than data.max_prompt_length=200" in caplog.text
    too_short = GSM8K(path=str(tmp_path / "p.jsonl"), tokenizer_name_or_path=str(tiny_model), max_prompt_length=5)
    with pytest.raises(DataError, match="every train prompt is longer than data.max_prompt_length=5"):
        too_short.setup("fit")


BAD_ROWS = [
    ({"question": "q"}, "no text in column 'answer' (missing)"),
    ({"question": "q", "answer": "no marker"}, "the 'answer' has no '#### <number>' line"),
    ({"question": "q", "answer": "#### twelve"}, "the ground truth after '####' is not a number: 'twelve'"),
    ({"question": "  ", "answer": "#### 1"}, "the 'question' is empty"),
    ({"question": "q", "answer": ""}, "the 'answer' is empty"),
    ({"question": 5, "answer": "#### 1"}, "no text in column 'question'"),
    (["q", "#### 1"], "not a JSON object but list"),
]


@pytest.mark.parametrize(("row", "reason"), BAD_ROWS)
def test_each_bad_row_is_rejected_with_its_line_number_and_reason(tiny_model, tmp_path, row, reason):
    good = [{"question": f"What is {i}?", "answer": f"#### {i}"} for i in range(4)]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in good[:2]) + "\n\n" + json.dumps(row) + "\n"
                    + "\n".join(json.dumps(r) for r in good[2:]) + "\n")  # a blank line 3: the bad row is line 4
    data = GSM8K(path=str(path), tokenizer_name_or_path=str(tiny_model), num_few_shot=0)
    with pytest.raises(DataError, match=re.escape(f"mine.jsonl: of its 5 rows, 1 is invalid:\n  line 4: {reason}")) \
            as error:
        data.setup("fit")
    assert "or set data.strict: false to skip and count invalid rows" in str(error.value)


def test_strict_false_skips_and_counts_invalid_rows(tiny_model, tmp_path, caplog):
    rows = [{"question": f"What is {i}?", "answer": f"#### {i}"} for i in range(8)] + [r for r, _ in BAD_ROWS]
    rows.append(rows[0])  # a repeat
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    data = GSM8K(path=str(path), tokenizer_name_or_path=str(tiny_model), num_few_shot=0, strict=False,
                 val_fraction=0.25)
    data.setup("fit")
    assert data.skipped_rows == len(BAD_ROWS) + 2
    assert sorted(r["question"] for r in data.train_rows + data.val_rows) == [f"What is {i}?" for i in range(8)]
    assert f"Skipped {len(BAD_ROWS) + 2} of {len(rows) + 1} rows of {path} (data.strict is false)" in caplog.text
    assert "line 16: the same question as line 1" in caplog.text and "line 17: not valid JSON" in caplog.text


def test_files_that_cannot_be_used(tiny_model, tmp_path):
    def setup(name: str, content: str | bytes | None, **kw) -> None:
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        GSM8K(path=str(path), tokenizer_name_or_path=str(tiny_model), **kw).setup("fit")

    with pytest.raises(DataError, match="nope.jsonl does not exist; give a .jsonl, .json or .parquet file"):
        setup("nope.jsonl", None)
    with pytest.raises(DataError, match="neither JSONL, JSON nor Parquet"):
        setup("data.csv", "question,answer\n")
    with pytest.raises(DataError, match="empty.jsonl is empty"):
        setup("empty.jsonl", "")
    with pytest.raises(DataError, match="blank.jsonl has no rows"):
        setup("blank.jsonl", "\n\n")
    # CSV or binary content under a .jsonl name: every line is named, and nothing is usable
    with pytest.raises(DataError, match=r"of its 3 rows, none is usable:\n  line 1: not valid JSON"):
        setup("csv.jsonl", "question,answer\nWhat?,#### 1\nWho?,#### 2\n", strict=False)
    with pytest.raises(DataError, match="bytes.parquet could not be read as PARQUET"):
        setup("bytes.parquet", bytes(range(256)))
    with pytest.raises(DataError, match=r"has no column 'question' in any row \(its columns: \['prompt', "
                                        r"'solution'\]\); set data.question_column"):
        setup("renamed.jsonl", json.dumps({"prompt": "What?", "solution": "#### 1"}) + "\n")


def test_column_names_are_options(tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {i}?", "solution": f"#### {i}"} for i in range(9)])
    data = GSM8K(path=str(path), tokenizer_name_or_path=str(tiny_model), question_column="prompt",
                 answer_column="solution", num_few_shot=0)
    data.setup("fit")
    assert len(data.train_rows) + len(data.val_rows) == 9


def test_held_out_questions_seen_in_training_are_reported(tiny_model, tmp_path, caplog):
    rows = [{"question": f"What is {i}?", "answer": f"#### {i}"} for i in range(6)]
    data = GSM8K(path=str(write_jsonl(tmp_path / "t.jsonl", rows)), val_path=str(write_jsonl(tmp_path / "v.jsonl",
                 rows[4:])), tokenizer_name_or_path=str(tiny_model), num_few_shot=0)
    data.setup("fit")
    assert "2 held-out questions also appear in the training data" in caplog.text


def test_parquet_rows_are_numbered(tiny_model, tmp_path):
    import pandas as pd

    path = tmp_path / "p.parquet"
    pd.DataFrame([{"question": "A?", "answer": "#### 1"}, {"question": "B?", "answer": "none"}]).to_parquet(path)
    with pytest.raises(DataError, match="row 2: the 'answer' has no '#### <number>' line"):
        GSM8K(path=str(path), tokenizer_name_or_path=str(tiny_model)).setup("fit")


@pytest.mark.skipif(not SHARED_GSM8K.is_dir(), reason="the shared GSM8K copy is only on the project's machines")
def test_real_gsm8k_files(tiny_model):
    data = GSM8K(path=str(SHARED_GSM8K / "train.jsonl"), val_path=str(SHARED_GSM8K / "test.jsonl"), num_val=None,
                 tokenizer_name_or_path=str(tiny_model), max_prompt_length=100_000)
    data.setup("fit")
    assert (len(data.train_rows), len(data.val_rows)) == (7473, 1319)
    assert data.train_rows[0]["answer"] == "72"  # Natalia's clips
    assert all(parse_number(r["answer"]) is not None for r in data.train_rows + data.val_rows)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(st.text(max_size=5)), st.integers(), st.dictionaries(
    st.sampled_from(["question", "answer", "other"]),
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30),
              st.text(max_size=10).map(lambda t: t + "#### " + t)))))
def test_row_parser_accepts_or_explains(row):
    for truth_required in (True, False):
        try:
            parsed = parse_row(row, truth_required=truth_required)
        except DataError as error:
            assert str(error)  # a reason, which check() prefixes with the line number
        else:
            assert parsed["question"].strip()
            assert parsed["answer"] is None and not truth_required or parse_number(parsed["answer"]) is not None


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=40), st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
                          st.builds(lambda q, a: json.dumps({"question": q, "answer": a}), st.text(max_size=10),
                                    st.text(max_size=10).map(lambda t: "#### " + t))), max_size=8))
def test_jsonl_reader_on_arbitrary_lines_reads_or_explains(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    path.write_text("\n".join(lines).replace("\r", ""), encoding="utf-8", errors="surrogatepass")
    data = GSM8K(path=str(path), strict=False)
    try:
        rows = data.rows.check(read_file(str(path)), str(path))
    except DataError as error:
        assert str(path) in str(error)
    else:
        assert rows and all(r["question"].strip() and parse_number(r["answer"]) is not None for r in rows)


def test_hub_path_reads_the_named_config_and_splits(tiny_model, monkeypatch):
    import datasets

    calls = []
    rows = {split: [{"question": f"{split} {i}?", "answer": f"#### {i}"} for i in range(n)]
            for split, n in (("train", 6), ("test", 3))}

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = GSM8K(path="openai/gsm8k", name="main", num_val=None, tokenizer_name_or_path=str(tiny_model),
                 max_prompt_length=4096)
    data.setup("fit")
    assert calls == [("openai/gsm8k", "main")]
    assert [r["question"] for r in data.train_rows] == [f"train {i}?" for i in range(6)]
    assert [r["answer"] for r in data.val_rows] == ["0", "1", "2"]


def test_repeat_batch_sampler_repeats_and_resumes_mid_batch():
    import torch
    from torchdata.stateful_dataloader import StatefulDataLoader

    from qmath.samplers import RepeatBatchSampler, ShuffleSampler

    rows = list(range(10))

    def loader(seed):
        return StatefulDataLoader(rows, batch_sampler=RepeatBatchSampler(ShuffleSampler(rows, seed), 2, True, 3))

    whole = []
    full = loader(0)
    for _ in range(2):  # two epochs through one loader
        whole += [b.tolist() for b in full]
    assert len(whole) == 2 * 5 * 3
    assert all(whole[i] == whole[i + 1] == whole[i + 2] for i in range(0, 30, 3))  # each batch three times
    assert sorted(i for b in whole[:15:3] for i in b) == rows  # an epoch is a permutation
    assert whole[:15] != whole[15:]  # reshuffled per epoch

    first = loader(0)
    it = iter(first)
    head = [next(it).tolist() for _ in range(7)]  # stop in the middle of a batch's repeats
    state = first.state_dict()
    resumed = loader(123)  # a different seed: the state must carry the order
    resumed.load_state_dict(state)
    tail = [b.tolist() for b in resumed] + [b.tolist() for b in resumed]
    assert head + tail == whole
    assert isinstance(ShuffleSampler(rows), torch.utils.data.RandomSampler)  # Lightning shuffles it under DDP


def test_train_loader_serves_one_rollout_per_optimizer_step(tiny_model):
    from types import SimpleNamespace

    data = GSM8K(num_train=40, num_val=4, batch_size=2, num_few_shot=0, max_prompt_length=1024,
                 tokenizer_name_or_path=str(tiny_model))
    data.setup("fit")
    data.trainer = SimpleNamespace(world_size=1, accumulate_grad_batches=3, lightning_module=SimpleNamespace(
        hparams={"num_iterations": 2}))
    batches = [b["question"] for b in data.train_dataloader()]
    assert len(batches) == (40 // 6) * 6  # 6 rollouts of 3 micro-batches x 2 prompts, each served 3 x 2 times
    assert all(len(b) == 6 for b in batches)
    assert all(batches[i] == batches[i + k] for i in range(0, len(batches), 6) for k in range(6))
    # dynamic sampling's extra prompts are a function of the seed
    assert data.draw(3, seed=5)["question"] == data.draw(3, seed=5)["question"]
    assert data.draw(3, seed=5)["question"] != data.draw(3, seed=6)["question"]


def test_each_stage_prepares_its_own_rows_and_held_out_problems_are_all_kept(tiny_model, tmp_path):
    rows = [{"question": f"What is {i}?", "answer": f"#### {i}"} for i in range(30)]
    rows[2]["question"] = "long " * 400 + "?"
    train, held = write_jsonl(tmp_path / "t.jsonl", rows[10:]), write_jsonl(tmp_path / "h.jsonl", rows[:10])
    data = GSM8K(path=str(train), val_path=str(held), tokenizer_name_or_path=str(tiny_model), num_few_shot=0,
                 max_prompt_length=200, num_val=4, num_test=None)
    data.setup("validate")
    assert not data.train_rows and not data.test_rows  # nothing tokenised that validate does not use
    assert [r["answer"] for r in data.val_rows] == ["0", "1", "2", "3"]  # the long problem 2 is kept
    data.setup("test")
    assert [r["answer"] for r in data.test_rows] == [str(i) for i in range(10)]  # null: all of the held-out set
    data.setup("fit")
    assert len(data.train_rows) == 20
    assert data.describe("test") == str(held) and data.describe("train") == str(train)
    synthetic = GSM8K(tokenizer_name_or_path=str(tiny_model), num_train=10, num_val=3, num_test=5)
    synthetic.setup("test")
    assert len(synthetic.test_rows) == 5
    synthetic.setup("validate")
    assert [r["question"] for r in synthetic.val_rows] == [r["question"] for r in synthetic.test_rows[:3]]


def test_predict_rows_keep_order_and_take_optional_ground_truths(tiny_model, tmp_path):
    rows = [{"question": "A?", "answer": "#### 1,000", "id": 7}, {"question": "B?"}, {"question": "C?", "answer": "42"},
            {"question": "D?", "answer": None}]
    data = GSM8K(path=str(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer_name_or_path=str(tiny_model),
                 max_prompt_length=5)
    data.setup("predict")
    assert [(r["index"], r["answer"]) for r in data.predict_rows] == [(0, "1000"), (1, None), (2, "42"), (3, None)]
    assert data.predict_rows[0]["source"] == rows[0]  # the input's own columns travel to the output
    write_jsonl(tmp_path / "bad.jsonl", [{"question": "E?", "answer": "many"}])
    with pytest.raises(DataError, match="line 1: the 'answer' has no '#### <number>' line"):
        GSM8K(path=str(tmp_path / "bad.jsonl"), tokenizer_name_or_path=str(tiny_model)).setup("predict")


@pytest.mark.parametrize("key", ["num_val", "num_test"])
def test_held_out_sizes_are_checked(key):
    with pytest.raises(ValueError, match=f"data.{key} must be at least 1"):
        GSM8K(**{key: 0})
