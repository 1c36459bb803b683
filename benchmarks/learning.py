"""Proof of learning: held-out accuracy of the embedded default before and after one `fit`, and its curves.

    python benchmarks/learning.py --seed 0 [--num-val 500] [--workdir learning] [--png docs/learning.png]
                                  [--select] [-- extra fit options, e.g. --model.optimizer.init_args.lr 1e-5]

1. Greedy evaluation of the base model on the data module's held-out split (``--num-val`` synthetic problems,
   always the generator's 1/2/3-step mix). Greedy decoding is deterministic, so this result is cached in the workdir
   and reused by later seeds.
2. ``python -m qmath fit`` of the embedded default (``configs/cpu.yaml``) with ``--seed_everything SEED``.
3. The same evaluation of the trained policy (its ``last.ckpt``).
4. Prints each reward component's mean over the first and last 10 steps, and the held-out strict-format rate and
   accuracies before and after, with standard errors; writes ``results.json`` and a PNG of the training curves
   read back from the TensorBoard event file.

``--select`` evaluates on a selection slice instead: the first ``--num-val`` problems of another seed's held-out
stream (``--data.seed SELECT_SEED`` for the evaluations only; training is unchanged), so that recipes are chosen on
problems that the held-out figures do not use.

Standard errors: of a rate p over n problems, sqrt(p(1 - p) / n); of the accuracy change, the paired one (the same
problems before and after): the standard deviation of the per-problem change over sqrt(n).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_SCORE = {"xmlcount": 0.5, "soft_format": 0.5, "strict_format": 0.5, "int": 0.5, "correctness": 2.0}
CURVES = [("train/rewards/" + n + "/mean", n) for n in MAX_SCORE]


# the report's names for the graded answers' fields (qmath.evaluation.Answer)
GRADED = {"strict": "correct", "lenient": "correct_lenient", "format": "format"}


def evaluate(num_val: int, options: list[str], workdir: Path, ckpt: str | None = None,
             maj_k: int | None = None) -> tuple[list[dict], dict[str, float]]:
    """Greedy answers on the held-out problems, one record per problem: question, and strict, lenient, format;
    and the logged metrics (with ``maj_k``, ``val/accuracy_mean@k``: the accuracy of samples at the run's
    temperature, which is what training's correctness reward sees)."""
    from qmath.__main__ import main

    args = ["validate", "--data.num_val", str(num_val), "--trainer.logger", "false",
            "--trainer.default_root_dir", str(workdir),  # where LightningCLI saves its config.yaml
            "--trainer.enable_progress_bar", "false", *options]
    if maj_k:
        args += ["--model.maj_k", str(maj_k)]
    if ckpt:
        args += ["--ckpt_path", ckpt]
    cli = main(args)
    records = [{"question": a.question, **{key: getattr(a, field) for key, field in GRADED.items()}}
               for a in cli.model.val_records]
    return records, {name: float(value) for name, value in cli.trainer.callback_metrics.items()}


def steps_of(num_val: int, data_seed: int) -> dict[str, int]:
    """Each held-out question's number of calculation steps (the lines of its solution before ``####``)."""
    from qmath.synthetic import make_splits

    return {row["question"]: row["answer"].count("\n") for row in make_splits(0, num_val, data_seed)[1]}


# fit options that shape training only: greedy evaluation on the held-out set does not depend on them
TRAINING_ONLY = ("--model.temperature", "--model.top_p", "--model.top_k", "--model.beta", "--model.epsilon",
                 "--model.loss_type", "--model.scale_rewards", "--model.num_iterations", "--model.num_generations",
                 "--model.mask_truncated_completions", "--model.dynamic_sampling", "--model.max_sampling_rounds",
                 "--model.rewards", "--model.optimizer", "--model.lr_scheduler", "--model.gradient_checkpointing",
                 "--model.rollout_",  # rollout_dtype and its correction: evaluation reads the policy
                 "--data.difficulty", "--data.num_train", "--data.batch_size", "--data.num_workers")


def model_and_data_options(options: list[str], adapters: bool = True) -> list[str]:
    """The ``--model.*`` and ``--data.*`` options (``--k v`` or ``--k=v``) of a fit command line that can change
    greedy evaluation, so that the evaluation matches the run and the cached baseline is shared where it may be.
    Without ``adapters``, no LoRA options: untrained adapters change no answer, so the base model's evaluation
    serves LoRA and full runs alike (a LoRA checkpoint needs them to be loaded)."""
    out, keep = [], False
    for option in options:
        if option.startswith("--"):
            keep = option.startswith(("--model.", "--data.")) and not option.startswith(TRAINING_ONLY)
            keep = keep and (adapters or not option.startswith("--model.lora_"))
        if keep:
            out.append(option)
    return out


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (training, and the evaluations around it)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


def rate(records: list[dict], key: str) -> tuple[float, float]:
    n = len(records)
    p = sum(r[key] for r in records) / n
    return p, math.sqrt(p * (1 - p) / n)


def paired_change(before: list[dict], after: list[dict], key: str) -> tuple[float, float]:
    if [r["question"] for r in before] != [r["question"] for r in after]:
        raise SystemExit("the held-out problems differ between the two evaluations; delete the cached before-*.json")
    diffs = [float(a[key]) - float(b[key]) for a, b in zip(after, before)]
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mean_se(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def plot(scalars: dict, heldout: dict, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(points: list[tuple[int, float]], k: int = 5, scale: float = 1.0) -> tuple[list[int], list[float]]:
        steps, values = zip(*points)
        out = [statistics.fmean(values[max(0, i - k + 1): i + 1]) / scale for i in range(len(values))]
        return list(steps), out

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for tag, name in CURVES:
        if tag in scalars:
            axes[0].plot(*smooth(scalars[tag], scale=MAX_SCORE[name]), label=name)
    axes[0].set_title("reward components ÷ their maximum\n(training samples, 5-step running mean)")
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    if "train/completions/mean_length" in scalars:
        axes[1].plot(*zip(*scalars["train/completions/mean_length"]), alpha=0.3, color="C0")
        axes[1].plot(*smooth(scalars["train/completions/mean_length"]), color="C0")
    axes[1].set_title("train/completions/mean_length (tokens)")
    if "train/kl" in scalars:
        axes[2].plot(*zip(*scalars["train/kl"]), color="C3")
    axes[2].set_title("kl (to the reference model)")
    for ax in axes[:3]:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    labels = {"format": "strict format", "strict": "accuracy\n(strict)", "lenient": "accuracy\n(lenient)"}
    x = range(len(labels))
    for offset, when, color in [(-0.2, "before", "C7"), (0.2, "after", "C2")]:
        values = [heldout[k][when][0] for k in labels]
        errors = [heldout[k][when][1] for k in labels]
        axes[3].bar([i + offset for i in x], values, 0.4, yerr=errors, label=when, color=color, capsize=3)
    axes[3].set_xticks(list(x), list(labels.values()))
    axes[3].set_title("held-out, greedy (± standard error)")
    axes[3].legend(fontsize=8)
    axes[3].grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed_everything of the training run")
    parser.add_argument("--num-val", type=int, default=500, help="held-out problems (at least 200)")
    parser.add_argument("--workdir", default="learning", help="where runs, the cached baseline and results go")
    parser.add_argument("--png", default=None, help="the curves' PNG (default: WORKDIR/seedN/learning.png)")
    parser.add_argument("--select", action="store_true",
                        help="evaluate on the selection slice (another generator seed), not on the held-out set")
    parser.add_argument("--select-seed", type=int, default=1000, help="data.seed of the selection slice")
    parser.add_argument("--maj-k", type=int, default=None,
                        help="also sample k answers per problem at the run's temperature, before and after, and "
                             "report their mean accuracy (accuracy_mean@k) beside the greedy one")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("fit_options", nargs="*", help="after --: extra `fit` options")
    args = parser.parse_args(argv)
    if args.num_val < 200:
        parser.error("--num-val must be at least 200")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir).resolve()
    run_dir = workdir / (f"seed{args.seed}" + ("-select" if args.select else ""))
    run_dir.mkdir(parents=True, exist_ok=True)
    png = Path(args.png).resolve() if args.png else run_dir / "learning.png"
    cwd, argv_before = os.getcwd(), sys.argv
    os.chdir(run_dir)  # the run's lightning_logs/ land here
    sys.argv = sys.argv[:1]  # LightningCLI gets its arguments from us, not from this script's command line
    try:
        return run(args, workdir, run_dir, png)
    finally:
        os.chdir(cwd)
        sys.argv = argv_before


def run(args: argparse.Namespace, workdir: Path, run_dir: Path, png: Path) -> dict:
    # validation must use the training run's model and data settings (lengths, prompt format)
    # the selection slice's --data.seed comes last: it overrides the run's for the evaluations only
    select = ["--data.seed", str(args.select_seed)] if args.select else []
    eval_options = model_and_data_options(args.fit_options) + select
    base_options = model_and_data_options(args.fit_options, adapters=False) + select
    # the sampled evaluation depends on the temperature, which training-only options may set
    sampling = [o for o in args.fit_options if o.startswith("--model.temperature")] if args.maj_k else []
    key = hashlib.sha1(json.dumps(base_options + sampling + [args.maj_k or 0]).encode()).hexdigest()[:8]
    cache = workdir / f"before-{args.num_val}-{key}.json"
    if cache.exists():
        before, before_metrics = json.loads(cache.read_text())
    else:
        start = time.time()
        before, before_metrics = evaluate(args.num_val, base_options + sampling, workdir, maj_k=args.maj_k)
        cache.write_text(json.dumps([before, before_metrics]))
        print(f"before: evaluated {len(before)} problems in {time.time() - start:.0f} s", flush=True)

    from qmath.__main__ import main as qmath_main

    start = time.time()
    cli = qmath_main(["fit", "--seed_everything", str(args.seed), "--trainer.limit_val_batches", "0",
                      "--trainer.enable_progress_bar", "false", *args.fit_options])
    fit_seconds = time.time() - start
    log_dir = str(Path(cli.trainer.logger.log_dir).resolve())
    ckpt = str(Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt")
    start = time.time()
    after, after_metrics = evaluate(args.num_val, eval_options + sampling, workdir, ckpt, args.maj_k)
    print(f"after: evaluated {len(after)} problems in {time.time() - start:.0f} s", flush=True)

    scalars = read_scalars(log_dir)
    steps = len(scalars["train/reward"])
    report = {"seed": args.seed, "num_val": args.num_val, "select_seed": args.select_seed if args.select else None,
              "fit_options": args.fit_options, "steps": steps,
              "fit_seconds": round(fit_seconds), "log_dir": log_dir, "rewards": {}, "heldout": {},
              "peak_rss_gib": peak_rss_gib()}
    print(f"\nseed {args.seed}: {steps} steps in {fit_seconds / 60:.1f} min ({fit_seconds / steps:.1f} s/step, "
          f"peak RSS {report['peak_rss_gib']:.2f} GiB); "
          f"{'selection slice' if args.select else 'held-out'}: {args.num_val} synthetic problems, greedy")
    print(f"{'reward component':<36}{'first 10 steps':>18}{'last 10 steps':>18}")
    for tag in [t for t, _ in CURVES] + ["train/reward", "train/completions/mean_length"]:
        values = [v for _, v in scalars.get(tag, [])]
        if len(values) >= 2:
            first, last = mean_se(values[:10]), mean_se(values[-10:])
            report["rewards"][tag] = {"first10": first, "last10": last}
            print(f"{tag:<36}{first[0]:>10.3f} ± {first[1]:.3f}{last[0]:>10.3f} ± {last[1]:.3f}")
    print(f"\n{'held-out':<28}{'before':>18}{'after':>18}{'change':>18}{'z':>6}")
    for key, label in [("format", "strict-format rate"), ("strict", "accuracy (strict)"),
                       ("lenient", "accuracy (lenient)")]:
        b, a = rate(before, key), rate(after, key)
        change, se = paired_change(before, after, key)
        z = change / se if se else float("nan")
        report["heldout"][key] = {"before": b, "after": a, "change": change, "change_se": se, "z": z}
        print(f"{label:<28}{b[0]:>10.1%} ± {b[1]:.1%}{a[0]:>10.1%} ± {a[1]:.1%}{change:>+10.1%} ± {se:.1%}{z:>6.1f}")
    # the evaluations' generator seed: the selection slice's, else the run's --data.seed (0 in cpu.yaml)
    seeds = [o.split("=", 1)[1] if "=" in o else nxt for o, nxt in zip(args.fit_options, args.fit_options[1:] + [""])
             if o.split("=", 1)[0] == "--data.seed"]
    steps_by_question = steps_of(args.num_val, args.select_seed if args.select else int((seeds or ["0"])[-1]))
    report["by_steps"] = {}
    for n in sorted(set(steps_by_question.values())):
        pick = [i for i, r in enumerate(before) if steps_by_question.get(r["question"]) == n]
        if pick:
            b, a = (sum(records[i]["strict"] for i in pick) / len(pick) for records in (before, after))
            report["by_steps"][n] = {"problems": len(pick), "before": b, "after": a}
            print(f"{f'  {n}-step problems ({len(pick)})':<28}{b:>10.1%}{'':>8}{a:>10.1%}")
    if args.maj_k:
        name = f"val/accuracy_mean@{args.maj_k}"
        report["sampled"] = {"k": args.maj_k, "before": before_metrics[name], "after": after_metrics[name]}
        print(f"{f'sampled accuracy (mean@{args.maj_k})':<28}{before_metrics[name]:>10.1%}{'':>8}"
              f"{after_metrics[name]:>10.1%}")
    (run_dir / "results.json").write_text(json.dumps(report, indent=2))
    (run_dir / "after.json").write_text(json.dumps(after))
    acc, fmt = report["heldout"]["strict"], report["heldout"]["format"]
    title = (f"seed {args.seed}, {steps} steps: held-out accuracy {acc['before'][0]:.1%} → {acc['after'][0]:.1%} "
             f"(n = {args.num_val}), strict format {fmt['before'][0]:.1%} → {fmt['after'][0]:.1%}")
    plot(scalars, report["heldout"], png, title)
    print(f"\ncurves: {png}\nresults: {run_dir / 'results.json'}")
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
