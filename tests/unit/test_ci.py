"""`.ci/run` runs exactly the README's test command, so the README cannot drift from what CI proves."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv && ")]
    assert len(commands) == 2, commands  # the two set-up commands, nothing else
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in ci.splitlines()
