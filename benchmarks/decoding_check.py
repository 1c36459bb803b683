"""How far a correct decoder's sampling log-probs are from the trainer's: the numbers the decoding check's bounds
(``qmath.decoding_check.BOUNDS``) are set from.

    python benchmarks/decoding_check.py               # the embedded default, 8 steps at fp32 and from a bf16 copy
    python benchmarks/decoding_check.py --steps 2 --tiny MODEL_DIR   # any local model (what the test suite runs)

Each run is ``python -m qmath fit`` (cpu.yaml) for ``--steps`` steps, with rollouts from the policy itself
(``rollout_dtype: null``, fp32) and from a bfloat16 copy (made on any CPU here, also one without native bf16, where
it decodes slowly but rounds the same), with each backend of the loop that runs on this device (``eager``, and
``graphs``: the fixed-shape step a GPU captures, uncaptured). It prints, per run, the largest per-step mean and the
largest single ``|π_old - π_sampling|`` over the completion tokens (TRL's
``sampling/sampling_logp_difference/{mean,max}``), against the bounds in force.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any


def run(steps: int, rollout_dtype: str | None, backend: str, workdir: Path, model: str | None) -> dict[str, Any]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import qmath.policy
    from qmath.__main__ import main

    name = f"{rollout_dtype or 'float32'}-{backend}"
    args = ["fit", "--config", "cpu", "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
            "--trainer.enable_checkpointing", "false", "--trainer.callbacks=[]", "--trainer.logger.init_args.save_dir",
            str(workdir), "--trainer.logger.init_args.name", name, "--model.rollout_dtype",
            str(rollout_dtype).lower() if rollout_dtype else "null", "--model.generation_backend", backend]
    if model:
        args += ["--model.model_name_or_path", model, "--data.num_few_shot", "0"]
    emulated, qmath.policy._emulated = qmath.policy._emulated, lambda *_: False  # a bf16 copy on any CPU: its rounding
    try:
        main(args)
    finally:
        qmath.policy._emulated = emulated
    events = EventAccumulator(str(workdir / name / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    means = [e.value for e in events.Scalars("train/sampling/sampling_logp_difference/mean")]
    maxes = [e.value for e in events.Scalars("train/sampling/sampling_logp_difference/max")]
    return {"run": name, "steps": len(means), "mean_worst": max(means), "max_worst": max(maxes),
            "fallback": max(e.value for e in events.Scalars("train/sampling/decoder_fallback"))}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (one rollout each)")
    parser.add_argument("--tiny", default=None, help="a local model directory instead of the embedded one")
    parser.add_argument("--workdir", default=None, help="where the runs' logs go (default: a temp dir)")
    args = parser.parse_args(argv)
    from qmath.decoding_check import BOUNDS

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="qmath-decoding-check-"))
    results = [run(args.steps, dtype, backend, workdir, args.tiny)
               for dtype in (None, "bfloat16") for backend in ("eager", "graphs")]
    print("\n| rollouts from | backend | steps | largest step mean of abs(old - sampling) | largest token | "
          "released |\n|---|---|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['run'].split('-')[0]} | {r['run'].split('-')[1]} | {r['steps']} | {r['mean_worst']:.3g} | "
              f"{r['max_worst']:.3g} | {'yes' if r['fallback'] else 'no'} |")
    print("bounds: " + ", ".join(f"{str(d).removeprefix('torch.')} mean {b.mean:g} max {b.max:g}"
                                 for d, b in BOUNDS.items()))
    print("RESULT " + json.dumps(results))
    return results


if __name__ == "__main__":
    main()
