"""Callbacks: monitoring (start-up summary, TensorBoard layout and hparams, completions), predictions, failures."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

# Private Lightning APIs (tests/test_private_apis.py fails if one disappears; then use what replaced it):
# _convert_params/_flatten_dict and TensorBoardLogger._sanitize_params turn hparams into what TensorBoard's HParams
# plugin accepts, exactly as Lightning's own log_hyperparams does; _SubprocessScriptLauncher.procs and
# _get_sigkill_signal are how Lightning's launcher holds and kills the ranks it started.
from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.trainer.connectors.signal_connector import _get_sigkill_signal
from lightning.pytorch.utilities.exceptions import SIGTERMException

from qmath.versions import prompt_sharing_warning, versions


class LogCompletions(Callback):
    """Every ``every_n_steps`` optimizer steps, log a table of sampled completions as TensorBoard text.

    Args:
        every_n_steps: how often to log, in optimizer steps.
        num_samples: how many completions of the latest rollout to show.
    """

    def __init__(self, every_n_steps: int = 10, num_samples: int = 4) -> None:
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        rollout = getattr(pl_module, "last_rollout", None)
        if not rollout or not trainer.is_global_zero or (step - 1) % self.every_n_steps:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("completions", self.table(rollout), global_step=step)

    def table(self, rollout: dict[str, list]) -> str:
        """A markdown table: the prompt's question, the completion, then each reward, their total and the advantage."""
        columns = [c for c in rollout if c not in ("question", "completion")]
        header = "| prompt | completion | " + " | ".join(columns) + " |"
        lines = [header, "|" + " --- |" * (len(columns) + 2)]
        for i in range(min(self.num_samples, len(rollout["completion"]))):
            question = rollout["question"][i] if rollout.get("question") else ""
            cells = [_cell(question), _cell(rollout["completion"][i])]
            cells += [f"{rollout[c][i]:.3f}" for c in columns]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _cell(text: str) -> str:
    # every line boundary str.splitlines knows (a sampled \x1e or \u2028 too): one table row per completion
    return "<br>".join(text.replace("|", "\\|").splitlines())


class LoggerStepIsGlobalStep(Callback):
    """Keep the loggers' step equal to ``global_step`` (optimizer steps) from a run's first batch on.

    Lightning 2.6 restarts its logging step one ahead when it resumes from the ``last.ckpt`` that ModelCheckpoint
    writes at the end of fit after the last step's validation, which would shift every curve of the resumed run by
    a step. The step is corrected before each training batch, here rather than in a LightningModule hook: the
    module's own ``on_train_batch_start`` runs after the callbacks' (LearningRateMonitor logs from there), and a
    data hook such as ``on_before_batch_transfer`` overridden on the module makes Lightning warn when a data module
    is passed. ``python -m qmath`` puts it first among the trainer's callbacks.
    """

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        loop = trainer.fit_loop.epoch_loop
        if hasattr(loop, "_batches_that_stepped"):  # private; tests/test_private_apis.py checks that it exists
            loop._batches_that_stepped = trainer.global_step


class EndAllRanksOnException(Callback):
    """When the process that launched the other ranks fails, kill them instead of leaving them to wait for it.

    Lightning already ends the job when a launched rank dies (its process observer), but not when the launching
    rank (rank 0) raises: the others then wait in a collective for a peer that is gone, which on NCCL lasts until
    the process-group timeout (30 minutes). Jobs started by torchrun or SLURM are ended by those launchers instead.
    Added to every run by ``python -m qmath``.
    """

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):  # Lightning raises it on every rank at the same step: none waits
            return
        launcher = trainer.strategy.launcher
        if isinstance(launcher, _SubprocessScriptLauncher) and launcher.procs:
            launcher.kill(_get_sigkill_signal())


