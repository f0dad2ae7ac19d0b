"""Validation speed of a job definition: this checkout next to a baseline revision, same run.

``python -m bench.schema [--base main] [--n 2000]``. The baseline's ``asman/log/definition.py``
and ``asman/log/steps.py`` are read with ``git show <base>:…`` and loaded as modules of their
own, so both validators run in one process on the same definitions, alternating rounds, and the
figure to read is the ratio (the box is shared and noisy). The definitions: the smallest
(image and command), a full one (build, env, eight inputs, config files, requirements) and a
three-step one with volumes and output paths.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from asman.log.definition import validate_definition
from bench.common import RESULTS, ROOT

SHA = "a" * 64
DEFINITIONS: dict[str, dict[str, Any]] = {
    "small": {"image": "alpine:3.20", "command": 'echo "hello world"'},
    "full": {
        "v": 1,
        "build": {
            "context": "https://github.com/a/b/tree/main",
            "buildContext": "sub/dir",
            "filename": "Dockerfile.gpu",
            "dockerfile": "FROM alpine\n",
            "buildArgs": {"A": "1"},
        },
        "command": ["python", "-c", "print(1)"],
        "env": {f"V{i}": f"value {i}" for i in range(16)},
        "workdir": "/work",
        "shmSize": "2g",
        "inputs": {
            "a/b.txt": {"value": "hello"},
            "c.bin": {"value": "aGVsbG8=", "type": "base64", "hash": SHA},
            "d.json": {"value": {"k": [1, 2]}, "type": "json"},
            "e": {"value": "https://example.com/f/1", "type": "url"},
            "g": {"value": SHA, "type": "blob", "size": 10},
            "h": "plain text",
            "i": "data:application/octet-stream;base64,aGVsbG8=",
            "j": {"value": "s3://bucket/key/x", "type": "s3"},
        },
        "configFiles": {"/etc/app.conf": {"value": "x=1"}, "conf.ini": {"value": ""}},
        "maxDuration": "1h30m",
        "tags": ["gpu", "big"],
        "requirements": {"cpus": 0.5, "gpus": 1, "memory": "512m", "maxDuration": 600},
    },
    "steps": {
        "image": "alpine:3.20",
        "volumes": ["/data"],
        "steps": [
            {"command": ["sh", "-c", "echo 1 > /data/x"]},
            {"image": "busybox:1", "command": "cat /data/x", "stdout": "/data/out.txt"},
            {"command": "wc -c /data/out.txt", "stderr": "/outputs/err", "ignoreError": True},
        ],
        "outputPaths": [
            {"path": "/data/out.txt", "url": "s3://bucket/out.txt"},
            {"path": "/data/*.log", "pathPrefix": "/data/"},
        ],
    },
}


def _baseline(base: str, folder: Path) -> Callable[[Any], Any]:
    """The ``validate_definition`` of revision ``base``, loaded beside this checkout's."""
    names = {"definition": "_base_definition", "steps": "_base_steps"}
    for name, module in names.items():
        text = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{base}:asman/log/{name}.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for other, alias in names.items():
            text = text.replace(f"asman.log.{other}", alias)
        (folder / f"{module}.py").write_text(text)
    sys.path.insert(0, str(folder))
    loaded: dict[str, ModuleType] = {}
    for module in names.values():
        spec = importlib.util.spec_from_file_location(module, folder / f"{module}.py")
        assert spec is not None and spec.loader is not None
        loaded[module] = importlib.util.module_from_spec(spec)
        sys.modules[module] = loaded[module]
    for module in names.values():
        loaded[module].__loader__.exec_module(loaded[module])  # type: ignore[union-attr]
    return loaded["_base_definition"].validate_definition  # type: ignore[no-any-return]


def _time(fn: Callable[[Any], Any], d: dict[str, Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn(d)
    return (time.perf_counter() - start) / n * 1e6


def run(base: str = "main", n: int = 2000, rounds: int = 5) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        before = _baseline(base, Path(tmp))
        rows = {}
        for name, d in DEFINITIONS.items():
            assert before(d) == validate_definition(d), name
            old, new = [], []
            for _ in range(rounds):
                old.append(_time(before, d, n))
                new.append(_time(validate_definition, d, n))
            b, a = statistics.median(old), statistics.median(new)
            rows[name] = {
                "before_us": round(b, 1),
                "after_us": round(a, 1),
                "ratio": round(a / b, 2),
            }
    return {"base": base, "n": n, "rounds": rounds, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="main", help="git revision of the baseline")
    parser.add_argument("--n", type=int, default=2000, help="validations per round")
    args = parser.parse_args()
    result = run(args.base, args.n)
    print(f"validate_definition, µs per call (median of {result['rounds']} rounds)")
    print(f"{'definition':<12}{'before':>10}{'after':>10}{'ratio':>8}")
    for name, row in result["rows"].items():
        print(f"{name:<12}{row['before_us']:>10}{row['after_us']:>10}{row['ratio']:>8}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "schema.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
