"""A run's worst-case device memory, known before step 1, and an out-of-memory error that still happens, said in
one line.

A Kaggle user loses hours when a run dies of an out-of-memory error late: the longest completions, a validation's
decode or the first AdamW step can come long after the start. So before step 1 on a GPU (or wherever
``QMATH_MEMORY_BUDGET_GIB`` gives a budget) the run adds up its worst case, phase by phase (:class:`MemoryPlan`):

- exact sizes: the weights, the KL reference, the rollout copy, DDP's gradient buckets, the gradients (a second copy
  only where DDP keeps them apart from its buckets: ``gradient_as_bucket_view: false``), the optimizer's states and
  its ``foreach`` temporaries, the KV buffers the decoders keep (the planned shapes: the longest prompt the data
  can produce plus ``max_completion_length``, in the most rows a rollout or an evaluation takes);
- estimated: a decode step's temporaries (the logits and the sampler's copies of them, a prefill of the longest
  prompts);
- measured: the policy's forward and backward and the reference's forward over the worst-case micro-batch (the
  longest prompt, every completion at ``max_completion_length``), run once on the device
  (``torch.cuda.max_memory_allocated``; on CPU the process's peak resident memory).

It prints the peak beside the budget (the card's free memory plus what torch already holds: the CUDA context, NCCL
and other processes are outside it), and refuses a run that cannot fit with one ``qmath: error`` line naming the
peak, the budget and the options that lower it. An out-of-memory error that still happens (fragmentation, a
library's workspace) ends the run with a line naming the step, the phase and the peak (:func:`describe_oom`); the
last checkpoint is left as it was.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from qmath.errors import QMathError
from qmath.rollout import Rollout

GiB = 2**30
BUDGET_ENV = "QMATH_MEMORY_BUDGET_GIB"  # a budget of one's own: a card shared with another job, or a CPU test
TIGHT = 0.92  # above this share of the budget the allocator's fragmentation can tip a run over: a warning
LOWER_IT = ("model.gradient_checkpointing: true, a smaller model.num_generations or model.max_completion_length, "
            "model.lora_r > 0 (LoRA), model.rollout_dtype: null (no rollout copy), or a smaller data.batch_size")


class OutOfMemory(QMathError, MemoryError):
    """The run cannot fit its device's memory (found before step 1), or ran out of it."""


@dataclass
class MemoryPlan:
    """The bytes of each part of a run's device memory, and which parts are live at each phase's peak."""

    parts: dict[str, int]
    phases: dict[str, tuple[str, ...]]
    measured: set[str] = field(default_factory=set)  # the parts measured on the device, not computed

    def phase_bytes(self, phase: str) -> int:
        return sum(self.parts.get(p, 0) for p in self.phases[phase])

    def peak(self) -> tuple[str, int]:
        """The phase with the most live bytes, and those bytes."""
        phase = max(self.phases, key=self.phase_bytes)
        return phase, self.phase_bytes(phase)

    def describe(self, budget: int | None) -> str:
        """One line for the start-up summary: the peak, its parts, the budget."""
        phase, peak = self.peak()
        parts = ", ".join(f"{name} {self.parts[name] / GiB:.2f}" + (" measured" if name in self.measured else "")
                          for name in self.phases[phase] if self.parts.get(name))
        if "activations" not in self.parts:
            parts += ", activations not measured"
        elif "activations" not in self.phases[phase]:  # the measured part, whichever phase peaks
            parts += f" (the loss's activations: {self.parts['activations'] / GiB:.2f} measured)"
        against = f" of a {budget / GiB:.2f} GiB budget ({peak / budget:.0%})" if budget else ""
        return f"worst case {peak / GiB:.2f} GiB per device, at the {phase}{against}: {parts} GiB"


def budget(device: torch.device) -> int | None:
    """The bytes a run may use on ``device``: ``QMATH_MEMORY_BUDGET_GIB`` if set, else on CUDA the card's free memory
    plus what this process's allocator already holds (the CUDA context, NCCL's buffers and other processes take the
    rest), else ``None`` (no check)."""
    if os.environ.get(BUDGET_ENV):
        return int(float(os.environ[BUDGET_ENV]) * GiB)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)


def nbytes(model: Any, trainable_only: bool = False) -> int:
    if model is None:
        return 0
    tensors = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    if not trainable_only:
        tensors += list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def kv_bytes(model: Any, rows: int, slots: int) -> int:
    """A KV cache of ``rows`` x ``slots`` for every layer of ``model``, in its dtype."""
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * rows * heads * slots * head_dim * model.dtype.itemsize


