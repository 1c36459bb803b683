"""Every `python -m qmath …` command that the README and docs/ show parses as written: `fit`, `validate`, `test` and
`predict` through LightningCLI (`--print_config`: the config files are found, every key exists and every value has
its type), `export` through its own parser. So the docs cannot drift from the command line."""

from __future__ import annotations

import re
import shlex

import pytest

from qmath import export
from qmath.__main__ import main
from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_ENDS = {">", ">>", "2>&1", "&", "|", "&&", ";", "2>", "1>"}


def fenced_commands(text: str) -> list[str]:
    """Each `python -m qmath` command in the fenced code blocks, continuation lines joined, shell variables that the
    block itself sets (`GSM8K="…"`) expanded."""
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M):
        block = block.replace("\\\n", " ")
        variables = dict(re.findall(r'^(\w+)="([^"]*)"$', block, flags=re.M))
        for line in block.splitlines():
            if "python -m qmath" in line:
                for name, value in variables.items():
                    line = line.replace(f"${name}", value)
                commands.append(line)
    return commands


def table_commands(text: str) -> list[str]:
    """The `python -m qmath …` commands in tables (the README's table of runs), placeholders (CKPT) kept."""
    cells = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("|")]
    return [cell[1:-1] for cell in cells if re.fullmatch(r"`python -m qmath [^`]+`", cell)]  # a command column


def arguments(command: str) -> list[str]:
    """What comes after `python -m qmath`, up to the first shell operator; comments dropped."""
    words = shlex.split(command.split("python -m qmath", 1)[1], comments=True)
    cut = next((i for i, w in enumerate(words) if w in SHELL_ENDS), len(words))
    return words[:cut]


SHOWN = {(page.relative_to(ROOT).as_posix(), command.strip())
         for page in PAGES for command in [*fenced_commands(page.read_text()), *table_commands(page.read_text())]}
COMMANDS = sorted({tuple(arguments(command)): (page, command) for page, command in sorted(SHOWN)}.values())


def test_the_docs_show_commands_at_all():
    pages = {page for page, _ in SHOWN}
    assert {"README.md", "docs/evaluation.md", "docs/distributed.md", "docs/learning.md"} <= pages, pages
    assert any("export" in command for _, command in SHOWN)


@pytest.mark.parametrize("page, command", COMMANDS)
def test_each_documented_command_parses(page, command, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # where the docs' relative paths (configs/cpu.yaml) start
    args = arguments(command)
    if args[0] == "export":
        export.parser().parse_args(args[1:])
        return
    assert args[0] in ("fit", "validate", "test", "predict"), command
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--print_config"] if "--help" not in args else args)
    assert exit_.value.code in (0, None), capsys.readouterr().err
