"""GSM8K prompts for GRPO: from the hub, a local file, or the synthetic generator.

Each row becomes a chat prompt ``[system, few-shot turns…, question]`` rendered with the tokenizer's chat template,
followed by an optional response prefix such as ``<reasoning>\\n``. The prefix is the start of the model's answer:
it is fed as prompt tokens, and prepended to the generated text before rewards score it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning import LightningDataModule
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
        num_val: how many held-out problems to keep (synthetic: generate; others: the first ``num_val`` of the
            held-out split, or all of it when ``None``).
        batch_size: prompts per device per micro-batch (one ``training_step``). Each prompt is sampled
            ``model.num_generations`` times, so a device scores ``batch_size * num_generations`` completions per
            micro-batch, and an optimizer step covers ``trainer.accumulate_grad_batches`` micro-batches.
        max_prompt_length: prompts longer than this many tokens (after the chat template and prefix) are dropped,
            and the count is logged.
        system_prompt: the system message that asks for the reasoning/answer format.
        num_few_shot: how many worked examples to put before the question as earlier user/assistant turns (0-2).
        response_prefix: text that starts every answer, fed after the generation prompt and counted as part of
            the completion when rewards score it. Small models need it to pick up the format.
        seed: seeds the synthetic generator and the held-out split of a local file.
        num_workers: DataLoader worker processes.
        tokenizer_name_or_path: the tokenizer that renders prompts; the CLI links it to
            ``model.model_name_or_path``.
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
        batch_size: int = 1,
        max_prompt_length: int = 256,
        system_prompt: str = SYSTEM_PROMPT,
        num_few_shot: int = 1,
        response_prefix: str = "<reasoning>\n",
        seed: int = 0,
        num_workers: int = 0,
        tokenizer_name_or_path: str = EMBEDDED_MODEL,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be at least 1 prompt per device, got {batch_size}")
        if max_prompt_length < 1:
            raise ValueError(f"data.max_prompt_length must be positive, got {max_prompt_length}")
        if len(difficulty) != 3 or min(difficulty) < 0 or sum(difficulty) <= 0:
            raise ValueError(f"data.difficulty must be 3 non-negative weights, not all 0, got {difficulty}")
        if not 0 <= num_few_shot <= len(FEW_SHOT):
            raise ValueError(f"data.num_few_shot must be between 0 and {len(FEW_SHOT)}, got {num_few_shot}")
        self.save_hyperparameters()
        self.tokenizer: Any = None
        self.train_rows: list[dict[str, Any]] = []
        self.val_rows: list[dict[str, Any]] = []

    # -- reading ---------------------------------------------------------------------------------------------
    def load_rows(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """Raw ``{"question", "answer"}`` rows for training and validation, before tokenisation."""
        hp = self.hparams
        if hp.path == "synthetic":
            return make_splits(hp.num_train, hp.num_val or 0, hp.seed, tuple(hp.difficulty))
        suffix = Path(hp.path).suffix.lower()
        if suffix in LOCAL_FORMATS or Path(hp.path).exists():
            train = _read_file(hp.path)
            if hp.val_path:
                return train, _read_file(hp.val_path)
            generator = torch.Generator().manual_seed(hp.seed)
            order = torch.randperm(len(train), generator=generator).tolist()
            n_val = max(1, round(len(train) * hp.val_fraction))
            held = set(order[:n_val])
            return [r for i, r in enumerate(train) if i not in held], [train[i] for i in sorted(held)]
        from datasets import load_dataset

        dataset = load_dataset(hp.path, hp.name)
        return list(dataset[hp.train_split]), list(dataset[hp.val_split])

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        self.tokenizer = load_tokenizer(self.hparams.tokenizer_name_or_path)
        train, val = self.load_rows()
        if self.hparams.num_val is not None:
            val = val[: self.hparams.num_val]
        self.train_rows = self._prepare(train, "train")
        self.val_rows = self._prepare(val, "validation")
        if not self.train_rows:
            raise DataError(f"data.path={self.hparams.path}: no training rows left")

    def _prepare(self, rows: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
        checked = [_parse_row(row, i + 1, self.hparams.path) for i, row in enumerate(rows)]
        prompts = [self.render(row["question"]) for row in checked]
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        limit = self.hparams.max_prompt_length
        kept = [{**row, "input_ids": x} for row, x in zip(checked, ids) if len(x) <= limit]
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
            "question": [row["question"] for row in rows],
            "answer": [row["answer"] for row in rows],
            "prefix": [self.hparams.response_prefix] * len(rows),
        }

    def train_dataloader(self) -> StatefulDataLoader:
        # One rollout covers a whole optimizer step (accumulate_grad_batches micro-batches), and is reused for
        # model.num_iterations steps: so each batch of prompts for that rollout is served once per training_step
        # that uses it, the way TRL's RepeatSampler serves it. Stateful, so that Lightning checkpoints the position.
        accumulate, iterations = self.steps_per_rollout()
        sampler = RepeatBatchSampler(ShuffleSampler(self.train_rows), self.hparams.batch_size * accumulate,
                                     drop_last=True, repeats=accumulate * iterations)
        if len(sampler) == 0:
            needed = self.hparams.batch_size * accumulate
            raise DataError(f"{len(self.train_rows)} training prompts do not fill one rollout of "
                            f"data.batch_size x trainer.accumulate_grad_batches = {needed} prompts")
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
        return StatefulDataLoader(self.val_rows, batch_size=max(self.hparams.batch_size, 16), shuffle=False,
                                  collate_fn=self.collate, num_workers=self.hparams.num_workers)


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


def _read_file(path: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data.path: {path} does not exist; give a .jsonl, .json or .parquet file, a hub id, "
                        "or 'synthetic'")
    builder = LOCAL_FORMATS.get(file.suffix.lower())
    if builder is None:
        raise DataError(f"data.path: {path} is neither JSONL, JSON nor Parquet (by its suffix)")
    return list(load_dataset(builder, data_files=str(file), split="train"))


def _parse_row(row: dict[str, Any], line: int, source: str) -> dict[str, Any]:
    missing = [column for column in ("question", "answer") if not isinstance(row.get(column), str)]
    if missing:
        raise DataError(f"{source}: row {line} has no text column {missing[0]!r} (columns: {sorted(row)})")
    truth = extract_hash_answer(row["answer"])
    if truth is None:
        raise DataError(f"{source}: row {line}: the answer has no '#### <number>' line")
    if parse_number(truth) is None:
        raise DataError(f"{source}: row {line}: the ground truth after '####' is not a number: {truth!r}")
    return {"question": row["question"], "answer": truth}
