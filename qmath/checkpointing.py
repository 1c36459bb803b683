"""Checkpoints that survive ``kill -9`` and preemption, and what a checkpoint holds beyond Lightning's: the random
number generators, the base model's identity (a checkpoint is refused by another base), and the ranks' rollouts.

Lightning's own "atomic" save writes through an fsspec transaction, which stages the file in the system temp
directory and moves it into place. When that directory is on another file system than the checkpoints (local
``/tmp``, checkpoints on NFS or Lustre, as on most clusters), the move is a copy into ``last.ckpt`` itself, and a
kill during the copy leaves a truncated ``last.ckpt`` that ``--ckpt_path last`` then fails to load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states  # private: see rng_states
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning_utilities.core.apply_func import apply_to_collection

from qmath.errors import CheckpointError
from qmath.rollout import Rollout
from qmath.steps import NonFiniteError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside its target, fsyncs it, and renames it into place.

    A rename within one directory is atomic, so the target is always either the previous complete checkpoint or
    the new one. Temporary files left by a killed process are removed at the next save. Remote paths (``s3://``
    and the like) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # from a process killed mid-write
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self._write(checkpoint, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only)
        return read_checkpoint(path, map_location=map_location or "cpu", weights_only=weights_only)

    def _write(self, checkpoint: dict[str, Any], tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())


def read_checkpoint(path: _PATH, map_location: Any = "cpu", weights_only: bool | None = True,
                    mmap: bool = False) -> dict:
    """``torch.load`` of a checkpoint file, with a file that is damaged (truncated, overwritten) or not a checkpoint
    said as such, and the newest readable checkpoint beside it named. ``mmap=True`` maps the tensors instead of
    reading them: a few MB of memory for the hyperparameters of a checkpoint of any size."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--ckpt_path {path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except Exception as error:
        said = str(error).strip().splitlines()[0].split(". ")[0][:200] if str(error).strip() else ""
        raise CheckpointError(f"{path} is damaged (truncated or overwritten) or not a checkpoint: torch.load "
                              f"failed ({said or type(error).__name__}). {_previous_good(path)}") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a qmath checkpoint: it holds no state_dict. {_previous_good(path)}")
    return checkpoint


def _previous_good(damaged: Path) -> str:
    """Where to resume from instead: the newest other ``.ckpt`` file in the same directory that loads."""
    others = sorted((p for p in damaged.parent.glob("*.ckpt") if p.is_file() and p.resolve() != damaged.resolve()),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in others:
        try:
            if "state_dict" in torch.load(candidate, map_location="cpu", weights_only=True, mmap=True):
                return f"The newest readable checkpoint beside it is {candidate}: resume with --ckpt_path {candidate}."
        except Exception:
            continue
    return f"No other readable checkpoint is in {damaged.parent}: start again without --ckpt_path."


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """Lightning's ``AsyncCheckpointIO`` over :class:`AtomicCheckpointIO`, its point-in-time copy in host memory.

    The ranks wait for a save only while the state is copied into host memory; writing it, the fsync and the rename
    run in a thread while training goes on (docs/performance.md#what-a-save-costs). Lightning's plugin clones each
    tensor on its own device, which on a GPU needs the whole state again in GPU memory (5.52 GiB for t4x2, on a T4
    with a fraction of a GiB to spare), so the copy goes to host memory here, storages shared by several tensors
    (tied embeddings) copied once, as ``torch.save`` writes them once. One save is in flight at a time: the next, a
    load or a removal waits for the write, so host memory holds one copy. The write is :class:`AtomicCheckpointIO`'s,
    so a kill at any moment leaves the previous checkpoint whole (a save is durable once its write ends: a kill
    during the write loses it, and the run falls back to the previous one). A write that fails (a full disk) is
    raised at the next save or at the end of the run, as one line naming the file. Lightning's SLURM requeue
    checkpoint (``hpc_ckpt_*.ckpt``, written right before the job is requeued and killed) is written in the
    foreground.
    """

    def __init__(self, checkpoint_io: Any | None = None) -> None:
        super().__init__(checkpoint_io or AtomicCheckpointIO())
        # its own writer thread: AsyncCheckpointIO's executor set-up is private and changed within Lightning 2.5
        self._writer: ThreadPoolExecutor | None = None
        self._pending: tuple[Future, _PATH] | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        self.wait()
        if Path(str(path)).name.startswith("hpc_ckpt_"):
            return self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options)
        copy = apply_to_collection(checkpoint, torch.Tensor, _host_copier())
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qmath-checkpoint")
        self._pending = self._writer.submit(self.checkpoint_io.save_checkpoint, copy, path, storage_options), path

    def wait(self) -> None:
        """Until the write in flight, if any, is on disk; its error, if it failed, raised here as one line."""
        if self._pending is None:
            return
        future, path = self._pending
        try:
            future.result()  # an interrupt here (Ctrl+C) leaves it pending, for teardown to wait for and report
        except Exception as error:  # torch.save reports a full disk as a RuntimeError of its zip writer
            self._pending = None
            path = Path(str(path))
            free = shutil.disk_usage(path.parent).free / 2**30 if path.parent.is_dir() else float("nan")
            raise CheckpointError(f"writing the checkpoint {path} failed ({type(error).__name__}: {error}); "
                                  f"{free:.1f} GiB free there. The previous checkpoint is whole: free disk space (a "
                                  "save needs the previous file and the new one side by side) and resume with "
                                  "--ckpt_path last") from error
        self._pending = None

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.wait()
        return self.checkpoint_io.load_checkpoint(*args, **kwargs)

    def remove_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        self.wait()
        self.checkpoint_io.remove_checkpoint(*args, **kwargs)

    def teardown(self) -> None:
        # Lightning tears down from inside its handler of the exception that ended the run: a failed write is then
        # said, not raised in its place
        handling = sys.exc_info()[1] is not None
        try:
            self.wait()
        except CheckpointError as error:
            if not handling:
                raise
            rank_zero_info(f"qmath: {error}")
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
            self.checkpoint_io.teardown()


