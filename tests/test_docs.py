"""The docs say what the code does: the CLI reference is generated and current, every
environment variable is documented, and the README's quick start names real targets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from asman.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "cli_docs.py"), "--check"])
    assert done.returncode == 0, "docs/reference/cli.md is stale: run scripts/cli_docs.py"


def test_every_environment_variable_is_documented() -> None:
    text = (ROOT / "docs" / "reference" / "environment.md").read_text()

    def walk(cmd: click.Command) -> list[str]:
        found = [p.envvar for p in cmd.params if isinstance(p, click.Option) and p.envvar]
        if isinstance(cmd, click.Group):
            for sub in cmd.commands.values():
                found += walk(sub)
        return [str(e) for e in found]

    missing = sorted({e for e in walk(main) if f"`{e}`" not in text})
    assert not missing, f"undocumented variables: {missing}"


def test_quick_start_targets_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "\ndemo:" in makefile and "\ntest:" in makefile
