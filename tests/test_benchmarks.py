"""benchmarks/: learning.py's statistics and an end-to-end run on the tiny model; memory.py on a small model."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from benchmarks import learning


def test_only_model_and_data_options_reach_validation():
    options = ["--model.loss_type", "dr_grpo", "--trainer.max_steps", "5", "--data.difficulty=[1,0,0]",
               "--model.max_completion_length", "64", "--model.optimizer.init_args.lr", "1e-5",
               "--data.num_few_shot=2"]
    # training-only options would make the baseline look different where it is not
    assert learning.model_and_data_options(options) == ["--model.max_completion_length", "64", "--data.num_few_shot=2"]
    # a LoRA checkpoint needs its adapter options to load; the untrained base's answers do not depend on them
    lora = ["--model.lora_r", "16", "--model.lora_alpha=32", *options]
    assert learning.model_and_data_options(lora)[:3] == ["--model.lora_r", "16", "--model.lora_alpha=32"]
    assert learning.model_and_data_options(lora, adapters=False) == learning.model_and_data_options(options)


def test_rates_and_paired_change_by_hand():
    before = [{"question": str(i), "strict": i < 2} for i in range(4)]  # 2 of 4
    after = [{"question": str(i), "strict": i < 3} for i in range(4)]  # 3 of 4: one problem flipped to right
    assert learning.rate(before, "strict") == pytest.approx((0.5, math.sqrt(0.25 / 4)))
    change, se = learning.paired_change(before, after, "strict")
    # per-problem changes 0, 0, 1, 0: mean 1/4; sample variance (3 * 1/16 + 9/16) / 3 = 1/4, std 1/2; / sqrt(4)
    assert change == pytest.approx(0.25) and se == pytest.approx(0.25)
    with pytest.raises(SystemExit, match="differ"):
        learning.paired_change(before, list(reversed(after)), "strict")


def test_learning_runs_end_to_end_on_the_tiny_model(tiny_model, tmp_path):
    report = learning.main(["--workdir", str(tmp_path), "--num-val", "200", "--",
                            "--model.model_name_or_path", str(tiny_model), "--model.max_completion_length", "8",
                            "--data.max_prompt_length", "1024", "--data.num_few_shot", "0",
                            "--trainer.max_steps", "12"])
    assert report["steps"] == 12
    assert set(report["heldout"]) == {"format", "strict", "lenient"}
    assert report["rewards"]["train/reward"]["first10"][0] >= 0
    assert (tmp_path / "seed0" / "learning.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "seed0" / "results.json").read_text())["num_val"] == 200
    assert list(tmp_path.glob("before-200-*.json"))  # the baseline is cached for the next seed
    by_steps = report["by_steps"]
    assert sum(v["problems"] for v in by_steps.values()) == 200 and set(by_steps) <= {1, 2, 3}


def test_learning_selects_on_another_slice_with_sampled_accuracy(tiny_model, tmp_path):
    report = learning.main(["--workdir", str(tmp_path), "--num-val", "200", "--select", "--maj-k", "2", "--",
                            "--model.model_name_or_path", str(tiny_model), "--model.max_completion_length", "8",
                            "--data.max_prompt_length", "1024", "--data.num_few_shot", "0",
                            "--trainer.max_steps", "2"])
    assert report["select_seed"] == 1000 and (tmp_path / "seed0-select" / "results.json").exists()
    assert 0 <= report["sampled"]["before"] <= 1 and report["sampled"]["k"] == 2
    # the selection slice is another seed's held-out stream: none of its 200 questions is among the first 200
    # held-out ones (Python's random.Random is the same on every machine; of the first 500, 2 coincide)
    held_out, selection = learning.steps_of(500, 0), learning.steps_of(200, 1000)
    assert len(set(held_out) & set(selection)) == 2


@pytest.mark.parametrize("logits", ["chunked", "full"])
def test_memory_benchmark_measures_a_t4x2_step(tmp_path, logits):
    import qmath.logprobs
    from benchmarks import memory
    from qmath.generation import Sampler
    from qmath.module import GRPO

    methods = (Sampler.generate, GRPO.token_logps, qmath.logprobs.groups_share_prompts)
    environment = {k: os.environ.get(k) for k in memory.DDP_ENVIRONMENT}
    sharing = ["--prompt-sharing", "off"] if logits == "full" else []  # each switch, once
    result = memory.main(["--small", "--workdir", str(tmp_path), "--prompt-length", "80", "--logits", logits, *sharing,
                          "--", "--model.max_completion_length", "16"])
    # t4x2's 8 completions per prompt, prompts of exactly 80 tokens, and a random model that never stops early
    assert (result["completions"], result["prompt_length"], result["completion_length_mean"]) == (8, 80, 16)
    assert result["weights"] == result["reference"] == result["gradients"] > 0
    assert result["optimizer_states"] == pytest.approx(2 * result["weights"], rel=1e-3)  # exp_avg, exp_avg_sq
    assert result["peak"] >= result["step_start"] > result["libraries"] > 0
    assert set(result["phases"]) == {"rollout (generate)", "policy forward", "reference forward", "backward",
                                     "optimizer step"}
    # t4x2's strategy over one process: DDP's buckets hold the gradients, and the peak is held against a T4's budget
    assert result["strategy"] == "DDPStrategy, gloo, 1 process(es), gradient_as_bucket_view"
    assert result["gradients_in_buckets"] and result["ddp_buckets"] == result["gradients"]
    assert result["budget"] == memory.T4_BUDGET_GIB == pytest.approx(14.56 - 0.4 - 0.4)
    assert result["headroom"] == pytest.approx(result["budget"] - result["tensor_peak"])
    # the probes are gone: later runs are not measured, and share prompts again
    assert (Sampler.generate, GRPO.token_logps, qmath.logprobs.groups_share_prompts) == methods
    # and so is the one-process DDP: no process group, no launcher variables for a later run or child to inherit
    assert not torch.distributed.is_initialized() and environment == {k: os.environ.get(k) for k in environment}


def test_vs_trl_times_qmath_and_the_floor_on_the_tiny_model(tiny_model, tmp_path):
    from benchmarks import vs_trl

    only = ["qmath", "qmath-transformers", "floor"]
    try:
        import trl  # noqa: F401 - an optional extra (vs-trl); without it the TRL side is not run
        only.append("trl")
    except ImportError:
        pass
    report = vs_trl.main(["--model", str(tiny_model), "--steps", "3", "--length", "8", "--threads", "1",
                          "--workdir", str(tmp_path), "--only", *only])
    assert len(report["qmath"]["all_steps_s"]) == 3 and report["qmath"]["step_s"] > 0
    for role in ("qmath", "qmath-transformers"):  # each step's generate call timed, and against its floor
        assert 0 < report[role]["generate_s"] < report[role]["step_s"]
        assert report[f"{role}_generate_over_floor"] > 0
    assert set(report["floor"]["parts"]) == {"generate", "reference forward", "policy forward + backward",
                                             "AdamW step"}
    assert report["qmath_over_floor"] == report["qmath"]["step_s"] / report["floor"]["total"]
    assert set(report["hardware_floor"]["parts"]) == {"generate", "reference forward", "policy forward + backward",
                                                      "optimizer"}
    assert 0 < report["hardware_floor"]["total"] < report["floor"]["total"]  # no run beats the device's limits
    assert all(report[r]["peak_rss_gib"] > 0.1 for r in only if r != "floor")
    if "trl" in only:
        assert len(report["trl"]["all_steps_s"]) == 3 and report["qmath_over_trl"] > 0


def test_profile_step_accounts_for_every_part_of_a_step_on_the_tiny_model(tiny_model, tmp_path):
    from benchmarks import profile_step

    report = profile_step.main(["--model", str(tiny_model), "--steps", "4", "--length", "8", "--threads", "1",
                                "--workdir", str(tmp_path), "--json", str(tmp_path / "profile.json")])
    parts = report["parts"]
    assert report["steps"] == 2 and report["precision"] == "32-true"
    assert parts["rollout: generation"] > 0 and parts["backward"] > 0 and parts["AdamW step"] > 0
    assert parts["policy forward (log-probs, entropy)"] > 0 and parts["reference forward"] > 0  # beta 0.04
    # exclusive times: the parts, the rest included, add up to the step (medians of each, so within a part's noise)
    assert sum(parts.values()) == pytest.approx(report["step_s"], rel=0.25)
    ops = report["ops"]
    assert ops and {"aten::mm", "aten::addmm"} & {row["op"] for row in ops}  # the training half's operators
    assert 0 < sum(row["share"] for row in ops) <= 1 + 1e-9
    assert json.loads((tmp_path / "profile.json").read_text())["parts"].keys() == parts.keys()


def test_gpu_check_runs_its_tiny_mode_on_cpu(tiny_model, tmp_path, monkeypatch):
    from benchmarks import gpu_check

    # qmath's loop eager and compiled, the LoRA config and float16 rollouts: each role a fresh process that imports,
    # compiles and fits; transformers' generate (the same role code with another backend) is left to the GPU run
    only = ["qmath 32-true eager", "qmath 32-true compiled", "qmath-lora 32-true compiled",
            "qmath 32-true compiled float16"]
    try:
        import trl  # noqa: F401 - an optional extra (vs-trl); without it the TRL run is not made
        only.append("TRL 32-true")
    except ImportError:
        pass
    monkeypatch.setenv("OUT", str(tmp_path))
    # a cold compile cache of its own: a warm one (an earlier run's graphs) makes the first step no slower than the
    # next, and the compile time below a difference of noise
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    report = gpu_check.main(["--tiny", "--steps", "2", "--prompt-length", "160", "--tokenizer", str(tiny_model),
                             "--workdir", str(tmp_path / "work"), "--only", "decoding check", *only])
    check = report["check"]  # on CPU: the compiled step without CUDA graphs, in two processes
    assert check["passed"], check
    assert check["graphs"] == check["planned graphs"] == 2  # 8 and 16 rows
    runs = report["runs"]
    assert all("error" not in runs[role] for role in only), runs
    for role in only[:3]:
        run = runs[role]
        assert (run["completions"], run["completion_length"], run["prompt_length"]) == (8, 16, 160)
        assert set(run["phases"]) == {"generate", "reference forward", "policy forward + backward", "optimizer"}
        assert 0 < sum(run["phases"].values()) <= run["step_s"] * 1.01  # the phases are parts of the step
        assert run["tokens_per_s"] == pytest.approx(8 * 16 / run["phases"]["generate"])
    assert report["ratios"]["compiled / eager step time"] > 0
    assert report["compile_s"]["qmath 32-true compiled"] > 0  # compiling takes time, once
    assert [runs[r]["decoding"] for r in only[:2]] == ["eager", "compiled"]
    assert [runs[r]["graphs"] for r in only[:2]] == [0, 1]  # the rollouts' 8 rows: one graph
    assert runs["qmath 32-true compiled"]["compile_error"] is None
    assert runs["qmath-lora 32-true compiled"]["compile_error"] is None  # through PEFT's layers, adapters folded in
    assert runs["qmath-lora 32-true compiled"]["graphs"] == 1
    assert set(report["floor"]) == set(runs["qmath 32-true eager"]["phases"]) and all(report["floor"].values())
    run = runs["qmath 32-true eager"]  # Qwen's vocabulary on a 64-wide model: the head is nearly all of it
    assert 0.9 * run["parameters"] < run["head_parameters"] == 151_936 * 64 < run["parameters"]
    lora = runs["qmath-lora 32-true compiled"]  # t4x2-lora.yaml: its adapters add parameters to the same model
    assert lora["parameters"] > run["parameters"] and "qmath-lora 32-true compiled: decode / bandwidth floor" in (
        report["ratios"])
    assert json.loads((tmp_path / "gpu_check.json").read_text())["runs"].keys() == set(only)
    # float16 rollouts: a copy of half the policy's bytes, decoded compiled (its own graph beside the policy's,
    # which only evaluation would use), against a floor of 2 bytes per weight
    half = runs["qmath 32-true compiled float16"]
    assert half["compile_error"] is None and half["graphs"] == 1 and half["decoding"] == "compiled"
    assert half["rollout_copy_gib"] == pytest.approx(run["parameters"] * 2 / 2**30)
    assert runs["qmath 32-true compiled"]["rollout_copy_gib"] == 0
    assert report["ratios"]["float16 rollouts / fp32 rollouts step time"] > 0
    assert report["ratios"]["float16 rollouts / fp32 rollouts decode per token"] > 0


def test_gpu_check_rehearses_a_run_on_cpu(tiny_model, tmp_path, monkeypatch):
    """The rehearsal role in a call of its own, as the GPU command runs it (and a test of its own, so that the test
    processes can share the two halves). At 10 steps the signal's save is the run's first last.ckpt (t4x2 saves
    every 10 steps); a signal's save over an earlier last.ckpt is tests/test_resume.py's, and the GPU run's."""
    from benchmarks import gpu_check

    monkeypatch.setenv("OUT", str(tmp_path))
    report = gpu_check.main(["--tiny", "--tokenizer", str(tiny_model), "--workdir", str(tmp_path / "work"),
                             "--only", "rehearsal"])
    rehearsal = report["rehearsal"]  # 10 steps, a SIGTERM in step 7, a resume, an evaluation of the checkpoint
    assert rehearsal["checks"]["passed"], rehearsal["checks"]
    assert [v["step"] for v in rehearsal["stopped"]["validations"] + rehearsal["resumed"]["validations"]] == [5, 10]
    assert [s["step"] for s in rehearsal["resumed"]["steps"]] == [8, 9, 10]
    assert json.loads((tmp_path / "rehearsal.json").read_text())["checks"]["passed"]