def wait_for_checkpoints(trainer: Trainer) -> None:
    """Until a checkpoint written in the background is on disk (no-op for a foreground checkpoint plugin)."""
    wait = getattr(trainer.strategy.checkpoint_io, "wait", None)
    if callable(wait):
        wait()


def _host_copier() -> Any:
    """A function from a tensor to its copy in host memory, each storage copied once (views keep sharing it)."""
    copies: dict[tuple[str, int, int], torch.UntypedStorage] = {}

    def copy(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.detach().untyped_storage()
        key = (str(storage.device), storage.data_ptr(), storage.nbytes())
        if key not in copies:
            copies[key] = storage.clone() if storage.device.type == "cpu" else storage.cpu()
        return torch.empty(0, dtype=tensor.dtype).set_(copies[key], tensor.storage_offset(), tensor.size(),
                                                       tensor.stride())

    return copy


def use_atomic_checkpoints(trainer: Any) -> None:
    """Swap the strategy's plain ``TorchCheckpointIO`` for atomic saves written in the background
    (:class:`BackgroundCheckpointIO`; under FSDP in the foreground); leave any other alone.
    ``trainer.plugins: [qmath.checkpointing.AtomicCheckpointIO]`` saves atomically in the foreground instead."""
    if type(trainer.strategy.checkpoint_io) is not TorchCheckpointIO:
        return
    from lightning.pytorch.strategies import FSDPStrategy

    # FSDP's full state dict is gathered into host memory already (17 GiB for fsdp.yaml): no second copy of it
    sharded = isinstance(trainer.strategy, FSDPStrategy)
    trainer.strategy.checkpoint_io = AtomicCheckpointIO() if sharded else BackgroundCheckpointIO()


class CheckpointOnSignal(Callback):
    """On SIGTERM or SIGUSR1, finish the current optimizer step, write ``last.ckpt`` and stop on every rank, so that
    ``--ckpt_path last`` continues exactly.

    The signal handler only sets a flag. At the end of each optimizer step the ranks agree on it (one boolean
    all-reduce) and, if any rank was signalled, all save once and stop together, without the validation Lightning
    runs when a run stops early and without a second checkpoint of the step. This replaces Lightning's own SIGTERM
    handler during training, which runs a collective inside the signal handler: with the signal arriving on two
    ranks at different points of their step (Lightning forwards rank 0's SIGTERM to the ranks it launched), those
    collectives pair with the wrong partners and the job hangs (measured here: rank 1 died, rank 0 waited in a
    barrier). Lightning's ``OnExceptionCheckpoint`` is no substitute either: it saves after any exception (a NaN, a
    reward that raised), a state not to resume from. SIGUSR1 (what SLURM sends before a time limit with
    ``--signal``) is left to Lightning's SLURM auto-requeue when that has claimed it. Added to every run by
    ``python -m qmath``.
    """

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self.signalled = False
        self._limit_val_batches: int | float | None = None

    def _flag(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.signalled = False
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            if signum == signal.SIGUSR1 and signal.getsignal(signum) not in (signal.SIG_DFL, None):
                continue  # Lightning's SLURM auto-requeue
            self._previous[signum] = signal.signal(signum, self._flag)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-way through an optimizer step's micro-batches
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        path = last_checkpoint_path(trainer)
        savers = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
        for callback in savers:
            if callback.save_last and os.path.abspath(last_checkpoint_path(trainer, callback)) == os.path.abspath(path):
                # ModelCheckpoint writes a `last-v1.ckpt` beside a `last.ckpt` it does not know it wrote; with
                # this (part of the saved state) its next save overwrites ours, as it would its own
                callback.last_model_path = path
        trainer.save_checkpoint(path)
        for callback in savers:
            # private: ModelCheckpoint's "already saved at this step" and "saved a last.ckpt", so neither its step's
            # save nor its on_train_end save (made when it has not saved one itself in this process) writes a
            # second checkpoint of this step (5.5 GiB for t4x2) inside a preemption's grace period
            callback._last_global_step_saved = trainer.global_step
            if callback.save_last:
                callback._last_checkpoint_saved = path
        # nor does the stop run a validation (Lightning validates on `should_stop`, for early stopping): a whole
        # held-out pass would outlast SLURM's 30-second default grace period; the resumed run validates on schedule
        self._limit_val_batches, trainer.limit_val_batches = trainer.limit_val_batches, 0
        trainer.should_stop = True
        wait_for_checkpoints(trainer)  # on disk before anything else (a preemption's grace period) can end us
        rank_zero_info(f"qmath: stopped by a signal after step {trainer.global_step}; saved {path}. "
                       "Resume with --ckpt_path last")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Finish a checkpoint being written in the background (it predates the failure, so it is one to resume
        from); if that write failed too, say so without hiding the exception that ended the run."""
        try:
            wait_for_checkpoints(trainer)
        except CheckpointError as error:
            rank_zero_info(f"qmath: {error}")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        if self._limit_val_batches is not None:  # the trainer validates again if it is used again
            trainer.limit_val_batches, self._limit_val_batches = self._limit_val_batches, None


def last_checkpoint_path(trainer: Trainer, callback: ModelCheckpoint | None = None) -> str:
    """Where ``--ckpt_path last`` looks: the (given) ``ModelCheckpoint``'s ``last.ckpt``, else the default root
    dir's."""
    for saver in [callback] if callback is not None else trainer.checkpoint_callbacks:
        if isinstance(saver, ModelCheckpoint) and saver.dirpath:
            return os.path.join(saver.dirpath, saver.CHECKPOINT_NAME_LAST + saver.FILE_EXTENSION)
    return os.path.join(trainer.default_root_dir, "last.ckpt")


# -- what qmath adds to a checkpoint ------------------------------------------------------------------------------
def rng_states() -> dict[str, Any]:
    """Every global RNG's state (torch, CUDA, numpy, Python) as plain tensors and containers, which load with
    ``weights_only=True``. Sampling is seeded per step, but anything else random (dropout, a user's reward) draws
    from these, so a resumed run restores them too. (Lightning's private ``_collect_rng_states``: if it moves, its
    replacement in ``lightning.fabric.utilities.seed`` does the same.)"""
    states = _collect_rng_states(include_cuda=torch.cuda.is_available())
    kind, keys, *rest = states["numpy"]  # a numpy array would need weights_only=False to load
    states["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), *rest)
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the RNGs to what :func:`rng_states` saved."""
    kind, keys, *rest = states["numpy"]
    _set_rng_states({**states, "numpy": (kind, keys.numpy().astype("uint32"), *rest)})


def own_rng_states(saved: Any, rank: int, world_size: int) -> dict[str, Any] | None:
    """This rank's generator states from a checkpoint's (one per rank, in rank order; a dict from a checkpoint
    written before they were). With another number of ranks than saved them, a rank beyond the saved ones keeps its
    seeded generators and a rank 0 says so once: draws outside sampling (dropout, a reward's ``random``) then differ
    from an uninterrupted run's, which with another world size would not be repeatable anyway."""
    if saved is None or isinstance(saved, dict):
        return saved
    if len(saved) != world_size:
        rank_zero_info(f"qmath: the checkpoint holds the random generators of {len(saved)} rank(s), this run has "
                       f"{world_size}; ranks beyond {len(saved) - 1} keep their seeded ones")
    return saved[rank] if rank < len(saved) else None


def base_identity(model_name_or_path: str, tokenizer: Any) -> dict[str, Any]:
    """What a checkpoint's weights only fit: the base model's name and its tokenizer's vocabulary."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {"model_name_or_path": model_name_or_path, "vocab_size": len(tokenizer),
            "vocab_sha1": hashlib.sha1(vocab.encode()).hexdigest()}


def check_base(checkpoint: dict[str, Any], identity: dict[str, Any], shapes: dict[str, torch.Size]) -> None:
    """Refuse a checkpoint of another base model or vocabulary (``identity``), or of other weight ``shapes``,
    before it is loaded."""
    theirs = {k: v.shape for k, v in checkpoint.get("state_dict", {}).items()}
    saved = checkpoint.get("qmath_base")
    if saved and saved != identity:
        differ = ", ".join(f"{k} {v!r} (now {identity.get(k)!r})" for k, v in saved.items() if v != identity.get(k))
    elif shapes != theirs:
        changed = sorted(k for k in shapes.keys() & theirs.keys() if shapes[k] != theirs[k])
        named = sorted(shapes.keys() ^ theirs.keys())
        example = (f"{changed[0]} is {tuple(theirs[changed[0]])} there, {tuple(shapes[changed[0]])} here" if changed
                   else f"{named[0]} is only {'there' if named[0] in theirs else 'here'}")
        differ = f"{len(changed)} weight shapes and {len(named)} weight names differ (e.g. {example})"
    else:
        return
    raise CheckpointError(
        f"the checkpoint was trained from another base model or vocabulary: {differ}. Resume it with the "
        f"--model.model_name_or_path it was trained from ({(saved or {}).get('model_name_or_path', 'unknown')}), "
        "or start a new run without --ckpt_path"
    )


LORA_OPTIONS = ("lora_r", "lora_alpha", "lora_target_modules")  # what the adapters' weights mean


def same_option(a: Any, b: Any) -> bool:
    """Option values equal, a list and a tuple (a YAML list and a saved one) alike."""
    return list(a) == list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b


def check_lora_options(saved: dict[str, Any], configured: Any) -> None:
    """Refuse a checkpoint whose adapters were trained with other LoRA options than the module's (``saved``: the
    checkpoint's hyperparameters), naming each; ``lora_alpha`` is no shape, so nothing else would notice it."""
    # without adapters on either side, only the rank says anything
    keys = ("lora_r",) if not saved.get("lora_r") and not configured.get("lora_r") else LORA_OPTIONS
    differ = [f"{k} {saved[k]!r} (now {configured.get(k)!r})" for k in keys
              if k in saved and not same_option(saved[k], configured.get(k))]
    if differ:
        flags = " ".join(f"--model.{k} {saved[k]!r}" for k in LORA_OPTIONS if k in saved)
        raise CheckpointError(f"the checkpoint was trained with other LoRA options: {', '.join(differ)}. Use its "
                              f"own ({flags}), or start a new run without --ckpt_path")


def two_decay_groups(checkpoint: dict[str, Any], order: list[Any], groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The optimizer and schedulers' states of a checkpoint written with one parameter group (``order``: its
    parameters, as it held them), laid out as ``groups`` (the parameters in their new groups, with their own
    options such as ``weight_decay: 0``); nothing when the checkpoint has other than one group with weight decay,
    or ``groups`` is one. Each parameter keeps its own moments; every group starts from the old group's options."""
    states = checkpoint.get("optimizer_states") or []
    if len(states) != 1 or len(states[0]["param_groups"]) != 1 or len(groups) < 2:
        return {}
    (old,) = states[0]["param_groups"]
    if not old.get("weight_decay") or len(old["params"]) != len(order):
        return {}  # no decay: one group is what configure_optimizers builds too
    position = {id(p): i for i, p in enumerate(order)}
    state, param_groups, new = {}, [], 0  # a state dict numbers the parameters through its groups in order
    for group in groups:
        ids = []
        for p in group["params"]:
            if position[id(p)] in states[0]["state"]:
                state[new] = states[0]["state"][position[id(p)]]
            ids.append(new)
            new += 1
        param_groups.append({**old, **{k: v for k, v in group.items() if k != "params"}, "params": ids})
    out: dict[str, Any] = {"optimizer_states": [{"state": state, "param_groups": param_groups}]}
    if "lr_schedulers" in checkpoint:  # one base rate per group
        out["lr_schedulers"] = [{k: v * len(groups) if k in ("base_lrs", "_last_lr") and isinstance(v, list)
                                 and len(v) == 1 else v for k, v in scheduler.items()}
                                for scheduler in checkpoint["lr_schedulers"]]
    return out


def non_finite_weights(state_dict: dict[str, Any]) -> list[str]:
    """The names of plain floating-point tensors that hold a NaN or an infinity (sharded ones are the step guard's
    to check)."""
    return [k for k, v in state_dict.items()
            if type(v) is torch.Tensor and v.is_floating_point() and not v.isfinite().all()]


def from_every_rank(value: Any, world_size: int) -> list[Any]:
    """``value`` from every rank, in rank order: only rank 0 writes the checkpoint, and each rank's own state (a
    rollout between two of its passes, its random generators) must be in it. Inside Lightning's SLURM requeue
    handler, which saves from within a signal handler at any point of a step, a collective could pair with the
    step's own (DDP's gradient all-reduce) and hang: there each rank's own value only (that save is mid-step and
    never resumes exactly anyway)."""
    if world_size == 1 or not torch.distributed.is_initialized() or _in_requeue_handler():
        return [value]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


REQUEUE_HANDLER = "_slurm_sigusr_handler_fn"  # Lightning's _SignalConnector method (tests/test_private_apis.py)


def _in_requeue_handler() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == REQUEUE_HANDLER:
            return True
        frame = frame.f_back
    return False


def save_state(module: Any, checkpoint: dict[str, Any]) -> None:
    """What a GRPO checkpoint holds beyond Lightning's: with LoRA only the adapters of the weights; every rank's
    random generators, in rank order (only rank 0's dict is written, and each rank draws its own numbers: LoRA
    dropout over its own completions, a reward that uses `random`); the skipped steps; the tokens trained on
    (TRL's ``num_tokens``); the base's identity; with
    ``num_iterations`` > 1, every rank's rollout (a checkpoint may fall between the μ steps that reuse one)."""
    if module.hparams.lora_r:
        kept = module.forms.checkpointed_keys(set(checkpoint["state_dict"]))
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in kept}
    bad = non_finite_weights(checkpoint.get("state_dict", {}))
    if bad:
        raise NonFiniteError(f"refusing to save a checkpoint with non-finite weights ({len(bad)} tensors, e.g. "
                             f"{bad[0]}); the last saved checkpoint is kept")
    world = module.trainer.world_size
    checkpoint |= {"qmath_rng_states": from_every_rank(rng_states(), world),
                   "qmath_skipped_steps": module.guard.skipped, "qmath_base": module.forms.base,
                   "qmath_num_tokens": module.num_tokens, "qmath_rollout_copy_dropped": module.forms.copy_dropped,
                   # each rank's released decoders stay released (lists: a weights_only load takes no tuples)
                   "qmath_failed_decoders": from_every_rank(
                       [[c, mode, why] for (c, mode), why in module.sampler.failed.items()], world)}
    if module.hparams.num_iterations > 1:
        own = {"micro_batches": [m.state() for m in module.micro_batches],
               "stats": {k: v.cpu() for k, v in module.rollout_stats.items()}}
        checkpoint["qmath_rollouts"] = from_every_rank(own, world)


def load_state(module: Any, checkpoint: dict[str, Any]) -> None:
    """Check that ``checkpoint`` fits ``module`` (LoRA options, base model, weight shapes) and restore what
    :func:`save_state` added; each rank continues on its own rollout (with another number of ranks, the next step
    samples anew). The generators are restored when training starts (``module._rng_states``)."""
    check_lora_options(checkpoint.get("hyper_parameters", {}), module.hparams)
    # a checkpoint from before weight decay spared biases and norms holds one parameter group: split it
    checkpoint.update(two_decay_groups(checkpoint, module._trainable(), module.parameter_groups()))
    own = module.state_dict()
    kept = module.forms.checkpointed_keys(set(own))
    check_base(checkpoint, module.forms.base, {k: v.shape for k, v in own.items() if k in kept})
    module.guard.skipped = checkpoint.get("qmath_skipped_steps", 0)
    module.num_tokens = checkpoint.get("qmath_num_tokens", 0)
    module.forms.copy_dropped = checkpoint.get("qmath_rollout_copy_dropped", False)
    world, rank = module.trainer.world_size, module.global_rank
    failed = checkpoint.get("qmath_failed_decoders", [])
    for copied, mode, why in (failed[rank] if len(failed) == world else []):  # another world size: tried anew
        module.sampler.failed[copied, mode] = why
        if (copied, mode) in module.sampler.decoders:
            module.sampler.decoders[copied, mode].error = why
    module._rng_states = own_rng_states(checkpoint.get("qmath_rng_states"), rank, world)
    rollouts = checkpoint.get("qmath_rollouts", [])
    mine = rollouts[rank] if len(rollouts) == world else {}
    # a rollout saved before rollouts said where they came from: sampling log-probs with a rollout_dtype are the copy's
    module.micro_batches = [Rollout.from_state({"copied": m.get("sampling_logps") is not None and bool(
        module.hparams.rollout_dtype), **m}) for m in mine.get("micro_batches", [])]
    module.rollout_stats = mine.get("stats", {})
