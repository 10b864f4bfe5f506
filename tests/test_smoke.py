"""The command line starts, and the reference runs on the default config (the README's main job)."""

from hypermoe.cli import main


def test_version_and_demo(capsys):
    assert main(["demo", "--tokens", "3", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "tokens per expert" in out and "aux losses" in out