def optimizer_bytes(optimizer: Any, trainable: int) -> tuple[int, int]:
    """The optimizer's states and its step's temporaries: Adam's two moments (three with ``amsgrad``), SGD's
    momentum; a ``foreach`` step (CUDA's default) makes one more copy of the parameters' size."""
    defaults = getattr(optimizer, "defaults", {})
    name = type(optimizer).__name__
    states = (3 if defaults.get("amsgrad") else 2) if "Adam" in name else (1 if defaults.get("momentum") else 2)
    foreach = defaults.get("foreach") is not False
    return states * trainable, trainable if foreach else 0


def plan(module: Any, activations: int) -> MemoryPlan:
    """The worst case of ``module``'s run (a :class:`qmath.module.GRPO` when fit starts) with ``activations``, the
    measured increase of the loss's forward and backward over the worst-case micro-batch."""
    from lightning.pytorch.strategies import DDPStrategy

    trainer, forms, sampler, hp = module.trainer, module.forms, module.sampler, module.hparams
    trainable = nbytes(module.policy, trainable_only=True)
    ddp = isinstance(trainer.strategy, DDPStrategy)
    bucket_view = ddp and bool(getattr(trainer.strategy, "_ddp_kwargs", {}).get("gradient_as_bucket_view"))
    states, step_temporaries = optimizer_bytes(trainer.optimizers[0] if trainer.optimizers else None, trainable)
    data = trainer.datamodule
    prompt = data.longest_prompt() if hasattr(data, "longest_prompt") else 0
    accumulate = trainer.accumulate_grad_batches
    rollout_rows = data.hparams.batch_size * accumulate * hp.num_generations if data is not None else 1
    eval_rows = data.eval_batch_size * (hp.maj_k or 1) if data is not None else 1
    rows = max(rollout_rows, eval_rows)
    slots = prompt + hp.max_completion_length
    kept, per_call = 0, 0
    device = module.device
    if sampler.compiled(device) and sampler.shapes is not None:  # fixed shapes: buffers for the run
        slots, rows = sampler.shapes.cache_length, sampler.shapes.rows[-1]
        kept = kv_bytes(module.policy, rows, slots) + (kv_bytes(forms.rollout_model, rows, slots)
                                                        if forms.rollout_model is not None else 0)
    else:  # eager: a call's own buffers (rollouts from the copy, in its dtype; evaluation from the policy)
        per_call = max(kv_bytes(forms.rollout_model or module.policy, rollout_rows, slots),
                       kv_bytes(module.policy, eval_rows, slots))
    config = module.policy.config
    vocab = module.policy.get_output_embeddings().weight.size(0)
    intermediate = getattr(config, "intermediate_size", 4 * config.hidden_size)
    # a step's logits in fp32 and the sampler's copies (scores, noise, top-p's sort); a prefill of every prompt:
    # its MLP's three intermediates and the cache it returns, repeated for the group
    decode = rows * vocab * 4 * 8 + rows * prompt * (3 * intermediate + 6 * config.hidden_size) * 4 \
        + kv_bytes(module.policy, rows, prompt)
    parts = {"weights": nbytes(module.policy), "reference": nbytes(forms.reference),
             "rollout copy": nbytes(forms.rollout_model), "DDP buckets": trainable if ddp else 0,
             "gradients": 0 if bucket_view else trainable, "optimizer states": states,
             "KV cache": kept + per_call, "decode temporaries": decode, "activations": activations,
             "optimizer step temporaries": step_temporaries}
    always = ("weights", "reference", "rollout copy", "DDP buckets", "optimizer states", "KV cache")
    # Lightning zeroes the gradients after training_step: the rollout still has the previous step's
    phases = {"rollout": (*always, "gradients", "decode temporaries"),
              "loss (forward and backward)": (*always, "gradients", "activations"),
              "optimizer step": (*always, "gradients", "optimizer step temporaries"),
              "validation": (*always, "gradients", "decode temporaries")}
    return MemoryPlan(parts, phases, measured={"activations"})


