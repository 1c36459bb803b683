"""The rollout: one optimizer step's completions and what is computed about them, as one typed object.

A rollout holds ``B`` completions, the G of one prompt adjacent, and its prompts repeated to match. Its helpers
(``select``, ``split``, ``cat``, ``trim``, ``to``, ``state``) go over the dataclass's fields, so that a new field
needs no new helper code: a tensor or list field has one entry per completion unless its metadata says
``shared``, and a tensor field's metadata says on which side it is padded and with what.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

LEFT, RIGHT = "left", "right"


def _padded(side: str, with_pad_id: bool = False, default: Any = ...) -> Any:
    metadata = {"pad": side, "pad_id": with_pad_id}
    return field(metadata=metadata) if default is ... else field(default=default, metadata=metadata)


@dataclass
class Rollout:
    """Sampled completions (``B`` rows) and, once computed, their advantages, loss mask and cached log-probs.

    The cached log-probs are set once: ``old_logps`` by the first pass over the rollout (π_old), ``ref_logps`` by
    the reference model.
    """

    prompt_ids: Tensor = _padded(LEFT, with_pad_id=True)  # [B, P], left padded
    prompt_mask: Tensor = _padded(LEFT)  # [B, P]
    completion_ids: Tensor = _padded(RIGHT, with_pad_id=True)  # [B, T]
    completion_mask: Tensor = _padded(RIGHT)  # [B, T], 1 up to and including the first EOS
    terminated: Tensor  # [B] bool: the completion ended with an EOS (not cut off at the length limit)
    texts: list[str]  # decoded, with the response prefix
    columns: dict[str, list[Any]]  # the batch's list columns (question, answer, prefix, …), one entry per row
    advantages: Tensor | None = None  # [B]
    loss_mask: Tensor | None = _padded(RIGHT, default=None)  # [B, T]: completion_mask, less masked truncations
    num_items: Tensor | None = field(default=None, metadata={"shared": True})  # dapo's divisor, of the whole step
    old_logps: Tensor | None = _padded(RIGHT, default=None)  # [B, T]
    ref_logps: Tensor | None = _padded(RIGHT, default=None)  # [B, T]
    sampling_logps: Tensor | None = _padded(RIGHT, default=None)  # [B, T]: under the distribution sampled from
    importance_weights: Tensor | None = None  # [B, T] or [B, 1]: π_old / π_sampling, corrected (rollout copy)
    # what decoded it (a Sampler mode) and whether from the rollout copy: what the decoding check holds to account
    decoded_by: str = field(default="eager", metadata={"shared": True})
    copied: bool = field(default=False, metadata={"shared": True})

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, rows: Tensor) -> Rollout:
        """The rollout of the rows ``rows`` (a 1-d index tensor)."""
        index = rows.tolist()

        def pick(meta: Any, value: Any) -> Any:
            if value is None or meta.get("shared"):
                return value
            if isinstance(value, Tensor):
                return value[rows.to(value.device)]
            if isinstance(value, dict):
                return {k: [v[i] for i in index] for k, v in value.items()}
            return [value[i] for i in index]

        return replace(self, **{f.name: pick(f.metadata, getattr(self, f.name)) for f in fields(self)})

    def split(self, parts: int) -> list[Rollout]:
        """``parts`` rollouts of consecutive rows, for gradient accumulation."""
        if len(self) % parts:
            raise ValueError(f"{len(self)} completions do not split into {parts} micro-batches")
        size = len(self) // parts
        return [self.select(torch.arange(i * size, (i + 1) * size)) for i in range(parts)]

    def cat(self, other: Rollout, pad_id: int) -> Rollout:
        """This rollout's rows, then ``other``'s, each tensor padded on its side to the wider of the two."""

        def join(meta: Any, a: Any, b: Any) -> Any:
            if meta.get("shared") or (a is None and b is None):
                return a if a is not None else b  # a step-wide value, or one computed for neither side yet
            if a is None or b is None:  # one row per completion on one side only: the rows would not line up
                raise ValueError("rollouts of which only one has a per-completion field cannot be joined")
            if isinstance(a, dict):
                if a.keys() != b.keys():
                    raise ValueError(f"rollouts with different columns: {sorted(a)} and {sorted(b)}")
                return {k: a[k] + b[k] for k in a}
            if isinstance(a, list):
                return a + b
            if "pad" in meta:
                width, value = max(a.size(1), b.size(1)), pad_id if meta["pad_id"] else 0
                a, b = (_pad(x, width, meta["pad"], value) for x in (a, b))
            return torch.cat([a, b])

        return replace(self, **{f.name: join(f.metadata, getattr(self, f.name), getattr(other, f.name))
                                for f in fields(self)})

    def trim(self) -> Rollout:
        """Without the columns that are padding in every row: left of the longest prompt, right of the longest
        completion."""
        prompt_start = int((self.prompt_mask.sum(dim=0) > 0).int().argmax())
        width = int(self.completion_mask.sum(dim=1).max())

        def cut(meta: Any, value: Any) -> Any:
            if value is None or "pad" not in meta:
                return value
            return value[:, prompt_start:] if meta["pad"] == LEFT else value[:, :width]

        return replace(self, **{f.name: cut(f.metadata, getattr(self, f.name)) for f in fields(self)})

    def to(self, device: torch.device | str) -> Rollout:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})

    def state(self) -> dict[str, Any]:
        """Plain tensors and containers on the CPU, for a checkpoint that loads with ``weights_only=True``."""
        on_cpu = self.to("cpu")
        return {f.name: getattr(on_cpu, f.name) for f in fields(on_cpu)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Rollout:
        return cls(**state)


def _pad(x: Tensor, width: int, side: str, value: int) -> Tensor:
    extra = width - x.size(1)
    return torch.nn.functional.pad(x, (extra, 0) if side == LEFT else (0, extra), value=value)
