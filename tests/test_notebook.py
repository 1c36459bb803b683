"""`notebooks/kaggle_t4x2.ipynb`, executed as Kaggle's *Save & Run All* does, with its parameters switched to the
embedded model and a few CPU steps (papermill's way: a cell after the tagged ``parameters`` cell overrides them).
Then once more as a new session resuming the first one's output. Every cell runs but the hub upload and TensorBoard,
which their parameters turn off."""

from __future__ import annotations

import json

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT
from tests.test_fit import scalars

pytestmark = pytest.mark.slow

NOTEBOOK = ROOT / "notebooks" / "kaggle_t4x2.ipynb"
SMALL = ["--data.num_train", "20", "--data.num_val", "2", "--model.num_generations", "2",
         "--model.max_completion_length", "16", "--trainer.enable_progress_bar", "false"]


def execute(work, **parameters) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1
    values = {"CONFIG": "cpu", "WORK": str(work), "INSTALL": None, "TENSORBOARD": False, "HUB_REPO": None,
              "SMOKE_ARGS": ["--trainer.max_steps", "1", "--trainer.val_check_interval", "1", *SMALL],
              "EVAL_ARGS": ["--data.num_test", "2", "--model.max_completion_length", "16"], **parameters}
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items()))
    notebook.cells.insert(tagged[0] + 1, injected)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(work.parent)}}).execute()
    return notebook


def test_the_kaggle_notebook_runs_and_a_second_session_resumes_it(tmp_path):
    first, second = tmp_path / "first" / "working", tmp_path / "second" / "working"
    first.parent.mkdir()
    second.parent.mkdir()
    execute(first, FULL_ARGS=["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", *SMALL])

    assert "qmath: step 1/1" in (first / "smoke.log").read_text()
    assert not (first / "smoke").exists()  # its checkpoint deleted, its log kept
    fit = (first / "fit.log").read_text()
    assert "qmath fit: qmath " in fit and "qmath: step 2/2" in fit and "qmath: validation at step 2" in fit
    assert (first / "lightning_logs" / "cpu" / "checkpoints" / "last.ckpt").is_file()
    assert (first / "curves.png").stat().st_size > 10_000
    assert "test/accuracy_strict" in (first / "test.log").read_text()
    answers = [json.loads(line) for line in (first / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3 and all({"question", "completion", "extracted_answer", "correct"} <= a.keys()
                                     for a in answers)
    assert answers[0]["question"].startswith("A baker makes 24 muffins")  # in the order written
    assert json.loads((first / "export" / "config.json").read_text())["dtype"] == "bfloat16"

    # a new session: the first one's output as its input, read-only on Kaggle; the full run continues at step 2
    notebook = execute(second, PREVIOUS_OUTPUT=str(first), SMOKE=False, EVALUATE=False,
                       FULL_ARGS=["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", *SMALL])
    fit = (second / "fit.log").read_text()
    assert "qmath: step 3/3" in fit and "qmath: step 1/3" not in fit and "qmath: step 2/3" not in fit
    # the copied logs hold the first session's fit, test and predict (version_0 to _2); the resumed fit logs after them
    versions = sorted((second / "lightning_logs" / "cpu").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    trained = [[step for step, _ in scalars(v).get("train/reward", [])] for v in versions]
    assert trained[0] == [0, 1] and trained[-1] == [2], trained
    assert any("resuming from" in output.get("text", "") for cell in notebook.cells
               for output in cell.get("outputs", []))
