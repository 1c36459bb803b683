"""Behaviour pinned across refactors: three steps of the tiny model and a greedy validation give the numbers
recorded (see GOLDEN for when and on what). A change that alters them changes what qmath computes.

What is exact and what is not, on another x86-64 CPU than the one that recorded them: the sampled completions are
token ids, compared exactly (a draw that flips is a change of behaviour, or a float difference large enough to be
one). The logged numbers and the weights are float32 math whose kernels (oneDNN, MKL) pick their blocking, and so
their summation order, by CPU model: another model rounds differently in the last bits. Measured between two
machines of this kind (AMD EPYC family 25 and the recording one; the issue's family 26 gave the same picture),
with every completion identical: the rewards and lengths exactly equal, the loss 7e-8 apart, the KL up to 1.1e-5
relative, the weights' sum 4e-6 apart (of 183; Σ|Δw| is 557). Hence, each with a margin of 10x or more:
- the KL and the loss are functions of log-prob differences (the ratio, the k3 estimator), whose relative
  rounding error is the log-probs' absolute one (~1e-6) over the difference (~0.1): rel 1e-3 (90x the measured);
- every other logged number rel 1e-4 (a reward or a length differs only if a completion does);
- the weights through their change over the three steps, Δw = w - w0 (the initial weights dominate w and would
  hide it): Σ Δw to 1e-5 of Σ|Δw| (1,400x the measured), Σ|Δw| and Σ Δw² to rel 1e-5 and 2e-5. Adam moves
  nearly every weight by about the learning rate whatever its gradient's size, so a wrong sign on 0.001% of the
  weights moves Σ Δw by 2e-5 of Σ|Δw| and fails, and a wrong step size shows in Σ|Δw|; a rounding difference in
  a gradient moves an Adam update by about as much, relatively (~1e-6).
A change of the algorithm (a loss term, an advantage, a mask) moves these numbers by percents.

To re-record after an intended change of behaviour: ``QMATH_RECORD_GOLDEN=1 pytest tests/test_golden.py -s`` prints
the new values; paste them into GOLDEN and say why in the commit.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from qmath.__main__ import main
from tests.test_fit import scalars, tiny_config

RUNS = {
    # accumulation, μ = 2, the dapo loss, batch-scaled advantages: the rollout is split, reused and normalised
    "dapo": ["--model.loss_type", "dapo", "--model.scale_rewards", "batch", "--model.num_iterations", "2",
             "--trainer.accumulate_grad_batches", "2", "--data.batch_size", "2", "--model.num_generations", "4"],
    # dynamic sampling (extra rounds of drawn prompts) with the paper's loss
    "dynamic": ["--model.loss_type", "grpo", "--model.scale_rewards", "group", "--model.dynamic_sampling", "true",
                "--model.max_sampling_rounds", "2", "--model.num_generations", "4", "--data.batch_size", "2"],
}
LOGGED = ["train/loss", "train/reward", "train/kl", "train/rewards/length/mean", "train/rewards/xmlcount/mean",
          "train/completions/mean_length", "train/clip_ratio/region_mean", "val/accuracy_lenient", "val/format_rate",
          "val/completions/mean_length"]
# recorded with qmath's own decode loop (issue 23), 2 CPU cores, torch 2.13, transformers 5.24. The loop reproduced
# the numbers recorded before issue 15 (commit 6321c43) exactly when it drew with torch.multinomial as
# transformers does; these differ only by its cheaper draws (Gumbel-max from uniform noise: the same law).
# Re-recorded in issue 24 on an AMD EPYC (family 25): the weights as their change (Δw), and "dapo" validating once,
# at step 3 (val_check_interval now counts optimizer steps; it validated after 1.5 steps too). Its completions and
# logged training numbers equal the previous recording's, within the tolerances below.
GOLDEN: dict[str, dict] = {
 "dapo": {
  "logged": {
   "train/loss": [
    -4.842877388000488e-08,
    -0.102186419069767,
    -0.016843490302562714
   ],
   "train/reward": [
    0.3681250214576721,
    0.3681250214576721,
    0.3800000250339508
   ],
   "train/kl": [
    0.0,
    0.14493107795715332,
    0.03769037127494812
   ],
   "train/rewards/length/mean": [
    0.24312500655651093,
    0.24312500655651093,
    0.2549999952316284
   ],
   "train/rewards/xmlcount/mean": [
    0.125,
    0.125,
    0.125
   ],
   "train/completions/mean_length": [
    8.0,
    8.0,
    7.875
   ],
   "train/clip_ratio/region_mean": [
    0.0,
    0.8125,
    0.0
   ],
   "val/accuracy_lenient": [
    0.0
   ],
   "val/format_rate": [
    0.0
   ],
   "val/completions/mean_length": [
    8.0
   ]
  },
  "completions": [
   "<reasoning>\nach 7b\u0002\ufffd\u0001\ufffd\ufffd",
   "<reasoning>\nh(\u0001\ufffd\ufffd\ufffdve\ufffd",
   "<reasoning>\n\ufffd sh[\u0016\ufffdk\u001e",
   "<reasoning>\nf wi\u0017 do child\ufffd\ufffd\t",
   "<reasoning>\nT doll tiac\ufffdker,",
   "<reasoning>\n balloonsow*\ufffdesdayftanE",
   "<reasoning>\n\ufffdF $\ufffdT`\ufffdag",
   "<reasoning>\nm 10\ufffd\u000bL",
   "<reasoning>\n nowN\u000b\ufffder\u0016\ufffd\ufffd",
   "<reasoning>\n\ufffdoons an8Q\ufffd\u0001\ufffd",
   "<reasoning>\n stam stamps####, pencil\ufffd more\ufffd",
   "<reasoning>\nQD\nre@\ufffdblesds",
   "<reasoning>\nam\ufffd\u0016\ufffdin\ufffd an\u0003",
   "<reasoning>\ne\ufffd mo\t\ufffd-ack *",
   "<reasoning>\nP\ufffdiesn\ufffd\ufffday\ufffd",
   "<reasoning>\n\ufffd\ufffd\ufffdqYes\u0015;"
  ],
  "checksum": [
   19.495196259758416,
   556.7966353946788,
   11.786939860421043
  ]
 },
 "dynamic": {
  "logged": {
   "train/loss": [
    2.9802322387695312e-08,
    0.0006887316703796387,
    0.0023766010999679565
   ],
   "train/reward": [
    0.3687500059604645,
    0.38499999046325684,
    0.4012500047683716
   ],
   "train/kl": [
    0.0,
    0.01722930371761322,
    0.05940825864672661
   ],
   "train/rewards/length/mean": [
    0.24375000596046448,
    0.25999999046325684,
    0.2762500047683716
   ],
   "train/rewards/xmlcount/mean": [
    0.125,
    0.125,
    0.125
   ],
   "train/completions/mean_length": [
    8.0,
    8.0,
    8.0
   ],
   "train/clip_ratio/region_mean": [
    0.0,
    0.0,
    0.0
   ],
   "val/accuracy_lenient": [
    0.0
   ],
   "val/format_rate": [
    0.0
   ],
   "val/completions/mean_length": [
    8.0
   ]
  },
  "completions": [
   "<reasoning>\n marbles now 7 = \u000b\u0002 in",
   "<reasoning>\nh\ufffd\ufffdoons\u0001>\ufffd8",
   "<reasoning>\n\ufffd stam sh stamps[####\ufffd,",
   "<reasoning>\n 8Q wiD\u0017)\ufffdre",
   "<reasoning>\nTam doll\ufffdag\u0016i\ufffd",
   "<reasoning>\n balloonse each\ufffd\u000f mo\ufffd\ufffd",
   "<reasoning>\n\ufffdP\ufffd\ufffd $ies\ufffdn",
   "<reasoning>\nm\ufffd 10\ufffd\ufffd\ufffd\u000bd"
  ],
  "checksum": [
   7.800892938111758,
   545.3923586070168,
   12.190185415973572
  ]
 }
}


def observe(directory, run: str, tiny_model) -> dict:
    # fp32 rollouts, as recorded: with them the loss is computed as before issue 25 (test_rollout_dtype covers the
    # bf16 copy that cpu.yaml samples from since)
    cli = main(["fit", "--config", "cpu", "--config", str(tiny_config(directory, tiny_model)), *RUNS[run],
                "--model.rollout_dtype", "null",
                "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--data.num_val", "6"])
    logged = scalars(directory / "lightning_logs" / "cpu" / "version_0")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    change = torch.cat([(p.detach().double() - initial[n].double()).flatten()
                        for n, p in cli.model.policy.named_parameters()])
    return {"logged": {k: [v for _, v in logged[k]] for k in LOGGED},
            "completions": cli.model.last_rollout["completion"],
            "checksum": [change.sum().item(), change.abs().sum().item(), (change * change).sum().item()]}


@pytest.mark.parametrize("run", RUNS)
def test_three_steps_and_a_validation_give_the_recorded_numbers(tiny_model, in_tmp, run):
    seen = observe(in_tmp, run, tiny_model)
    if os.environ.get("QMATH_RECORD_GOLDEN"):
        print(f"\nGOLDEN[{run!r}] = {json.dumps(seen)}")
        return
    golden = GOLDEN[run]
    assert seen["completions"] == golden["completions"]  # the same samples, token for token
    for name, values in golden["logged"].items():
        rel = 1e-3 if name in ("train/kl", "train/loss") else 1e-4  # see the module's docstring
        # abs: a value that is 0 up to rounding (the first step's loss: ratio 1, advantages summing to 0)
        assert seen["logged"][name] == pytest.approx(values, rel=rel, abs=1e-6), name
    total, size, square = golden["checksum"]
    assert seen["checksum"][0] == pytest.approx(total, abs=1e-5 * size)  # Σ Δw: a sum that may nearly cancel
    assert seen["checksum"][1] == pytest.approx(size, rel=1e-5)  # Σ |Δw|
    assert seen["checksum"][2] == pytest.approx(square, rel=2e-5)  # Σ Δw² (twice Σ|Δw|'s relative error)
