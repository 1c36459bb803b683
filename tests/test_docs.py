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
    if args == ["--version"]:
        assert main(args) is None and capsys.readouterr().out.startswith("qmath ")
        return
    assert args[0] in ("fit", "validate", "test", "predict"), command
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--print_config"] if "--help" not in args else args)
    assert exit_.value.code in (0, None), capsys.readouterr().err


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def section(page, name: str) -> str:
    """The text under the heading whose anchor is ``name``, up to the next heading of its level or above."""
    lines = page.read_text().splitlines()
    for i, line in enumerate(lines):
        level = len(line) - len(line.lstrip("#"))
        if level and line[level:level + 1] == " " and anchor(line[level:]) == name:
            end = next((j for j in range(i + 1, len(lines)) if re.match(rf"#{{1,{level}}} ", lines[j])), len(lines))
            return "\n".join(lines[i:end])
    raise AssertionError(f"{page.name} has no section #{name}")


def test_the_readme_headline_figures_are_those_of_the_docs_section_they_link():
    """Each figure the README states in bold is followed, in its paragraph or list item, by a link to the docs/ section
    where it was measured, and each of its numbers appears in that section: a figure changed in one place and not in
    the other fails here."""
    readme = (ROOT / "README.md").read_text()
    checked = []
    for part in re.split(r"\n\s*\n|\n(?=>? ?- )", readme):
        for bold in re.finditer(r"\*\*([^*]*\d[^*]*)\*\*", part):
            if not re.search(r"\d\s*(%|GiB|GB|s\b|min\b|hours|×)", bold.group(1)):
                continue  # a label such as **1. Install.**, not a figure
            link = re.search(r"\]\((docs/[\w-]+\.md)#([\w-]+)\)", part[bold.end():])
            assert link, f"README: {bold.group(0)} is followed by no link to the docs section it comes from"
            text = section(ROOT / link.group(1), link.group(2))
            numbers = re.findall(r"\d+(?:[.,]\d+)*", bold.group(1))
            missing = [n for n in numbers if not re.search(rf"(?<![\d.,]){re.escape(n)}(?![\d]|[.,]\d)", text)]
            assert not missing, f"README's {bold.group(0)}: {missing} not in {link.group(1)}#{link.group(2)}"
            checked.append(bold.group(1))
    assert len(checked) >= 8, checked  # the box, what to expect, the demo and the suite


def test_every_relative_link_in_the_docs_reaches_a_file_and_a_heading():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path, _, name = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif name and file.suffix == ".md":
                try:
                    section(file, name)
                except AssertionError:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
