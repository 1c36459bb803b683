"""The hardware floor of a GRPO step: each phase's time if it did the least work at this device's measured limits
(a large tensor copy's bandwidth, a large fp32 matrix product's throughput). Used by gpu_check.py and vs_trl.py."""

from __future__ import annotations

import time
from typing import Any

import torch


def hardware() -> dict[str, float]:
    """What this device moves and computes at best, measured: the bandwidth of a large tensor copy (bytes read and
    written per second) and the FLOP/s of a large fp32 matrix product (TF32 off, as in the runs)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 2**28 if device == "cuda" else 2**25  # 1 GiB or 128 MiB of fp32
    size = 8192 if device == "cuda" else 2048
    a, b = torch.empty(n, device=device), torch.empty(n, device=device)
    x, y = torch.randn(size, size, device=device), torch.randn(size, size, device=device)

    def best(fn: Any, repeats: int = 5) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times)

    return {"bandwidth_bytes_per_s": 2 * 4 * n / best(lambda: b.copy_(a)),
            "fp32_flops_per_s": 2 * size**3 / best(lambda: x @ y)}


def floors(run: dict[str, Any], hw: dict[str, float]) -> dict[str, float]:
    """Each phase's time if it did the least work at the measured limits. Decoding reads every weight once per
    token (the KV cache and activations are small beside them), in the rollout copy's dtype if there is one. A
    forward is 2 FLOPs per weight per token: the decoder's for each prompt once and every completion token, the
    output head's for the completion tokens only; a backward is twice a forward (no recomputation counted). AdamW
    reads the weights, gradients and two moments and writes three of them."""
    n, head, weight_bytes = run["parameters"], run["head_parameters"], 4 * run["parameters"]
    completion_tokens = run["completions"] * run["completion_length"]
    forward = (2 * (n - head) * (run["prompts"] * run["prompt_length"] + completion_tokens)
               + 2 * head * completion_tokens) / hw["fp32_flops_per_s"]
    rollout_bytes = run.get("rollout_bytes_per_parameter", 4) * n  # a half-precision rollout copy reads half
    return {"generate": run["completion_length"] * rollout_bytes / hw["bandwidth_bytes_per_s"],
            "reference forward": forward, "policy forward + backward": 3 * forward,
            "optimizer": 7 * weight_bytes / hw["bandwidth_bytes_per_s"]}
