"""GSM8K-style rows from a hub data set, a local JSONL, JSON or Parquet file, or the synthetic generator: read,
checked row by row (errors name the line), and split into training and held-out sets. No tokenising here: that is
the data module's."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qmath.errors import QMathError
from qmath.rewards import extract_hash_answer, parse_number
from qmath.synthetic import DEFAULT_MIX, make_splits

log = logging.getLogger(__name__)

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(QMathError, ValueError):
    """The data set cannot be used as it is; the message says which rows and what to change."""


@dataclass
class Rows:
    """The checked rows of one data source; the options are the data module's of the same names (see
    :class:`qmath.data.GSM8K`). ``skipped`` counts the invalid rows skipped with ``strict=False``."""

    path: str = "synthetic"
    name: str | None = None
    train_split: str = "train"
    val_split: str = "test"
    val_path: str | None = None
    val_fraction: float = 0.05
    num_train: int = 5000
    num_held_out: int = 200  # synthetic held-out problems to generate
    num_test: int | None = None  # predict on synthetic or hub data: the first num_test held-out problems
    difficulty: tuple[float, float, float] = DEFAULT_MIX
    seed: int = 0
    question_column: str = "question"
    answer_column: str = "answer"
    strict: bool = True
    skipped: int = 0

    def splits(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Checked ``{"question", "answer", "origin"}`` rows for training and the held-out set, not yet tokenised.

        A local file is checked whole before a held-out share is split off, so that a line number is the file's
        and a question repeated in the file cannot end up on both sides.
        """
        if self.path == "synthetic":
            train, held_out = make_splits(self.num_train, self.num_held_out, self.seed, tuple(self.difficulty))
            # generated: well formed by construction; a question may repeat with other numbers' luck
            return (self.check(list(enumerate(train, 1)), "synthetic", dedupe=False),
                    self.check(list(enumerate(held_out, 1)), "synthetic held-out set", dedupe=False))
        if self._is_file(self.path):
            train = self.check(read_file(self.path), self.path)
            if self.val_path:
                held_out = self.check(read_file(self.val_path), self.val_path)
                self._warn_overlap(train, held_out)
                return train, held_out
            generator = torch.Generator().manual_seed(self.seed)
            order = torch.randperm(len(train), generator=generator).tolist()
            n_val = max(1, round(len(train) * self.val_fraction))
            held = set(order[:n_val])
            return [r for i, r in enumerate(train) if i not in held], [train[i] for i in sorted(held)]
        dataset = self._load_hub()
        train = self.check(list(enumerate(dataset[self.train_split], 1)), f"{self.path} split {self.train_split}")
        held_out = self.check(list(enumerate(dataset[self.val_split], 1)), f"{self.path} split {self.val_split}")
        self._warn_overlap(train, held_out)
        return train, held_out

    def check(self, rows: list[tuple[int, Any]], source: str, truth_required: bool = True,
              dedupe: bool = True) -> list[dict[str, Any]]:
        """The usable rows of ``(line number, row)`` pairs; invalid ones are rejected or skipped (``strict``)."""
        if not rows:
            raise DataError(f"{source} has no rows")
        objects = [row for _, row in rows if isinstance(row, dict)]
        required = [self.question_column] + ([self.answer_column] if truth_required else [])
        for column in required:
            if objects and not any(column in row for row in objects):
                key = "question_column" if column == self.question_column else "answer_column"
                raise DataError(f"{source} has no column {column!r} in any row (its columns: "
                                f"{sorted({k for row in objects for k in row})}); set data.{key} to the column that "
                                "holds it, or rename the column")
        unit = "line" if source.lower().endswith(".jsonl") else "row"
        kept, invalid, first_seen = [], [], {}
        for line, row in rows:
            try:
                parsed = parse_row(row, self.question_column, self.answer_column, truth_required)
            except DataError as error:
                invalid.append(f"{unit} {line}: {error}")
                continue
            key = " ".join(parsed["question"].split())
            if dedupe and key in first_seen:
                invalid.append(f"{unit} {line}: the same question as {unit} {first_seen[key]}")
                continue
            first_seen.setdefault(key, line)
            kept.append({**parsed, "origin": line})
        if invalid:
            listing = "\n  ".join(invalid[:10]) + (f"\n  ... and {len(invalid) - 10} more" if len(invalid) > 10 else "")
            if self.strict or not kept:
                verb = "is" if len(invalid) == 1 else "are"
                what = "none is usable" if not kept else f"{len(invalid)} {verb} invalid"
                raise DataError(f"{source}: of its {len(rows)} row{'s' * (len(rows) != 1)}, {what}:\n  {listing}\n"
                                "Fix or remove them"
                                + (", or set data.strict: false to skip and count invalid rows" if kept else ""))
            log.warning("Skipped %d of %d rows of %s (data.strict is false):\n  %s", len(invalid), len(rows),
                        source, listing)
            self.skipped += len(invalid)
        return kept

    def _warn_overlap(self, train: list[dict[str, Any]], held_out: list[dict[str, Any]]) -> None:
        seen = {" ".join(r["question"].split()) for r in train}
        overlap = sum(" ".join(r["question"].split()) in seen for r in held_out)
        if overlap:
            log.warning("%d held-out questions also appear in the training data: their accuracy is not held out",
                        overlap)

    def download(self) -> None:
        """Fetch a hub data set into the cache (the data module's ``prepare_data``); files need nothing."""
        if self.path != "synthetic" and not self._is_file(self.path):
            self._load_hub()

    def _load_hub(self) -> Any:
        from datasets import load_dataset

        return load_dataset(self.path, self.name)

    @staticmethod
    def _is_file(path: str) -> bool:
        return Path(path).suffix.lower() in LOCAL_FORMATS or Path(path).expanduser().exists()

    def describe(self, split: str) -> str:
        """Where ``split`` (``train``, ``validation``, ``test`` or ``predict``) comes from, for the start-up summary."""
        if self.path == "synthetic":
            if split != "train":
                return "synthetic (held-out set)"
            if tuple(self.difficulty) == DEFAULT_MIX:
                return "synthetic"
            # the training mix differs from the held-out set's by default (cpu.yaml): say so where a run starts
            return f"synthetic (1-, 2-, 3-step problems weighted {'/'.join(f'{w:g}' for w in self.difficulty)})"
        if self._is_file(self.path):
            if split in ("train", "predict"):
                return self.path
            return self.val_path or f"{self.path} (a {self.val_fraction:.0%} held-out share, seed {self.seed})"
        split_name = self.train_split if split == "train" else self.val_split
        return f"{self.path}" + (f" ({self.name})" if self.name else "") + f", split {split_name}"

    def for_predict(self) -> list[dict[str, Any]]:
        """What ``predict`` answers, in order: every row of a local ``data.path``, else the held-out set."""
        if self.path != "synthetic" and self._is_file(self.path):  # every row, repeats included, in order
            return self.check(read_file(self.path), self.path, truth_required=False, dedupe=False)
        return self.splits()[1][: self.num_test]