class Meter:
    """The increase of the device's memory over a block: ``torch.cuda.max_memory_allocated`` on CUDA, the process's
    peak resident memory on CPU (Linux: reset through ``/proc/self/clear_refs``); ``None`` where it cannot tell."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.increase: int | None = None

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.increase = torch.cuda.max_memory_allocated(self.device) - start
            return
        start = _status("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM, the peak resident set, to the current one
        except OSError:
            start = None
        yield
        if start is not None:
            self.increase = max(_status("VmHWM") - start, 0)


def _status(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def worst_micro_batch(module: Any) -> Rollout:
    """A micro-batch of the run's worst shapes: each prompt as long as the data's longest, every completion
    ``max_completion_length`` tokens, nothing masked; the G completions of a prompt share it, as in a rollout."""
    hp, data = module.hparams, module.trainer.datamodule
    prompt = max(data.longest_prompt(), 2) if hasattr(data, "longest_prompt") else 2
    group, prompts = hp.num_generations, data.hparams.batch_size if data is not None else 1
    rows, width, device = prompts * group, hp.max_completion_length, module.device
    vocab = module.policy.get_output_embeddings().weight.size(0)
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(vocab, (prompts, prompt), generator=generator).repeat_interleave(group, 0)
    completion_ids = torch.randint(vocab, (rows, width), generator=generator)
    ones = torch.ones(rows, width, device=device)
    return Rollout(prompt_ids=prompt_ids.to(device), prompt_mask=torch.ones_like(prompt_ids, device=device),
                   completion_ids=completion_ids.to(device), completion_mask=ones.long(),
                   terminated=torch.ones(rows, dtype=torch.bool, device=device), texts=[""] * rows, columns={},
                   advantages=torch.ones(rows, device=device), loss_mask=ones)


def measure_activations(module: Any) -> int | None:
    """The memory the loss's passes add over the worst-case micro-batch: the policy's forward and backward (with the
    entropy, as the loss takes it) and the reference's forward, under the trainer's precision. The gradients are
    allocated first, so that only activations and temporaries count; they are dropped after, and the random
    generators are left as they were."""
    micro, meter = worst_micro_batch(module), Meter(module.device)
    trainable = [p for p in module.policy.parameters() if p.requires_grad]
    devices = [module.device] if module.device.type == "cuda" else []
    for p in trainable:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    try:
        with torch.random.fork_rng(devices=devices), module.trainer.precision_plugin.forward_context(), \
                meter.measure():
            logps, entropies = module.token_logps(module.policy, micro, entropy=True,
                                                  entropy_grad=module.hparams.entropy_coef != 0)
            if module.forms.needs_reference(module.hparams.beta):  # as the loss: while the policy's are alive
                with torch.no_grad():
                    module.reference_logps(micro)
            loss: Tensor = (logps * micro.loss_mask).sum() + 0.0 * entropies.sum()
            loss.backward()
            del logps, entropies, loss
    finally:
        for p in trainable:
            p.grad = None
    return meter.increase


def check(module: Any) -> str | None:
    """The start-up memory line (``None`` where there is no budget to check against), after refusing a run whose
    worst case does not fit its budget on some rank."""
    device = module.device
    available = budget(device)
    if available is None:
        return None
    # under FSDP every rank holds a shard of the gradients the probe would have to allocate whole: not measured
    try:
        activations = None if module.forms.sharded else measure_activations(module)
    except RuntimeError as error:
        if type(error).__name__ != "OutOfMemoryError":
            raise
        raise OutOfMemory(f"one worst-case micro-batch (the longest prompt, {module.hparams.max_completion_length} "
                          f"completion tokens in each of {module.hparams.num_generations} rows) does not fit the "
                          f"device's {available / GiB:.2f} GiB before step 1. Lower it with {LOWER_IT}.") from None
    memory = plan(module, activations or 0)
    if activations is None:
        memory.measured.discard("activations")
        memory.parts.pop("activations")
    phase, peak = memory.peak()
    # every rank's, so that the one that does not fit is the one named (rank 0 says it)
    everyone = module.all_gather(torch.tensor([float(peak), float(available)], dtype=torch.float64))
    everyone = everyone.reshape(-1, 2)
    worst = int((everyone[:, 0] / everyone[:, 1]).argmax())
    worst_peak, worst_budget = (int(x) for x in everyone[worst].tolist())
    if worst_peak > worst_budget:
        device = f"rank {worst}'s device" if everyone.size(0) > 1 else "the device"
        raise OutOfMemory(f"this run needs about {worst_peak / GiB:.2f} GiB per device at its {phase}, and "
                          f"{device} has {worst_budget / GiB:.2f} GiB "
                          f"({memory.describe(available).split(': ', 1)[1]}). Lower it with {LOWER_IT}.")
    line = memory.describe(available)
    if peak > TIGHT * available:
        line += (f"; above {TIGHT:.0%} of the budget, the allocator's fragmentation can tip it over: "
                 "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True lowers that")
    return line


@dataclass
class Where:
    """Where the run is, for an out-of-memory error's message: the optimizer step and the phase in it."""

    step: int | None = None
    phase: str = "start-up"


WHERE = Where()


def at(step: int, phase: str) -> None:
    WHERE.step, WHERE.phase = step, phase


def describe_oom(error: BaseException) -> str:
    """The one line an out-of-memory error ends a run with: where, the peak, what lowers it, the checkpoint."""
    peak = ""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(device).total_memory
        peak = (f", with {torch.cuda.max_memory_allocated(device) / GiB:.2f} GiB of {total / GiB:.2f} GiB allocated "
                "at the peak")
    step = f" at step {WHERE.step}" if WHERE.step is not None else ""
    return (f"out of device memory{step}, in the {WHERE.phase}{peak}. Lower the run's memory with {LOWER_IT}; "
            "checkpoints already written are intact: resume with --ckpt_path last")
