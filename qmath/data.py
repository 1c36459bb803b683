"""GSM8K prompts for GRPO: from the hub, a local file, or the synthetic generator.

Each row becomes a chat prompt ``[system, few-shot turns…, question]`` rendered with the tokenizer's chat template,
followed by an optional response prefix such as ``<reasoning>\\n``. The prefix is the start of the model's answer:
it is fed as prompt tokens, and prepended to the generated text before rewards score it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import BatchSampler

from qmath.models import EMBEDDED_MODEL, load_tokenizer
from qmath.rewards import SYSTEM_PROMPT, extract_hash_answer, parse_number
from qmath.synthetic import DEFAULT_MIX, make_splits

log = logging.getLogger(__name__)

FEW_SHOT = [
    {
        "question": "Tom has 3 boxes of pens. Each box holds 12 pens. He gives away 5 pens. How many pens are left?",
        "response": "<reasoning>\n3 boxes * 12 pens = 36 pens.\n36 - 5 = 31 pens are left.\n</reasoning>\n"
        "<answer>\n31\n</answer>",
    },
    {
        "question": "A baker sells 24 muffins in the morning and half as many in the afternoon. "
        "How many muffins does she sell in total?",
        "response": "<reasoning>\nIn the afternoon she sells 24 / 2 = 12 muffins.\n24 + 12 = 36 muffins.\n"
        "</reasoning>\n<answer>\n36\n</answer>",
    },
]
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """The data set cannot be used as it is; the message says which rows and what to change."""


class GSM8K(LightningDataModule):
    """GSM8K-style prompts served as left-padded token batches, ``batch_size`` prompts per device per step.

    Args:
        path: where the problems come from, read the way ``datasets.load_dataset`` reads its ``path``: a hub id
            (``openai/gsm8k``), a local ``.jsonl``, ``.json`` or ``.parquet`` file with ``question`` and ``answer``
            columns, or ``synthetic`` for qmath's seeded generator of GSM8K-style problems.
        name: the hub data set's configuration (``main`` for ``openai/gsm8k``); ignored for files and synthetic.
        train_split: the hub split to train on.
        val_split: the hub split held out for validation.
        val_path: a local file held out for validation; without it, a local file's held-out rows are a seeded
            ``val_fraction`` of it.
        val_fraction: the share of a local file held out for validation when ``val_path`` is not given.
        num_train: how many synthetic training problems to generate.
        difficulty: weights of 1-, 2- and 3-step problems in the synthetic training set. The synthetic held-out set
            always uses the default mix (0.5, 0.4, 0.1), so its accuracies compare across runs.
        num_val: how many held-out problems periodic validation (during ``fit``) and ``validate`` use: the first
            ``num_val`` of the held-out set, a fixed subset for speed; ``None``: all of it.
        num_test: how many held-out problems ``test`` uses: the first ``num_test``; ``None``: all of it (GSM8K's
            test split: 1,319). Synthetic data generate ``max(num_val, num_test)`` held-out problems, and
            ``num_test: None`` means ``num_val``.
        batch_size: prompts per device per micro-batch (one ``training_step``). Each prompt is sampled
            ``model.num_generations`` times, so a device scores ``batch_size * num_generations`` completions per
            micro-batch, and an optimizer step covers ``trainer.accumulate_grad_batches`` micro-batches.
        max_prompt_length: training prompts longer than this many tokens (after the chat template and prefix) are
            dropped, and the count is logged. Held-out and predicted problems are all kept.
        system_prompt: the system message that asks for the reasoning/answer format.
        num_few_shot: how many worked examples to put before the question as earlier user/assistant turns (0-2).
        response_prefix: text that starts every answer, fed after the generation prompt and counted as part of
            the completion when rewards score it. Small models need it to pick up the format.
        strict: reject a data set with invalid rows (a missing or empty question or answer, no ``#### <number>``
            ground truth, a question repeated from an earlier row, a line that is not a JSON object), listing each
            with its line number. ``False``: skip them, log how many and which, and log ``data/skipped_rows``.
        question_column: the column that holds the question.
        answer_column: the column that holds the solution ending in ``#### <number>`` (for ``predict``, optional,
            and a bare number is accepted too).
        seed: seeds the synthetic generator and the held-out split of a local file.
        num_workers: DataLoader worker processes.
        tokenizer_name_or_path: the tokenizer that renders prompts; the CLI links it to
            ``model.model_name_or_path``.
        trust_remote_code: let the tokenizer's repository run its own code; the CLI links it to
            ``model.trust_remote_code``.
    """

    def __init__(
        self,
        path: str = "synthetic",
        name: str | None = None,
        train_split: str = "train",
        val_split: str = "test",
        val_path: str | None = None,
        val_fraction: float = 0.05,
        num_train: int = 5000,
        difficulty: tuple[float, float, float] = DEFAULT_MIX,
        num_val: int | None = 200,
        num_test: int | None = None,
        batch_size: int = 1,
        max_prompt_length: int = 256,
        system_prompt: str = SYSTEM_PROMPT,
        num_few_shot: int = 1,
        response_prefix: str = "<reasoning>\n",
        strict: bool = True,
        question_column: str = "question",
        answer_column: str = "answer",
        seed: int = 0,
        num_workers: int = 0,
        tokenizer_name_or_path: str = EMBEDDED_MODEL,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be at least 1 prompt per device, got {batch_size}")
        if max_prompt_length < 1:
            raise ValueError(f"data.max_prompt_length must be positive, got {max_prompt_length}")
        if len(difficulty) != 3 or min(difficulty) < 0 or sum(difficulty) <= 0:
            raise ValueError(f"data.difficulty must be 3 non-negative weights, not all 0, got {difficulty}")
        for key, value in (("num_val", num_val), ("num_test", num_test)):
            if value is not None and value < 1:
                raise ValueError(f"data.{key} must be at least 1, or null for the whole held-out set, got {value}")
        if path == "synthetic" and num_val is None:
            raise ValueError("data.num_val: synthetic data have no natural size; give a number of problems")
        if not 0 <= num_few_shot <= len(FEW_SHOT):
            raise ValueError(f"data.num_few_shot must be between 0 and {len(FEW_SHOT)}, got {num_few_shot}")
        self.save_hyperparameters()
        self.tokenizer: Any = None
        self.train_rows: list[dict[str, Any]] = []
        self.val_rows: list[dict[str, Any]] = []
        self.test_rows: list[dict[str, Any]] = []
        self.predict_rows: list[dict[str, Any]] = []
        self.skipped_rows = 0  # invalid rows skipped with strict=False, logged as data/skipped_rows

    # -- reading ---------------------------------------------------------------------------------------------
    def load_rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Checked ``{"question", "answer", "origin"}`` rows for training and the held-out set, not yet tokenised.

        A local file is checked whole before a held-out share is split off, so that a line number is the file's
        and a question repeated in the file cannot end up on both sides.
        """
        hp = self.hparams
        if hp.path == "synthetic":
            train, held_out = make_splits(hp.num_train, max(hp.num_val, hp.num_test or 0), hp.seed,
                                          tuple(hp.difficulty))
            # generated: well formed by construction; a question may repeat with other numbers' luck
            return (self.check(list(enumerate(train, 1)), "synthetic", dedupe=False),
                    self.check(list(enumerate(held_out, 1)), "synthetic held-out set", dedupe=False))
        if self._is_file(hp.path):
            train = self.check(_read_file(hp.path), hp.path)
            if hp.val_path:
                held_out = self.check(_read_file(hp.val_path), hp.val_path)
                self._warn_overlap(train, held_out)
                return train, held_out
            generator = torch.Generator().manual_seed(hp.seed)
            order = torch.randperm(len(train), generator=generator).tolist()
            n_val = max(1, round(len(train) * hp.val_fraction))
            held = set(order[:n_val])
            return [r for i, r in enumerate(train) if i not in held], [train[i] for i in sorted(held)]
        dataset = self._load_hub()
        train = self.check(list(enumerate(dataset[hp.train_split], 1)), f"{hp.path} split {hp.train_split}")
        held_out = self.check(list(enumerate(dataset[hp.val_split], 1)), f"{hp.path} split {hp.val_split}")
        self._warn_overlap(train, held_out)
        return train, held_out

    def check(self, rows: list[tuple[int, Any]], source: str, truth_required: bool = True,
              dedupe: bool = True) -> list[dict[str, Any]]:
        """The usable rows of ``(line number, row)`` pairs; invalid ones are rejected or skipped (``strict``)."""
        hp = self.hparams
        if not rows:
            raise DataError(f"{source} has no rows")
        objects = [row for _, row in rows if isinstance(row, dict)]
        required = [hp.question_column] + ([hp.answer_column] if truth_required else [])
        for column in required:
            if objects and not any(column in row for row in objects):
                key = "question_column" if column == hp.question_column else "answer_column"
                raise DataError(f"{source} has no column {column!r} in any row (its columns: "
                                f"{sorted({k for row in objects for k in row})}); set data.{key} to the column that "
                                "holds it, or rename the column")
        unit = "line" if source.lower().endswith(".jsonl") else "row"
        kept, invalid, first_seen = [], [], {}
        for line, row in rows:
            try:
                parsed = _parse_row(row, hp.question_column, hp.answer_column, truth_required)
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
            if hp.strict or not kept:
                what = "none is usable" if not kept else f"{len(invalid)} are invalid"
                raise DataError(f"{source}: of its {len(rows)} rows, {what}:\n  {listing}\nFix or remove them"
                                + (", or set data.strict: false to skip and count invalid rows" if kept else ""))
            log.warning("Skipped %d of %d rows of %s (data.strict is false):\n  %s", len(invalid), len(rows),
                        source, listing)
            self.skipped_rows += len(invalid)
        return kept

    def _warn_overlap(self, train: list[dict[str, Any]], held_out: list[dict[str, Any]]) -> None:
        seen = {" ".join(r["question"].split()) for r in train}
        overlap = sum(" ".join(r["question"].split()) in seen for r in held_out)
        if overlap:
            log.warning("%d held-out questions also appear in the training data: their accuracy is not held out",
                        overlap)

    def prepare_data(self) -> None:
        """Download a hub data set, once per node (Lightning runs this on each node's local rank 0 first)."""
        hp = self.hparams
        if hp.path != "synthetic" and not self._is_file(hp.path):
            self._load_hub()

    def _load_hub(self) -> Any:
        from datasets import load_dataset

        return load_dataset(self.hparams.path, self.hparams.name)

    @staticmethod
    def _is_file(path: str) -> bool:
        return Path(path).suffix.lower() in LOCAL_FORMATS or Path(path).expanduser().exists()

    def setup(self, stage: str | None = None) -> None:
        """Tokenise what ``stage`` needs: training and validation rows for ``fit``, only held-out rows otherwise."""
        hp = self.hparams
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(hp.tokenizer_name_or_path, hp.trust_remote_code)
        if stage == "predict":
            if not self.predict_rows:
                self.predict_rows = self._prepare(self.load_predict_rows(), "predict")
            return
        wanted = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",)}.get(
            stage or "fit", ("train", "validation", "test"))
        missing = [split for split in wanted if not getattr(self, self._ROWS[split])]
        if not missing:
            return
        train, held_out = self.load_rows()
        n_test = hp.num_test or (hp.num_val if hp.path == "synthetic" else None)
        raw = {"train": train, "validation": held_out[: hp.num_val], "test": held_out[:n_test]}
        for split in missing:
            setattr(self, self._ROWS[split], self._prepare(raw[split], split))
        if self.skipped_rows and self.trainer is not None:
            for logger in self.trainer.loggers:
                logger.log_metrics({"data/skipped_rows": float(self.skipped_rows)}, step=0)

    _ROWS = {"train": "train_rows", "validation": "val_rows", "test": "test_rows"}

    def describe(self, split: str) -> str:
        """Where ``split`` (``train``, ``validation``, ``test`` or ``predict``) comes from, for the start-up summary."""
        hp = self.hparams
        if hp.path == "synthetic":
            return "synthetic" + (" (held-out set)" if split != "train" else "")
        if self._is_file(hp.path):
            if split in ("train", "predict"):
                return hp.path
            return hp.val_path or f"{hp.path} (a {hp.val_fraction:.0%} held-out share, seed {hp.seed})"
        split_name = hp.train_split if split == "train" else hp.val_split
        return f"{hp.path}" + (f" ({hp.name})" if hp.name else "") + f", split {split_name}"

    def load_predict_rows(self) -> list[dict[str, Any]]:
        """What ``predict`` answers, in order: every row of a local ``data.path``, else the held-out set."""
        hp = self.hparams
        if hp.path != "synthetic" and self._is_file(hp.path):  # every row, repeats included, in order
            return self.check(_read_file(hp.path), hp.path, truth_required=False, dedupe=False)
        return self.load_rows()[1][: hp.num_test]

    def _prepare(self, checked: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
        ids = self._tokenise([row["question"] for row in checked], split)
        limit = self.hparams.max_prompt_length
        prepared = [{**row, "index": i, "input_ids": x} for i, (row, x) in enumerate(zip(checked, ids))]
        if split != "train":  # every held-out problem counts, and predict answers every row: the limit is for
            return prepared  # training memory, and dropping long problems would flatter an accuracy
        kept = [row for row in prepared if len(row["input_ids"]) <= limit]
        if len(kept) < len(checked):
            longest = max(len(x) for x in ids)
            log.warning("Dropped %d of %d %s prompts longer than data.max_prompt_length=%d tokens (longest: %d)",
                        len(checked) - len(kept), len(checked), split, limit, longest)
            if checked and not kept:
                raise DataError(
                    f"every {split} prompt is longer than data.max_prompt_length={limit} tokens (longest {longest}); "
                    "raise data.max_prompt_length or lower data.num_few_shot"
                )
        return kept

    def _tokenise(self, questions: list[str], split: str, chunk: int = 512) -> list[list[int]]:
        """Render and tokenise the prompts, with a progress bar on rank 0 for the thousands of a real data set."""
        from tqdm.auto import tqdm

        ids: list[list[int]] = []
        quiet = len(questions) < 2 * chunk or rank_zero_only.rank != 0
        with tqdm(total=len(questions), desc=f"qmath: tokenising {split} prompts", unit="prompt",
                  disable=quiet) as bar:
            for start in range(0, len(questions), chunk):
                prompts = [self.render(q) for q in questions[start:start + chunk]]
                ids += self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
                bar.update(len(prompts))
        return ids

    def render(self, question: str) -> str:
        """The prompt text for one question: chat template over system, few-shot turns and question, then prefix."""
        messages = [{"role": "system", "content": self.hparams.system_prompt}]
        for shot in FEW_SHOT[: self.hparams.num_few_shot]:
            messages += [{"role": "user", "content": shot["question"]},
                         {"role": "assistant", "content": shot["response"]}]
        messages.append({"role": "user", "content": question})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + self.hparams.response_prefix

    # -- serving ---------------------------------------------------------------------------------------------
    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(row["input_ids"]) for row in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, width - n:] = torch.tensor(row["input_ids"])
            attention_mask[i, width - n:] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "index": torch.tensor([row["index"] for row in rows]),
            "question": [row["question"] for row in rows],
            "answer": [row["answer"] for row in rows],
            "prefix": [self.hparams.response_prefix] * len(rows),
            "padding": torch.tensor([row.get("padding", False) for row in rows]),
        }

    def train_dataloader(self) -> StatefulDataLoader:
        # One rollout covers a whole optimizer step (accumulate_grad_batches micro-batches), and is reused for
        # model.num_iterations steps: so each batch of prompts for that rollout is served once per training_step
        # that uses it, the way TRL's RepeatSampler serves it. Stateful, so that Lightning checkpoints the position.
        accumulate, iterations = self.steps_per_rollout()
        sampler = RepeatBatchSampler(ShuffleSampler(self.train_rows), self.hparams.batch_size * accumulate,
                                     drop_last=True, repeats=accumulate * iterations)
        world = self.trainer.world_size if self.trainer is not None else 1
        needed = self.hparams.batch_size * accumulate * world  # each device needs a whole rollout of its own
        if len(self.train_rows) < needed:
            raise DataError(f"{len(self.train_rows)} training prompts do not fill one rollout of data.batch_size x "
                            f"trainer.accumulate_grad_batches x devices = {needed} prompts; use more data, or lower "
                            "data.batch_size or trainer.accumulate_grad_batches")
        return StatefulDataLoader(self.train_rows, batch_sampler=sampler, collate_fn=self.collate,
                                  num_workers=self.hparams.num_workers)

    def steps_per_rollout(self) -> tuple[int, int]:
        """``(trainer.accumulate_grad_batches, model.num_iterations)`` of the attached trainer; ``(1, 1)`` without."""
        trainer = self.trainer
        if trainer is None:
            return 1, 1
        module = trainer.lightning_module
        return trainer.accumulate_grad_batches, int(getattr(module, "hparams", {}).get("num_iterations", 1))

    def draw(self, n: int, seed: int) -> dict[str, Any]:
        """A batch of ``n`` training prompts drawn with replacement, reproducibly from ``seed``.

        For dynamic sampling: prompts drawn beyond the data loader's own. A pure function of ``seed``, so a
        resumed run draws the same prompts.
        """
        generator = torch.Generator().manual_seed(seed)
        index = torch.randint(len(self.train_rows), (n,), generator=generator).tolist()
        return self.collate([self.train_rows[i] for i in index])

    def val_dataloader(self) -> StatefulDataLoader:
        return self._held_out_loader(self.val_rows)

    def test_dataloader(self) -> StatefulDataLoader:
        return self._held_out_loader(self.test_rows)

    def predict_dataloader(self) -> StatefulDataLoader:
        return self._held_out_loader(self.predict_rows)

    def _held_out_loader(self, rows: list[dict[str, Any]]) -> StatefulDataLoader:
        trainer = self.trainer
        dataset, sampler = rows, None
        if trainer is not None and trainer.world_size > 1:
            dataset = _Padded(rows)
            sampler = PaddedDistributedSampler(dataset, trainer.world_size, trainer.global_rank)
        return StatefulDataLoader(dataset, batch_size=max(self.hparams.batch_size, 16), shuffle=False,
                                  sampler=sampler, collate_fn=self.collate, num_workers=self.hparams.num_workers)


