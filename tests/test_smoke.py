"""The README's entry points work: the command line, the reference demo, the Python example."""

import os
import re
from pathlib import Path

import pytest
from hypothesis import settings

from hypermoe.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def test_help_lists_every_command(capsys):
    try:
        code = main(["--help"])  # argparse exits with SystemExit(0); a main that returns must return 0 too
    except SystemExit as stop:
        code = stop.code
    assert code == 0
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


# ---------------------------------------------------------------------------------------------
# The hypothesis profile in effect (tests/conftest.py)
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif("CI" not in os.environ or "HYPOTHESIS_PROFILE" in os.environ,
                    reason="CI is not set (or HYPOTHESIS_PROFILE overrides the choice): the CI profile is not loaded")
def test_ci_runs_our_derandomized_profile():
    """Under CI the conftest's "ci" profile is in effect, not hypothesis's built-in one of the same name:
    derandomized, no example database, and our 30 examples (the built-in keeps 100)."""
    current = settings()
    assert settings.get_current_profile_name() == "ci"
    assert current.derandomize and current.database is None and current.max_examples == 30


@pytest.mark.skipif("CI" in os.environ or "HYPOTHESIS_PROFILE" in os.environ,
                    reason="CI (or HYPOTHESIS_PROFILE) is set: the local profile is not loaded")
def test_local_runs_explore_randomly():
    import tests.conftest as conftest

    current = settings()
    assert settings.get_current_profile_name() == ("ci" if conftest.IN_CI else "dev")
    if not conftest.IN_CI:  # hypothesis did not detect a CI either
        assert not current.derandomize and current.database is not None
