"""Writes docs/reference/cli.md from the click commands themselves (run: make docs)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from asman.cli import main

HEAD = """# CLI reference

Generated from the commands by `scripts/cli_docs.py`; `tests/test_docs.py` fails when it is stale.

Every option can also be set in the config file (`~/.config/asman/config.toml`, or
`$ASMAN_CONFIG`): precedence is flag > environment variable > config file > default. See
[environment.md](environment.md) for every variable.

## Exit codes

| code | meaning |
|---|---|
| 0 | done |
| 1 | another error (one line on stderr) |
| 2 | bad input or usage: a queue name, a file, a definition, a flag (nothing was submitted) |
| 3 | the log failed: NATS unreachable, JetStream refused |
| 4 | the container runtime failed: no Docker engine, pull or build failed |
| 0-255 | `submit --wait`: the job's own exit code when it ran (`success`/`failed`) |
| 124 | `submit --wait`: the job timed out |
| 125 | `submit --wait`: the job finished with `error` (pull, build, input or upload failed) |
| 130 | `submit --wait`: the job was cancelled (also: interrupted with Ctrl-C) |
| 75 | `submit --wait`: worker lost (attempts exhausted) |
"""


def walk(cmd: click.Command, path: list[str]) -> list[tuple[list[str], click.Command]]:
    out = [(path, cmd)]
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            out += walk(cmd.commands[name], [*path, name])
    return out


def render() -> str:
    parts = [HEAD]
    for path, cmd in walk(main, ["asman"]):
        if isinstance(cmd, click.Group) and len(path) > 1:
            parts.append(f"\n## {' '.join(path)}\n\n{cmd.help or ''}\n")
            continue
        ctx = click.Context(cmd, info_name=" ".join(path))
        usage = " ".join(cmd.collect_usage_pieces(ctx))
        level = "##" if len(path) <= 2 else "###"
        title = " ".join(path) if len(path) > 1 else "asman (global options)"
        parts.append(
            f"\n{level} {title}\n\n```\n{' '.join(path)} {usage}\n```\n\n"
            f"{(cmd.help or '').strip()}\n"
        )
        rows = []
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.hidden:
                continue
            names = ", ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
            env = f"`{p.envvar}`" if p.envvar else ""
            unset = p.default is None or p.is_flag or p.multiple or "UNSET" in str(p.default)
            default = "" if unset else f"`{p.default}`"
            help_text = (p.help or "").replace("|", "\\|").replace("\n", " ")
            rows.append(f"| {names} | {env} | {default} | {help_text} |")
        if rows:
            parts.append(
                "\n| option | env | default | meaning |\n|---|---|---|---|\n"
                + "\n".join(rows)
                + "\n"
            )
    return "".join(parts)


if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / "docs" / "reference" / "cli.md"
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if target.read_text() == text else 1)
    target.write_text(text)