@pytest.mark.filterwarnings("ignore:model.generation_kwargs")  # the benchmark forces the length on purpose
def test_lora_benchmark_times_both_ways_of_sampling(tiny_model):
    from benchmarks import lora

    report = lora.main(["--model", str(tiny_model), "--length", "6", "--r", "4", "--repeats", "1"])
    seconds = report["seconds"]
    assert set(seconds) == {"unmerged", "merged", "fold and restore"} and all(v > 0 for v in seconds.values())
    assert report["unmerged_over_merged"] == pytest.approx(seconds["unmerged"] / seconds["merged"])


def test_the_rehearsals_checks_fail_on_what_they_check():
    """benchmarks/rehearsal.py's verdicts, on records as its processes write them: a clean run passes, and each
    fault the rehearsal is there to find fails its own check."""
    from argparse import Namespace

    from benchmarks.rehearsal import checks, schedule

    args = Namespace(steps=6, val_every=2, signal_at=2)
    rates = schedule(6)

    def process(steps, validations, **extra):
        return {"returncode": 0, "ended": 100.0, "graphs": 1, "planned_graphs": 2, "compile_error": None,
                "first_step": steps[0] - 1 if steps else None,
                "steps": [{"step": s, "lr": rates[s - 1]} for s in steps],
                "validations": [{"step": s, "metrics": {"val/format_rate": 0.5}} for s in validations], **extra}

    def report(**changes):
        base = {"stopped": process([1, 2, 3], [2], signal_time=97.5), "resumed": process([4, 5, 6], [4, 6]),
                "evaluated": process([], [6], first_step=None), "last_checkpoints_after_the_signal": ["last.ckpt"]}
        return {**base, **changes}

    clean = checks(report(), args)
    assert clean["passed"] and clean["seconds from the signal to exit"] == 2.5
    faults = {
        "one last.ckpt after the signal": report(last_checkpoints_after_the_signal=["last-v1.ckpt", "last.ckpt"]),
        "no validation after the signal": report(stopped=process([1, 2, 3], [2, 3], signal_time=97.5)),
        "resumed at the stopped step": report(resumed={**process([4, 5, 6], [4, 6]), "first_step": 0}),
        "learning rates as uninterrupted": report(resumed={**process([4, 5, 6], [4, 6]), "steps": [
            {"step": s, "lr": rates[s - 4]} for s in (4, 5, 6)]}),  # the schedule restarted
        "every step ran once": report(resumed=process([5, 6], [6])),
        "evaluation from the checkpoint equals the last validation": report(evaluated={
            **process([], [6]), "validations": [{"step": 6, "metrics": {"val/format_rate": 0.25}}]}),
        "graphs within the plan": report(resumed={**process([4, 5, 6], [4, 6]), "graphs": 3}),
        "every process ended without an error": report(evaluated={**process([], [6]), "returncode": "timed out"}),
        "exit within SLURM's default 30 s grace period": report(stopped=process([1, 2, 3], [2], signal_time=60.0)),
    }
    for check, faulty in faults.items():
        verdict = checks(faulty, args)
        assert not verdict[check] and not verdict["passed"], check


