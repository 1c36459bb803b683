"""GSM8K prompts for GRPO, from the hub, a local file, or the synthetic generator (``qmath.rows`` reads and checks
them), rendered, tokenised and served by the loaders (with the samplers of ``qmath.samplers``).

Each row becomes a chat prompt ``[system, few-shot turns…, question]`` rendered with the tokenizer's chat template,
followed by an optional response prefix such as ``<reasoning>\\n``. The prefix is the start of the model's answer:
it is fed as prompt tokens, and prepended to the generated text before rewards score it.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import torch
from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_only
from torchdata.stateful_dataloader import StatefulDataLoader

from qmath.errors import ConfigError
from qmath.models import EMBEDDED_MODEL, load_tokenizer
from qmath.options import Range, check_ranges
from qmath.rewards import SYSTEM_PROMPT
from qmath.rows import DataError, Rows
from qmath.samplers import Padded, PaddedDistributedSampler, RepeatBatchSampler, ShuffleSampler

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
__all__ = ["FEW_SHOT", "GSM8K", "DataError"]


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
        difficulty: weights of 1-, 2- and 3-step problems in the synthetic training set; ignored unless ``path`` is
            ``synthetic``. One-step problems only by default: a 135M model solves some of them and almost none of
            the longer ones, and a group whose samples are all wrong gives the correctness reward no gradient.
            The synthetic held-out set always uses the generator's mix (0.5, 0.4, 0.1), so its accuracies compare
            across runs and training mixes.
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
        val_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.05,
        num_train: Annotated[int, Range(ge=1)] = 5000,
        difficulty: tuple[float, float, float] = (1.0, 0.0, 0.0),
        num_val: Annotated[int, Range(ge=1)] | None = 200,
        num_test: Annotated[int, Range(ge=1)] | None = None,
        batch_size: Annotated[int, Range(ge=1, why="prompt per device")] = 1,
        max_prompt_length: Annotated[int, Range(gt=0)] = 256,
        system_prompt: str = SYSTEM_PROMPT,
        num_few_shot: Annotated[int, Range(ge=0, le=len(FEW_SHOT))] = 1,
        response_prefix: str = "<reasoning>\n",
        strict: bool = True,
        question_column: str = "question",
        answer_column: str = "answer",
        seed: int = 0,
        num_workers: Annotated[int, Range(ge=0)] = 0,
        tokenizer_name_or_path: str = EMBEDDED_MODEL,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        check_ranges(GSM8K.__init__, locals(), "data")  # the ranges declared in the signature
        if len(difficulty) != 3 or min(difficulty) < 0 or sum(difficulty) <= 0:
            raise ConfigError(f"data.difficulty must be 3 non-negative weights, not all 0, got {difficulty}")
        if path == "synthetic" and num_val is None:
            raise ConfigError("data.num_val: synthetic data have no natural size; give a number of problems")
        self.save_hyperparameters()
        self.tokenizer: Any = None
        self.train_rows: list[dict[str, Any]] = []
        self.val_rows: list[dict[str, Any]] = []
        self.test_rows: list[dict[str, Any]] = []
        self.predict_rows: list[dict[str, Any]] = []
        self.rows = Rows(path=path, name=name, train_split=train_split, val_split=val_split, val_path=val_path,
                         val_fraction=val_fraction, num_train=num_train, num_held_out=max(num_val or 0, num_test or 0),
                         num_test=num_test, difficulty=tuple(difficulty), seed=seed, question_column=question_column,
                         answer_column=answer_column, strict=strict)

    @property
    def skipped_rows(self) -> int:
        """Invalid rows skipped with ``strict=False``, logged as ``data/skipped_rows``."""
        return self.rows.skipped

    def prepare_data(self) -> None:
        self.rows.download()  # once per node; the other ranks wait, then read the cache in setup

    # -- reading ---------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Tokenise what ``stage`` needs: training and validation rows for ``fit``, only held-out rows otherwise."""
        hp = self.hparams
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(hp.tokenizer_name_or_path, hp.trust_remote_code)
        if stage == "predict":
            if not self.predict_rows:
                self.predict_rows = self._prepare(self.rows.for_predict(), "predict")
            return
        wanted = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",)}.get(
            stage or "fit", ("train", "validation", "test"))
        missing = [split for split in wanted if not getattr(self, self._ROWS[split])]
        if not missing:
            return
        train, held_out = self.rows.splits()
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
        return self.rows.describe(split)

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

    @property
    def eval_batch_size(self) -> int:
        """Problems per held-out batch (validation, test, predict)."""
        return max(self.hparams.batch_size, 16)

    def longest_prompt(self) -> int:
        """The most tokens of any prompt set up so far, in any split: what a pre-allocated KV cache must hold."""
        splits = (self.train_rows, self.val_rows, self.test_rows, self.predict_rows)
        return max((len(row["input_ids"]) for rows in splits for row in rows), default=0)

    def _held_out_loader(self, rows: list[dict[str, Any]]) -> StatefulDataLoader:
        trainer = self.trainer
        dataset, sampler = rows, None
        if trainer is not None and trainer.world_size > 1:
            dataset = Padded(rows)
            sampler = PaddedDistributedSampler(dataset, trainer.world_size, trainer.global_rank)
        return StatefulDataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False,
                                  sampler=sampler, collate_fn=self.collate, num_workers=self.hparams.num_workers)


