"""What a user installs: the wheel (``qmath-grpo``, not PyPI's unrelated ``qmath``) with the shipped configs and the
``qmath`` command, and the versions a run reports."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import torch
import transformers

import qmath
from qmath.__main__ import main
from qmath.versions import DISTRIBUTION, prompt_sharing_warning
from tests.conftest import ROOT


def test_the_wheel_is_qmath_grpo_with_its_configs_and_command(tmp_path):
    # no build isolation: hatchling comes with the test extras, so this builds offline as CI does
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("*.whl"))
    assert wheel.name == f"qmath_grpo-{qmath.__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"qmath/configs/{c}.yaml" for c in ("cpu", "t4x2", "t4x2-lora", "fsdp")} <= set(names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert f"Name: {DISTRIBUTION}\n" in metadata and "Requires-Dist: torch>=2.4" in metadata
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "qmath = qmath.__main__:run" in entry_points


def test_version_names_qmath_torch_and_transformers(capsys):
    assert main(["--version"]) is None
    out = capsys.readouterr().out
    assert out.startswith(f"qmath {qmath.__version__}, torch {torch.__version__} (")
    assert f"transformers {transformers.__version__}" in out


def test_an_old_transformers_is_warned_about_where_prompt_sharing_needs_it(monkeypatch):
    monkeypatch.setattr("qmath.compat.checkpointing_can_keep_cache", lambda: False)
    warning = prompt_sharing_warning(gradient_checkpointing=True)
    assert "is older than 5.15" in warning and "pip install -U 'transformers>=5.15'" in warning
    assert prompt_sharing_warning(gradient_checkpointing=False) is None  # nothing to share without checkpointing
    monkeypatch.setattr("qmath.compat.checkpointing_can_keep_cache", lambda: True)
    assert prompt_sharing_warning(gradient_checkpointing=True) is None
