"""The deploy files that cannot run here (no registry): they parse, and they agree with the NATS
configs, the wire names and the CLI (ports, images, commands, options, stream and consumer)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from aiohttp import web
from topology import DEPLOY, NATS

from asman.cli import main as cli
from asman.gateway import api, compat
from asman.log import subjects

COMPOSE = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
# read by the CLI from the environment beside the click options (see `asman worker --help`)
EXTRA_ENV = {"ASMAN_S3_ACCESS_KEY", "ASMAN_S3_SECRET_KEY"}
CLIENT_PORT, ROUTE_PORT, MONITOR_PORT, LEAF_PORT = 4222, 6222, 8222, 7422


def conf_files() -> list[Path]:
    return sorted(p for p in NATS.rglob("*.conf") if p.name != "permissions.conf")


def cli_env(command: str) -> set[str]:
    params = cli.commands[command].params  # type: ignore[attr-defined]
    return {p.envvar for p in params if isinstance(getattr(p, "envvar", None), str)}


def load_yaml(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def node_names(config: str) -> list[str]:
    return re.findall(r"nats-route://([\w-]+):(\d+)", config)


@pytest.mark.parametrize("path", conf_files(), ids=lambda p: str(p.relative_to(NATS)))
def test_every_nats_config_is_valid(path: Path, nats_binary: str) -> None:
    result = subprocess.run(
        [nats_binary, "-t", "-c", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_cluster_nodes_differ_only_in_their_name() -> None:
    texts = {p.stem: p.read_text() for p in sorted((NATS / "cluster").glob("nats-*.conf"))}
    assert list(texts) == ["nats-1", "nats-2", "nats-3"]
    for name, text in texts.items():
        assert f"server_name: {name}\n" in text
        assert [h for h, _ in node_names(text)] == list(texts)
        assert {int(p) for _, p in node_names(text)} == {ROUTE_PORT}
        assert f"0.0.0.0:{CLIENT_PORT}" in text and f"0.0.0.0:{MONITOR_PORT}" in text
        lines = {ln for ln in text.splitlines() if "server_name" not in ln and "node " not in ln}
        first = texts["nats-1"].splitlines()
        assert lines == {ln for ln in first if "server_name" not in ln and "node " not in ln}


def test_hub_and_leaf_agree() -> None:
    hub = (NATS / "hub-leaf" / "hub-1.conf").read_text()
    leaf = (NATS / "hub-leaf" / "leaf.conf").read_text()
    assert "domain: hub" in hub and "domain: uni" in leaf
    found = re.search(r"user: ([\w-]+), password: \"([^\"]+)\", account: ASMAN", hub)
    assert found is not None
    user, password = found.groups()
    remotes = re.findall(r'"nats-leaf://([^:]+):([^@]+)@([\w-]+):(\d+)"', leaf)
    assert {(u, p) for u, p, _, _ in remotes} == {(user, password)}
    assert sorted(h for *_, h, _ in remotes) == ["hub-1", "hub-2", "hub-3"]
    assert {int(port) for *_, port in remotes} == {LEAF_PORT}
    assert f"listen: 0.0.0.0:{LEAF_PORT}" in hub
    assert "account: HUB" in leaf  # the bridged account has no JetStream of its own
    hub_block = leaf[leaf.index("  HUB {") : leaf.index("  LOCAL {")]
    assert "jetstream" not in hub_block


def test_permissions_conf_is_the_generators_output() -> None:
    path = NATS / "accounts" / "permissions.py"
    spec = importlib.util.spec_from_file_location("asman_deploy_permissions", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    text = (NATS / "accounts" / "permissions.conf").read_text()
    header, _, body = text.partition("\n\n")
    specs = header.splitlines()[0].split("permissions.py ", 1)[1].split()
    assert body == module.render(specs)
    conf = (NATS / "accounts" / "nats.conf").read_text()
    confined = re.findall(r"user: ([\w-]+), password: \"[^\"]+\", permissions: \$(\w+)", conf)
    assert confined
    for user, var in confined:
        assert var == user.upper().replace("-", "_")
        assert f"{var} = {{" in body


def test_compose_stack_references_the_cluster_configs_and_the_cli() -> None:
    (compose,) = load_yaml(COMPOSE / "compose.yaml")
    services = compose["services"]
    assert {"nats-1", "nats-2", "nats-3", "s3", "gateway", "worker"} <= set(services)
    for name in ("nats-1", "nats-2", "nats-3"):
        svc = services[name]
        assert svc["hostname"] == name
        conf = next(v.split(":")[0] for v in svc["volumes"] if v.endswith("/etc/nats/nats.conf:ro"))
        path = (COMPOSE / conf).resolve()
        assert path == NATS / "cluster" / f"{name}.conf"
        text = path.read_text()
        assert f"server_name: {name}" in text
        assert '"/data/jetstream"' in text and any(v.endswith(":/data") for v in svc["volumes"])
        assert svc["command"] == ["-c", "/etc/nats/nats.conf"]

    env = compose["x-asman-env"]
    urls = [urlparse(u) for u in env["ASMAN_NATS_URL"].split(",")]
    assert [(u.hostname, u.port) for u in urls] == [(f"nats-{i}", CLIENT_PORT) for i in (1, 2, 3)]
    assert env["ASMAN_REPLICAS"] == "3"

    s3 = services["s3"]
    blobs = urlparse(env["ASMAN_BLOBS"])
    assert blobs.scheme == "s3+http" and blobs.hostname == "s3"
    assert f"-s3.port={blobs.port}" in s3["command"]
    creds = yaml.safe_load((COMPOSE / "s3.json").read_text())["identities"][0]["credentials"][0]
    assert (creds["accessKey"], creds["secretKey"]) == (
        env["ASMAN_S3_ACCESS_KEY"],
        env["ASMAN_S3_SECRET_KEY"],
    )

    for name in ("gateway", "worker"):
        svc = services[name]
        assert svc["image"] == "asman:local"
        command = svc["command"][0]
        assert command == name and command in cli.commands  # type: ignore[attr-defined]
        used = {k for k in svc["environment"] if k.startswith("ASMAN_")}
        assert used <= cli_env(command) | EXTRA_ENV, used - cli_env(command) - EXTRA_ENV
    assert services["gateway"]["environment"]["ASMAN_HTTP_PORT"] == "8080"
    assert any(p.endswith(":8080") for p in services["gateway"]["ports"])
    worker = services["worker"]
    data_dir = worker["environment"]["ASMAN_DATA_DIR"]
    assert any(
        v.split(":")[0] == v.split(":")[1] and data_dir.startswith(v.split(":")[1])
        for v in worker["volumes"]
    ), "the worker's data dir must be mounted at the same path as on the host"
    assert "/var/run/docker.sock:/var/run/docker.sock" in worker["volumes"]
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["asman"]' in dockerfile


def _k8s(kind: str, name: str) -> dict[str, Any]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_yaml(path):
            if doc.get("kind") == kind and doc["metadata"]["name"] == name:
                return doc  # type: ignore[no-any-return]
    raise AssertionError(f"no {kind} {name} in deploy/k8s")


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def test_k8s_manifests_reference_the_cli_the_queue_and_its_consumer() -> None:
    for path in sorted(K8S.glob("*.yaml")):
        assert load_yaml(path), path  # every file parses and holds something
    config = _k8s("ConfigMap", "asman")["data"]
    assert urlparse(config["ASMAN_NATS_URL"]).port == CLIENT_PORT
    assert config["ASMAN_REPLICAS"] == "3"
    secret = _k8s("Secret", "asman-s3")["stringData"]
    assert set(secret) == EXTRA_ENV

    for name, command in (("asman-gateway", "gateway"), ("asman-worker", "worker")):
        deployment = _k8s("Deployment", name)
        container = _container(deployment)
        assert container["image"] == "asman:local"
        assert container["args"][0] == command
        refs = {r.get("configMapRef", r.get("secretRef"))["name"] for r in container["envFrom"]}
        assert refs == {"asman", "asman-s3"}
        env = {e["name"]: e.get("value") for e in container["env"]}
        used = {k for k in [*env, *config] if k.startswith("ASMAN_")}
        allowed = cli_env(command) | EXTRA_ENV | {"ASMAN_QUEUE"}
        assert used <= allowed, used - allowed
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"] == labels

    gateway = _container(_k8s("Deployment", "asman-gateway"))
    port = gateway["ports"][0]["containerPort"]
    assert str(port) == {e["name"]: e.get("value") for e in gateway["env"]}["ASMAN_HTTP_PORT"]
    app = web.Application()
    api.add_routes(app)
    routes = {r.resource.canonical for r in app.router.routes() if r.resource is not None}
    assert gateway["readinessProbe"]["httpGet"]["path"] in routes

    worker = _k8s("Deployment", "asman-worker")
    container = _container(worker)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["args"] == ["worker", "$(ASMAN_QUEUE)"]
    queue = subjects.validate_queue(env["ASMAN_QUEUE"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    pod = worker["spec"]["template"]["spec"]
    volumes = {v["name"]: v.get("hostPath", {}).get("path") for v in pod["volumes"]}
    assert mounts["data"] == volumes["data"], "job folders are mounted by host path"
    assert env["ASMAN_DATA_DIR"].startswith(mounts["data"])
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > int(env["ASMAN_DRAIN_GRACE"].rstrip("s"))

    scaled = _k8s("ScaledObject", "asman-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "metrics-api"
    url = urlparse(meta["url"])
    service = _k8s("Service", "asman-gateway")
    assert url.hostname == f"asman-gateway.{service['metadata']['namespace']}.svc.cluster.local"
    # the route is a real gateway route, for the worker's own queue, and has the value
    compat_app = web.Application()
    compat.add_routes(compat_app)
    resolved = [
        r
        for r in compat_app.router.routes()
        if r.resource and r.resource.canonical == "/q/{queue}/status"
    ]
    assert resolved and url.path == f"/q/{queue}/status"
    assert meta["valueLocation"] == "queueInfo.jobCount"
    assert int(meta["targetValue"]) > 0
