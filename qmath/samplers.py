"""The data loaders' samplers: a shuffle that resumes mid-epoch, a batch sampler that serves each rollout's prompts
once per training step that uses them, and the held-out split over ranks that keeps their batch counts equal."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader.sampler import BatchSampler


class PaddedDistributedSampler(DistributedSampler):
    """Held-out problems split over ranks in order, each answered on one rank, every rank the same count.

    Lightning's default ``DistributedSampler`` evens the ranks out with repeated problems, which an accuracy would
    count twice; its ``UnrepeatedDistributedSampler`` leaves one rank a batch short when the count does not divide
    (1,313 problems on 2 ranks: 657 and 656, 42 and 41 batches of 16), and that rank's peers then run a
    ``generate`` alone, which hangs under FSDP. Here the short ranks get rows marked ``padding`` instead: answered
    like the others, never graded or written (``Padded`` marks the indices past the end). Lightning keeps a
    ``DistributedSampler`` it is given.
    """

    def __init__(self, dataset: Any, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas, rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Any:
        return iter(range(self.rank, self.total_size, self.num_replicas))


class Padded(torch.utils.data.Dataset):
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