def test_vs_trl_loss_equals_trls_own_loss_where_trl_is_installed():
    """Every loss type and option against TRL's ``_compute_loss`` on identical fp64 tensors (the vs-trl extra)."""
    pytest.importorskip("trl", reason="an optional extra (vs-trl): TRL's own loss is what this compares with")
    from benchmarks import vs_trl_loss

    report = vs_trl_loss.main([])
    assert set(report) == set(vs_trl_loss.CASES)
    for case, diffs in report.items():
        assert {"loss", "grad logps", "kl", "entropy"} <= set(diffs), case
        # fp64 on both sides; TRL's SAPO gate temperatures are fp32 constants and qmath's clip fractions fp32
        assert max(diffs.values()) < 1e-7, (case, diffs)


def test_decoding_check_measures_every_precision_and_backend(tiny_model, tmp_path, capsys):
    """benchmarks/decoding_check.py (the numbers the decoding check's bounds come from) on the tiny model: fp32 and a
    bf16 copy, eager and graphs, each run's worst differences, none released; the fp32 ones at rounding level."""
    from benchmarks import decoding_check
    from qmath.decoding_check import BOUNDS

    results = decoding_check.main(["--steps", "1", "--tiny", str(tiny_model), "--workdir", str(tmp_path)])
    assert [r["run"] for r in results] == ["float32-eager", "float32-graphs", "bfloat16-eager", "bfloat16-graphs"]
    assert all(r["steps"] == 1 and r["fallback"] == 0 for r in results)
    fp32, bf16 = results[0], results[2]
    assert fp32["mean_worst"] < BOUNDS[torch.float32].mean / 10 < bf16["mean_worst"]  # the copy rounds: it shows
