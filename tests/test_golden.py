"""Behaviour pinned across refactors: three steps of the tiny model and a greedy validation give exactly the numbers
recorded before qmath's code was reorganised (issue 15). A change that alters them changes what qmath computes.

To re-record after an intended change of behaviour: ``QMATH_RECORD_GOLDEN=1 pytest tests/test_golden.py -s`` prints
the new values; paste them into GOLDEN and say why in the commit.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

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
# recorded on the code before issue 15 (commit 6321c43), 2 CPU cores, torch 2.13, transformers 5.24
GOLDEN: dict[str, dict] = {
 "dapo": {
  "logged": {
   "train/loss": [
    0.0,
    -0.13465890288352966,
    0.0020427810959517956
   ],
   "train/reward": [
    0.39500001072883606,
    0.39500001072883606,
    0.38062500953674316
   ],
   "train/kl": [
    0.0,
    0.15745320916175842,
    0.05106952786445618
   ],
   "train/rewards/length/mean": [
    0.27000001072883606,
    0.27000001072883606,
    0.25562500953674316
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
    0.8359375,
    0.0
   ],
   "val/accuracy_lenient": [
    0.0,
    0.0
   ],
   "val/format_rate": [
    0.0,
    0.0
   ],
   "val/completions/mean_length": [
    8.0,
    8.0
   ]
  },
  "completions": [
   "<reasoning>\n\ufffd\ufffdreer+\ufffdaml",
   "<reasoning>\n\u0001ur\ufffd\ufffd\u000bP 1",
   "<reasoning>\ny<arnbve 14\u0012\ufffd",
   "<reasoning>\nar_%\ufffd\ufffd 5\ufffdz",
   "<reasoning>\nH 18 18\ufffd\ufffdD 2",
   "<reasoning>\nickerdsD mar\u000fl=\ufffd",
   "<reasoning>\ner!\ufffd\ufffd`<\u0002 18",
   "<reasoning>\n2 on\ufffd 12 2)B",
   "<reasoning>\n 9\u007f d,\ufffdoon\n each",
   "<reasoning>\n pencils 18\ufffd\u000e\ufffdTX\u0014",
   "<reasoning>\n\ufffd=Z\ufffdE\ufffd\t\ufffd",
   "<reasoning>\n\ufffd\ufffd\ufffdS!T each in",
   "<reasoning>\n\ufffd\ufffdYall\ufffdicker chach",
   "<reasoning>\n balloons *\ufffd th\ufffd(D wi",
   "<reasoning>\n\ufffdV\ufffdarsays##\ufffdx",
   "<reasoning>\n rea\ufffd ha 18\u008d th-"
  ],
  "checksum": [
   160.45977779384702,
   880.0939910285524,
   184.91227864690308
  ]
 },
 "dynamic": {
  "logged": {
   "train/loss": [
    -4.470348358154297e-07,
    0.000814288854598999,
    0.0021359026432037354
   ],
   "train/reward": [
    0.375,
    0.4024999737739563,
    0.3762499988079071
   ],
   "train/kl": [
    0.0,
    0.02038193866610527,
    0.05338834971189499
   ],
   "train/rewards/length/mean": [
    0.25,
    0.2775000035762787,
    0.2512499988079071
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
   "<reasoning>\n\ufffdP\ufffd\u007fre der,",
   "<reasoning>\n\u0001}ur How\ufffdm\ufffd\u000e",
   "<reasoning>\ny\ufffd<=arnZb\u0006",
   "<reasoning>\nar5_\u0019%\u01e3\u0015",
   "<reasoning>\nH8 18!\u0000Y\ufffd\ufffd",
   "<reasoning>\nc balloonsds *D\n mar th",
   "<reasoning>\ner\ufffd!V book\ufffd\ufffdn",
   "<reasoning>\n2 rea on\ufffd doll ha8"
  ],
  "checksum": [
   193.89447497080255,
   882.1177367329219,
   185.17750575926448
  ]
 }
}


def observe(directory, run: str, tiny_model) -> dict:
    cli = main(["fit", "--config", "cpu", "--config", str(tiny_config(directory, tiny_model)), *RUNS[run],
                "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--data.num_val", "6"])
    logged = scalars(directory / "lightning_logs" / "cpu" / "version_0")
    weights = torch.cat([p.detach().double().flatten() for p in cli.model.policy.parameters()])
    return {"logged": {k: [v for _, v in logged[k]] for k in LOGGED},
            "completions": cli.model.last_rollout["completion"],
            "checksum": [weights.sum().item(), weights.abs().sum().item(), (weights * weights).sum().item()]}


@pytest.mark.parametrize("run", RUNS)
def test_three_steps_and_a_validation_give_the_recorded_numbers(tiny_model, in_tmp, run):
    seen = observe(in_tmp, run, tiny_model)
    if os.environ.get("QMATH_RECORD_GOLDEN"):
        print(f"\nGOLDEN[{run!r}] = {json.dumps(seen)}")
        return
    golden = GOLDEN[run]
    assert seen["completions"] == golden["completions"]  # the same samples, token for token
    for name, values in golden["logged"].items():
        assert seen["logged"][name] == pytest.approx(values, rel=1e-6, abs=1e-7), name
    assert seen["checksum"] == pytest.approx(golden["checksum"], rel=1e-9)
