"""The README's entry points work: the command line, the reference demo, the Python example."""

import re
from pathlib import Path

from hypermoe.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def test_help_lists_every_command(capsys):
    try:
        main(["--help"])
    except SystemExit as stop:
        assert stop.code == 0
    out = capsys.readouterr().out
    for command in ("main", "demo", "export", "verify", "run", "conformance", "convert", "bench"):
        assert re.search(rf"^\s+{command}\b", out, re.M), command


def test_demo(capsys):
    assert main(["demo", "--tokens", "3", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "tokens per expert" in out and "aux losses" in out


def test_readme_python_example_runs():
    text = README.read_text()
    example = text.split("## Using it", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    exec(compile(example, "README.md", "exec"), {})  # it asserts torch == ref itself