class RunSummary(Callback):
    """Prints what is about to run, once, on rank 0: model and parameters, devices, precision, work per step, and
    where logs, checkpoints and predictions go. Added to every run by ``python -m qmath``."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._print(trainer, pl_module, "fit")

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":  # not the periodic validation inside fit
            self._print(trainer, pl_module, "validate")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._print(trainer, pl_module, "test")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._print(trainer, pl_module, "predict")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and not getattr(self, "_graphs_said", False):
            self._graphs_said = True  # after the first validation: every kind of call has been made once
            self._say_graphs(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._say_graphs(trainer, pl_module)

    @staticmethod
    def _say_graphs(trainer: Trainer, pl_module: LightningModule) -> None:
        """The compiled graphs, the decoders the run released, and a rollout copy it dropped."""
        sampler, forms = getattr(pl_module, "sampler", None), getattr(pl_module, "forms", None)
        if not trainer.is_global_zero or sampler is None:
            return
        if sampler.compiled(trainer.strategy.root_device) or sampler.failed:
            print(f"qmath: {sampler.graph_count()}", flush=True)
        if forms is not None and forms.copy_dropped:
            print(f"qmath: the {pl_module.hparams.rollout_dtype} rollout copy overflowed and was dropped: rollouts "
                  "read the policy (train/sampling/rollout_copy_dropped)", flush=True)

    def _print(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        lines = self.lines(trainer, pl_module, stage)  # on every rank: trainer.log_dir is a collective under DDP
        if trainer.is_global_zero:
            print("\n".join(lines), flush=True)

    @staticmethod
    def lines(trainer: Trainer, pl_module: LightningModule, stage: str) -> list[str]:
        hp, data = pl_module.hparams, trainer.datamodule
        params = sum(p.numel() for p in pl_module.parameters())
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        resolved = getattr(pl_module.policy, "name_or_path", "")
        source = hp.model_name_or_path + (f" ({resolved})" if resolved and resolved != hp.model_name_or_path else "")
        world = trainer.world_size
        reference = stage == "fit" and hp.beta != 0  # loaded in the module's on_fit_start, after this hook
        lora = bool(hp.get("lora_r"))
        frozen = sum(p.numel() * p.element_size() for p in pl_module.parameters() if not p.requires_grad)
        lines = [f"qmath {stage}: {versions()}",
                 f"  model        {source}",
                 f"  parameters   {count(params)} ({count(trainable)} trainable)"
                 + (f"; a frozen copy is the KL reference (beta {hp.beta})" if reference and not lora else "")
                 + (f"; LoRA r={hp.lora_r}, alpha={hp.lora_alpha} on {hp.lora_target_modules}" if lora else "")
                 + (f"; the KL reference (beta {hp.beta}) is the base with the adapters off: no copy loaded, "
                    f"{frozen / 2**30:.2f} GiB saved" if reference and lora else ""),
                 f"  devices      {world} x {trainer.strategy.root_device.type} ({type(trainer.strategy).__name__}, "
                 f"{trainer.num_nodes} node(s)), precision {trainer.precision}"]
        sampler = getattr(pl_module, "sampler", None)
        if sampler is not None:
            pl_module.plan_decoding()  # (the module's own hook plans too, after this one)
            decoding = sampler.describe(trainer.strategy.root_device)
            forms = getattr(pl_module, "forms", None)
            copied = forms.copy_dtype(trainer.strategy.root_device) if forms is not None and stage == "fit" else None
            if copied and sampler.rollout_model is None:  # the copy loads after this hook
                corrected = hp.rollout_importance_sampling_correction and not sampler.mode(
                    trainer.strategy.root_device).startswith("transformers")  # generate gives no sampling log-probs
                decoding += f"; rollouts from a {copied} copy of the policy" + (
                    f" ({hp.rollout_importance_sampling_mode} correction)" if corrected else ", uncorrected")
            lines.append(f"  decoding     {decoding}")
        if stage == "fit":
            prompts, accumulate = data.hparams.batch_size, trainer.accumulate_grad_batches
            g = hp.num_generations
            lines += [f"  per step     {prompts} prompt(s) x {g} generations x {accumulate} micro-batch(es) x {world} "
                      f"device(s) = {prompts * accumulate * world} prompts, {prompts * g * accumulate * world} "
                      f"completions per optimizer step, sampled every {hp.num_iterations} step(s)",
                      f"  data         {data.describe('train')}: {len(data.train_rows)} training prompts, "
                      f"{len(data.val_rows)} held-out for validation; {trainer.max_steps} steps"]
        elif data is not None:
            rows = {"validate": data.val_rows, "test": data.test_rows, "predict": data.predict_rows}[stage]
            split = "validation" if stage == "validate" else stage
            lines.append(f"  data         {data.describe(split)}: {len(rows)} problems, greedy, up to "
                         f"{hp.max_completion_length} tokens" + (f"; maj@{hp.maj_k}" if hp.maj_k else ""))
        warning = prompt_sharing_warning(stage == "fit" and hp.gradient_checkpointing)
        return lines + RunSummary.outputs(trainer, stage) + ([f"  warning      {warning}"] if warning else [])

    @staticmethod
    def outputs(trainer: Trainer, stage: str) -> list[str]:
        """Where the run writes: logs, checkpoints, predictions."""
        lines = []
        if trainer.log_dir and trainer.loggers:
            logs = trainer.log_dir
            board = Path(trainer.loggers[0].save_dir or ".")
            lines.append(f"  logs         {logs} (tensorboard --logdir {board})")
        checkpoint = trainer.checkpoint_callback
        if stage == "fit" and isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath:
            every = checkpoint._every_n_train_steps  # private; only the summary line reads it
            lines.append(f"  checkpoints  {checkpoint.dirpath}" + (f" (last.ckpt every {every} steps; resume with "
                                                                   "--ckpt_path last)" if every else ""))
        writer = next((c for c in trainer.callbacks if isinstance(c, WritePredictions)), None)
        if stage == "predict" and writer is not None:
            lines.append(f"  predictions  {writer.output_path(trainer)}")
        return lines


class StatusLines(Callback):
    """When standard output is not a terminal (a log file, a notebook's background job), print one status line
    every ``trainer.log_every_n_steps`` optimizer steps, as HF's Trainer prints its log lines, and one after each
    validation; the progress bar only draws on a terminal. Rank 0 only. Added to every run by ``python -m qmath``.

    ``qmath: step 20/400 | reward 1.234 | accuracy 0.250 | kl 0.0012 | entropy 0.412 | length 87 | 21.3 s/step |
    ETA 2:15:00``
    (``accuracy``: the sampled completions' strict accuracy; s/step: the mean of the last 10 steps).
    """

    SHOWN = (("train/reward", "reward", "{:.3f}"), ("train/accuracy", "accuracy", "{:.3f}"),
             ("train/kl", "kl", "{:.4f}"), ("train/entropy", "entropy", "{:.3f}"),
             ("train/completions/mean_length", "length", "{:.0f}"))

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream  # default: sys.stdout at the time of printing
        self._times: list[float] = []
        self._step = -1

    def _enabled(self, trainer: Trainer) -> bool:
        stream = self.stream or sys.stdout
        return trainer.is_global_zero and not (hasattr(stream, "isatty") and stream.isatty())

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._times, self._step = [time.perf_counter()], trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._step:  # a micro-batch inside an accumulated step
            return
        self._step = step
        self._times = [*self._times[-10:], time.perf_counter()]
        every = max(1, trainer.log_every_n_steps)
        if not self._enabled(trainer) or (step % every and step != trainer.max_steps):
            return
        metrics = trainer.callback_metrics
        parts = [f"step {step}/{trainer.max_steps}" if trainer.max_steps > 0 else f"step {step}"]
        parts += [f"{label} {fmt.format(float(metrics[key]))}" for key, label, fmt in self.SHOWN if key in metrics]
        if len(self._times) > 1:
            seconds = (self._times[-1] - self._times[0]) / (len(self._times) - 1)
            parts.append(f"{seconds:.1f} s/step")
            if trainer.max_steps > step:
                parts.append(f"ETA {datetime.timedelta(seconds=round(seconds * (trainer.max_steps - step)))}")
        self._print(" | ".join(parts))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self._enabled(trainer):
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if metrics:
            self._print(f"validation at step {trainer.global_step} | "
                        + " | ".join(f"{k.removeprefix('val/')} {v:.3g}" for k, v in sorted(metrics.items())))

    def _print(self, line: str) -> None:
        print(f"qmath: {line}", file=self.stream or sys.stdout, flush=True)


def count(n: int) -> str:
    """A parameter count as people write it.

    >>> count(134_515_008), count(1_543_714_304), count(53_312)
    ('134.5M', '1.54B', '53,312')
    """
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


class TensorBoardLayout(Callback):
    """Sets up TensorBoard at the start of ``fit``: a custom-scalars layout that puts the reward components in one
    chart (and accuracy, clipping and lengths in theirs), and an HParams entry whose metrics are the run's own
    scalars (``train/reward``, ``val/accuracy_strict``…), so the HParams tab shows their final values. Added to
    every run by ``python -m qmath``; TensorBoard loggers only.
    """

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        from torch.utils.tensorboard.summary import hparams

        names = [r.name for r in pl_module.rewards]
        metrics = ["train/reward", "train/accuracy", "train/kl", "train/completions/mean_length",
                   *[f"train/rewards/{n}/mean" for n in names], *[f"val/{n}" for n in pl_module.val_metrics]]
        params = {**(trainer.datamodule.hparams if trainer.datamodule is not None else {}), **pl_module.hparams}
        params.pop("_instantiator", None)
        params = TensorBoardLogger._sanitize_params(_flatten_dict(_convert_params(params)))
        # NaN placeholders: the HParams tab reads each metric's latest scalar from the run, i.e. its final value
        summaries = hparams(params, {m: float("nan") for m in metrics})
        for logger in loggers:
            # Lightning would write a second HParams entry with an `hp_metric` of -1; TensorBoard shows the first.
            # (Private: the logger's flag for that entry, and torch's SummaryWriter's file writer, which takes raw
            # summaries. If either moves, the test of the HParams entry fails.)
            logger._default_hp_metric = False
            writer = logger.experiment._get_file_writer()
            for summary in summaries:
                writer.add_summary(summary)
            logger.experiment.add_custom_scalars(self.layout(names, list(pl_module.val_metrics),
                                                             pl_module.hparams.get("loss_type", "grpo")))

    @staticmethod
    def layout(rewards: list[str], evaluated: list[str], loss_type: str = "grpo") -> dict[str, Any]:
        """The charts, each of scalars that this run logs (the ratio statistics are the loss type's)."""
        ratios, ratio_tags = {"cispo": ("clipped weights", ["^train/cispo_clip_ratio$"]),
                              "vespo": ("sequence weights", ["^train/vespo/phi_seq_mean$"]),
                              "sapo": ("", [])}.get(
                                  loss_type, ("clipped ratios", ["^train/clip_ratio/"]))
        return {"qmath": {
            "rewards (each component's mean, and the weighted total)":
                ["Multiline", [f"^train/rewards/{n}/mean$" for n in rewards] + ["^train/reward$"]],
            "accuracy (samples; greedy on held-out problems)":
                ["Multiline", ["^train/accuracy$"]
                 + [f"^val/{n}$" for n in evaluated if n != "completions/mean_length"]],
            "completion length (tokens; terminated: those that ended with an EOS)":
                ["Multiline", ["^train/completions/(mean|min|max)_(terminated_)?length$",
                               "^val/completions/mean_length$"]],
            "policy: entropy (nats per completion token)": ["Multiline", ["^train/entropy$"]],
            "policy: KL" + (f" and {ratios}" if ratios else ""): ["Multiline", ["^train/kl$", *ratio_tags]],
            "reward spread (std over the step's completions)":
                ["Multiline", ["^train/reward_std$", "^train/rewards/.*/std$"]],
            "optimizer: gradient norm before clipping": ["Multiline", ["^train/grad_norm$"]],
            "throughput: seconds per optimizer step": ["Multiline", ["^train/step_time$"]],
            "throughput: prompt and completion tokens trained on": ["Multiline", ["^train/num_tokens$"]],
        }}


class WritePredictions(BasePredictionWriter):
    """Writes ``predict``'s answers as JSONL, one line per input row and in the input's order, also across ranks.

    Each line holds the input row's own columns, then ``prompt`` (as the model saw it), ``completion``,
    ``extracted_answer`` (the number in ``<answer>``, or null), ``ground_truth``, ``correct`` (strict),
    ``correct_lenient`` (the last number), ``format`` and ``completion_tokens``; the last four are null when the row
    gives no answer.

    Args:
        path: the JSONL file to write. ``None``: ``predictions.jsonl`` in the run's log directory
            (``lightning_logs/<name>/version_N/``), so that no earlier output is overwritten.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.path = path
        self.written: Path | None = None

    def output_path(self, trainer: Trainer) -> Path:
        if self.path:
            return Path(self.path)
        return Path(trainer.log_dir or ".") / "predictions.jsonl"

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: Any,
                           batch_indices: Any) -> None:
        records = [r for batch in predictions for r in batch]
        path = self.output_path(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        if not trainer.is_global_zero:
            return
        rows = trainer.datamodule.predict_rows
        records.sort(key=lambda r: r["index"])
        if [r["index"] for r in records] != list(range(len(rows))):
            raise RuntimeError(f"predict answered {len(records)} rows for {len(rows)} inputs; nothing was written")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("w") as f:  # written whole, then renamed: a reader never sees half a file
            for record, row in zip(records, rows):
                record = {k: v for k, v in record.items() if k != "index"}
                source = row.get("source") or {"question": row["question"], "answer": row["answer"]}
                f.write(json.dumps({**source, **record}, default=str) + "\n")
        os.replace(tmp, path)
        self.written = path
        print(f"qmath: wrote {len(records)} predictions to {path}", flush=True)