def read_file(path: str) -> list[tuple[int, Any]]:
    """``(line or row number, row)`` pairs of a JSONL, JSON or Parquet file, numbered from 1 as an editor does."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data.path: {path} does not exist; give a .jsonl, .json or .parquet file, a hub id, "
                        "or 'synthetic'")
    builder = LOCAL_FORMATS.get(file.suffix.lower())
    if builder is None:
        raise DataError(f"data.path: {path} is neither JSONL, JSON nor Parquet (by its suffix); convert it, e.g. "
                        "with pandas' to_json(orient='records', lines=True)")
    if file.stat().st_size == 0:
        raise DataError(f"data.path: {path} is empty")
    if file.suffix.lower() == ".jsonl":  # read here, so that a broken line is named by its number
        rows = []
        # surrogateescape: a byte that is not UTF-8 becomes one marked character, so the line can be named
        with file.open(encoding="utf-8", errors="surrogateescape") as f:
            for number, line in enumerate(f, 1):
                bad = next((i for i, c in enumerate(line) if "\udc80" <= c <= "\udcff"), None)
                if bad is not None:
                    rows.append((number, _Unreadable(f"not UTF-8 text (byte 0x{ord(line[bad]) - 0xDC00:02x} at "
                                                     f"column {bad + 1}); save the file as UTF-8")))
                elif line.strip():
                    try:
                        rows.append((number, json.loads(line)))
                    except json.JSONDecodeError as error:
                        rows.append((number, _Unreadable(f"not valid JSON ({error.msg})")))
        return rows
    from datasets import load_dataset

    try:
        return list(enumerate(load_dataset(builder, data_files=str(file), split="train"), 1))
    except Exception as error:  # datasets' errors name its internals, not the file
        raise DataError(f"data.path: {path} could not be read as {builder.upper()}: {type(error).__name__}: "
                        f"{error}") from error


class _Unreadable:
    def __init__(self, reason: str) -> None:
        self.reason = reason


def parse_row(row: Any, question_column: str = "question", answer_column: str = "answer",
               truth_required: bool = True) -> dict[str, Any]:
    """``{"question", "answer"}`` of one row, the answer reduced to its ground truth; :class:`DataError` says why
    the row cannot be used. Without ``truth_required``, the answer may be missing (``None``) or a bare number."""
    if isinstance(row, _Unreadable):
        raise DataError(row.reason)
    if not isinstance(row, dict):
        raise DataError(f"not a JSON object but {type(row).__name__}")
    question, answer = row.get(question_column), row.get(answer_column)
    if not isinstance(question, str):
        raise DataError(f"no text in column {question_column!r}" + ("" if question_column in row else " (missing)"))
    if not question.strip():
        raise DataError(f"the {question_column!r} is empty")
    parsed = {"question": question} if truth_required else {"question": question, "source": row}
    if answer is None and not truth_required:
        return {**parsed, "answer": None}
    if not isinstance(answer, str | int | float) or isinstance(answer, bool):
        raise DataError(f"no text in column {answer_column!r}" + ("" if answer_column in row else " (missing)"))
    text = str(answer)
    if not text.strip():
        raise DataError(f"the {answer_column!r} is empty")
    truth = extract_hash_answer(text)
    if truth is None and not truth_required and parse_number(text) is not None:
        truth = text.strip().replace(",", "").replace("$", "")  # a bare number is a ground truth too
    if truth is None:
        raise DataError(f"the {answer_column!r} has no '#### <number>' line giving the ground truth")
    if parse_number(truth) is None:
        raise DataError(f"the ground truth after '####' is not a number: {truth!r}")
    return {**parsed, "answer": truth}

