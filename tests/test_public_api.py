"""The public API and the layer rule: imports point down only (STYLE §1, §5)."""

from __future__ import annotations

import ast
from pathlib import Path

import asman

ROOT = Path(asman.__file__).parent


def test_all_is_exactly_the_public_names() -> None:
    public = {n for n in vars(asman) if not n.startswith("_")} - {
        "config",
        "errors",
        "log",
        "peer",
        "gateway",
        "cli",
        "render",
        "dev",
        "escape",
        "logsetup",
    }
    assert set(asman.__all__) - {"__version__"} == public
    assert asman.job_id({"image": "alpine:3.19.1", "command": 'echo "hello world"'}) == (
        "9a684c59f4270fa102f102d2aafe92d5e78ad285116f02d845e5dabbfb0ba873"
    )


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def layer_imports(package: str) -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT.parent)): imports_of(p) for p in (ROOT / package).rglob("*.py")}


def test_log_knows_nothing_of_docker_http_or_terminals() -> None:
    banned = (
        "asman.peer",
        "asman.gateway",
        "asman.cli",
        "asman.render",
        "asman.dev",
        "docker",
        "aiohttp",
        "click",
        "rich",
        "minio",
    )
    for module, imports in layer_imports("log").items():
        bad = {i for i in imports if i.startswith(banned)}
        assert not bad, f"{module} imports {bad}"


def test_peer_uses_the_log_but_no_face() -> None:
    banned = ("asman.gateway", "asman.cli", "asman.render", "asman.dev", "click", "nats")
    for module, imports in layer_imports("peer").items():
        bad = {i for i in imports if i.startswith(banned)}
        assert not bad, f"{module} imports {bad}"


def test_only_the_wire_module_imports_cbor2() -> None:
    for path in ROOT.rglob("*.py"):
        if path.name != "wire.py":
            assert "cbor2" not in imports_of(path), path