class PaddedDistributedSampler(DistributedSampler):
    """Held-out problems split over ranks in order, each answered on one rank, every rank the same count.

    Lightning's default ``DistributedSampler`` evens the ranks out with repeated problems, which an accuracy would
    count twice; its ``UnrepeatedDistributedSampler`` leaves one rank a batch short when the count does not divide
    (1,313 problems on 2 ranks: 657 and 656, 42 and 41 batches of 16), and that rank's peers then run a
    ``generate`` alone, which hangs under FSDP. Here the short ranks get rows marked ``padding`` instead: answered
    like the others, never graded or written (``_Padded`` marks the indices past the end). Lightning keeps a
    ``DistributedSampler`` it is given.
    """

    def __init__(self, dataset: Any, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas, rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Any:
        return iter(range(self.rank, self.total_size, self.num_replicas))


class _Padded(torch.utils.data.Dataset):
    """The rows, and past their end copies of the first rows marked ``padding``."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i] if i < len(self.rows) else {**self.rows[i % len(self.rows)], "padding": True}


class ShuffleSampler(torch.utils.data.RandomSampler):
    """torch's ``RandomSampler`` that resumes mid-epoch: its state is the epoch's seed and how far it got.

    A torch ``RandomSampler`` (not torchdata's) so that Lightning sees a shuffled loader and shuffles under DDP.
    """

    def __init__(self, data_source: Any, seed: int | None = None) -> None:
        if seed is None:  # from the global RNG, which seed_everything has seeded
            seed = int(torch.randint(2**62, ()).item())
        super().__init__(data_source, generator=torch.Generator().manual_seed(seed))
        self.yielded = 0
        self._epoch_state = self.generator.get_state()
        self._resume: dict[str, Any] | None = None

    def __iter__(self) -> Any:
        start = 0
        if self._resume is not None:
            self.generator.set_state(self._resume["generator"])
            start, self._resume = self._resume["yielded"], None
        self._epoch_state = self.generator.get_state()
        order = torch.randperm(len(self.data_source), generator=self.generator).tolist()
        self.yielded = start
        for i in order[start:]:
            self.yielded += 1
            yield i

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._epoch_state, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = state


class RepeatBatchSampler(BatchSampler):
    """Yields each batch ``repeats`` times in a row (TRL's RepeatSampler, by batch); stateful for mid-epoch resume.

    A ``BatchSampler`` with a ``sampler`` argument, so Lightning can put a ``DistributedSampler`` inside under DDP.
    """

    def __init__(self, sampler: Any, batch_size: int, drop_last: bool, repeats: int = 1) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.repeats = repeats

    def __iter__(self) -> Any:
        return _RepeatIterator(super().__iter__(), self.repeats)

    def __len__(self) -> int:
        return super().__len__() * self.repeats


class _RepeatIterator:
    def __init__(self, inner: Any, repeats: int) -> None:
        self.inner, self.repeats = inner, repeats
        self.batch: list[int] = []
        self.served = repeats

    def __iter__(self) -> _RepeatIterator:
        return self

    def __next__(self) -> list[int]:
        if self.served >= self.repeats:
            self.batch, self.served = next(self.inner), 0
        self.served += 1
        return list(self.batch)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "batch": self.batch, "served": self.served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.batch, self.served = state["batch"], state["served"]


def _read_file(path: str) -> list[tuple[int, Any]]:
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
        with file.open(encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
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


def _parse_row(row: Any, question_column: str = "question", answer_column: str = "answer",
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
