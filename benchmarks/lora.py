"""What unmerged LoRA adapters cost a rollout, and what folding them in (``model.lora_merge_for_generation``, the
default) costs instead.

    python benchmarks/lora.py                       # the embedded SmolLM2-135M-Instruct on CPU, all cores
    python benchmarks/lora.py --device cuda --backend compiled --model <hf dir>   # a GPU, as t4x2-lora decodes

A rollout is cpu.yaml's: one rendered GSM8K-style prompt × 8 completions sampled at temperature 0.5, every
completion exactly ``--length`` tokens (``min_new_tokens`` = ``max_new_tokens``, so that both ways do the same token
work), through rank-``--r`` adapters on every linear layer whose B matrices are random (a trained adapter costs the
same; PEFT's zero-initialised B would too). Each way runs ``--repeats`` rollouts after a warm-up, alternating, and
the medians are reported, with the fold-and-restore alone timed as many times.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from typing import Any

import torch

from qmath.data import GSM8K
from qmath.generation import Sampler
from qmath.models import EMBEDDED_MODEL
from qmath.module import GRPO

G = 8


def timed(fn: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="model name or directory (default: embedded)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backend", default="eager", choices=["eager", "compiled"], help="generation backend")
    parser.add_argument("--length", type=int, default=96, help="tokens per completion (cpu.yaml: 96)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--repeats", type=int, default=5, help="timed rollouts each way, after one warm-up each")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    module = GRPO(model_name_or_path=args.model, num_generations=G, max_completion_length=args.length,
                  temperature=0.5, generation_backend=args.backend, generation_kwargs={"min_new_tokens": args.length},
                  lora_r=args.r, lora_alpha=2.0 * args.r)
    module.configure_model()
    policy = module.policy.to(device)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    hp = module.hparams
    unmerged = Sampler(policy, module.tokenizer, args.length, hp.temperature, backend=args.backend,
                       generation_kwargs=hp.generation_kwargs)
    data = GSM8K(tokenizer_name_or_path=args.model)  # cpu.yaml's rendering: a worked example, the reasoning prefix
    data.setup("predict")
    text = data.render("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                       "May. How many clips did Natalia sell altogether in April and May?")
    encoded = module.tokenizer([text] * G, return_tensors="pt", add_special_tokens=False).to(device)
    ways = {"unmerged": unmerged, "merged": module.sampler}
    times: dict[str, list[float]] = {name: [] for name in ways} | {"fold and restore": []}

    def fold_and_restore() -> None:
        with module.sampler.merged():
            pass

    for repeat in range(args.repeats + 1):
        for name, sampler in ways.items():
            seconds = timed(partial(sampler.generate_seeded, encoded.input_ids, encoded.attention_mask, repeat,
                                    group=G), device)
            if repeat:  # the first of each is a warm-up (and, compiled, the compile)
                times[name].append(seconds)
        times["fold and restore"].append(timed(fold_and_restore, device))
    medians = {name: statistics.median(values[-args.repeats:]) for name, values in times.items()}
    report = {"model": args.model, "device": str(device), "backend": args.backend, "length": args.length,
              "r": args.r, "threads": torch.get_num_threads(), "seconds": medians,
              "unmerged_over_merged": medians["unmerged"] / medians["merged"]}
    print(f"LoRA r={args.r} rollouts on {report['device']} ({args.backend}, {report['threads']} threads), "
          f"{G} x {args.length} tokens, median of {args.repeats}:")
    for name, seconds in medians.items():
        print(f"  {name:<17} {seconds:8.3f} s")
    print(f"  unmerged / merged {report['unmerged_over_merged']:8.2f}x")
    return report


if __name__ == "__main__":
    main()
