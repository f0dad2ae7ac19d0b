"""The deploy files that cannot run here (no registry): they parse, and they agree with the NATS
configs, the wire names and the CLI (ports, images, commands, options, stream and consumer).
No shipped NATS config serves monitoring beyond loopback, and the compose and Kubernetes NATS
admit only their user, whose password the operator supplies."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import nats.errors
import pytest
import yaml
from aiohttp import web
from nats.aio.client import Client as NatsClient
from topology import DEPLOY, NATS, localize

from asman.cli import main as cli
from asman.gateway import api, compat
from asman.log import subjects
from asman.log.callout import init_secrets
from asman.log.server import NatsServer, free_port

COMPOSE = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
# read by the CLI from the environment beside the click options (see `asman worker --help`)
EXTRA_ENV = {"ASMAN_S3_ACCESS_KEY", "ASMAN_S3_SECRET_KEY"}
CLIENT_PORT, ROUTE_PORT, MONITOR_PORT, LEAF_PORT = 4222, 6222, 8222, 7422
# the one NATS user of the compose and Kubernetes stacks; its password comes from the operator
NATS_USER, PASSWORD_VAR = "asman", "ASMAN_NATS_PASSWORD"
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
# NATS options that open the monitoring port (and the one that picks its interface)
MONITOR_KEYS = ("http", "https", "http_port", "https_port", "monitor_port", "http_host")


#: config fragments other configs include (checked through them)
FRAGMENTS = ("permissions.conf", "public.conf", "auth.conf")


def conf_files() -> list[Path]:
    return sorted(p for p in NATS.rglob("*.conf") if p.name not in FRAGMENTS)


def with_public_secrets(path: Path, tmp: Path) -> Path:
    """``path`` itself, or for a config that includes deploy/nats/public (its secrets are
    never checked in), the same file in a copy of deploy/nats with secrets made by
    `asman callout init` (``init_secrets``)."""
    if "public.conf" not in path.read_text():
        return path
    copy = tmp / "nats"
    shutil.copytree(NATS, copy, ignore=shutil.ignore_patterns("secrets"))
    init_secrets(copy / "public" / "secrets")
    return copy / path.relative_to(NATS)


def monitor_settings(text: str) -> dict[str, str]:
    """The monitoring options of a NATS config (comments left out): key → value."""
    found = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"(\w+)\s*[:=\s]\s*(\S+)", line)
        if m and m.group(1) in MONITOR_KEYS:
            found[m.group(1)] = m.group(2).strip("\"'")
    return found


def assert_monitoring_on_loopback(settings: dict[str, str], where: str) -> None:
    """Monitoring off, or bound to loopback: ``http: 127.0.0.1:8222``. A bare ``http_port``
    (or ``http: 8222``) listens on every interface."""
    for key, value in settings.items():
        if key in ("http", "https"):
            host, _, port = value.rpartition(":")
            assert host in LOOPBACK and port.isdigit(), f"{where}: {key}: {value} (not loopback)"
        elif key == "http_host":
            assert value in LOOPBACK, f"{where}: http_host: {value}"
        else:
            assert settings.get("http_host") in LOOPBACK, f"{where}: {key} on every interface"


def compose_nats_layout(dest: Path, node: str = "nats-1", admin_password: str = "") -> Path:
    """A compose NATS node's /etc/nats as compose mounts it: ``nats.conf``, the node's
    cluster config as ``cluster.conf``, deploy/nats/public's ``public.conf``, and the secrets
    volume as callout-init fills it (``admin_password`` for the admin, as compose passes
    ASMAN_NATS_PASSWORD; no secrets without it). Returns the path of ``nats.conf``."""
    (compose,) = load_yaml(COMPOSE / "compose.yaml")
    dest.mkdir(parents=True, exist_ok=True)
    for volume in compose["services"][node]["volumes"]:
        host, _, inside = volume.partition(":")
        inside = inside.split(":")[0]
        if not inside.startswith("/etc/nats/"):
            continue
        if host == "public-secrets":  # the named volume callout-init writes
            if admin_password:
                init_secrets(dest / Path(inside).name, admin_password=admin_password)
        else:
            shutil.copyfile(COMPOSE / host, dest / Path(inside).name)
    return dest / "nats.conf"


def compose_nats_layout_texts(svc: dict[str, Any]) -> str:
    """The text of every NATS config file a compose service mounts (not the secrets)."""
    return "\n".join(
        (COMPOSE / v.split(":")[0]).read_text()
        for v in svc["volumes"]
        if "/etc/nats/" in v and not v.startswith("public-secrets:")
    )


def chart_config(values: dict[str, Any]) -> str:
    """The part of the NATS config the Helm chart renders from our values (``config.merge``)
    the way the chart does: JSON, with ``"<< X >>"`` unquoted (``nats.formatConfig``)."""
    return re.sub(r'"<<\s+(.*?)\s+>>"', r"\1", json.dumps(values["config"]["merge"], indent=2))


def k8s_nats_config(dest: Path) -> Path:
    """A config as the chart renders it for our values: its own lines (client port, a store)
    and our ``config.merge`` on top."""
    (values,) = load_yaml(K8S / "nats-values.yaml")
    merged = chart_config(values)
    base = f"port: {CLIENT_PORT}\njetstream {{ store_dir: {json.dumps(str(dest / 'js'))} }}\n"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "nats.conf"
    path.write_text(base + merged.strip()[1:-1] + "\n")  # the merge's keys, top level
    return path


def nats_t(binary: str, path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, "-t", "-c", str(path)], capture_output=True, text=True, timeout=30, env=env
    )


def cli_env(command: str) -> set[str]:
    params = cli.commands[command].params  # type: ignore[attr-defined]
    return {p.envvar for p in params if isinstance(getattr(p, "envvar", None), str)}


def load_yaml(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def node_names(config: str) -> list[str]:
    return re.findall(r"nats-route://([\w-]+):(\d+)", config)


@pytest.mark.parametrize("path", conf_files(), ids=lambda p: str(p.relative_to(NATS)))
def test_every_nats_config_is_valid(path: Path, nats_binary: str, tmp_path: Path) -> None:
    path = with_public_secrets(path, tmp_path)
    result = subprocess.run(
        [nats_binary, "-t", "-c", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "path",
    [*conf_files(), COMPOSE / "nats.conf"],
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_no_config_serves_monitoring_beyond_loopback(path: Path) -> None:
    """The monitoring port has no authentication, and ``/jsz?accounts=true&consumers=true``
    lists every account, stream and consumer to whoever reaches it."""
    settings = monitor_settings(path.read_text())
    assert_monitoring_on_loopback(settings, str(path.relative_to(DEPLOY)))
    if path.parent.name != "compose":  # includes a cluster config, checked on its own
        assert settings.get("http", "").endswith(f":{MONITOR_PORT}"), settings


def test_compose_and_k8s_publish_no_monitoring_port() -> None:
    (compose,) = load_yaml(COMPOSE / "compose.yaml")
    for name, svc in compose["services"].items():
        published = [str(p) for p in svc.get("ports", [])]
        assert not [p for p in published if p.split(":")[-1] == str(MONITOR_PORT)], name
        assert not {"-m", "--http_port", "--https_port"} & set(svc.get("command") or []), name
        if name.startswith("nats-"):
            mounted = compose_nats_layout_texts(svc)
            assert_monitoring_on_loopback(monitor_settings(mounted), f"compose {name}")
            assert "127.0.0.1:8222" in " ".join(svc["healthcheck"]["test"])

    (values,) = load_yaml(K8S / "nats-values.yaml")
    config = values["config"]
    # the chart's monitor block renders a bare http_port (every interface) for HTTP probes
    assert config["monitor"]["enabled"] is False
    assert_monitoring_on_loopback({"http": config["merge"]["http"]}, "nats-values.yaml")
    assert values["service"]["ports"]["monitor"]["enabled"] is False
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = values["container"]["merge"][probe]["exec"]["command"]
        assert urlparse(command[-1]).netloc == config["merge"]["http"], probe


def test_compose_and_k8s_nats_need_the_operators_password(tmp_path: Path, nats_binary: str) -> None:
    """Both parse with the real nats-server once the password is given, and refuse to start
    without it: no password is written in them. (A compose node gets its secrets, the admin's
    password among them, from callout-init; without them it does not start.)"""
    compose = compose_nats_layout(tmp_path / "compose")
    refused = nats_t(nats_binary, compose, dict(os.environ))
    assert refused.returncode != 0 and "auth.conf" in refused.stdout + refused.stderr
    compose = compose_nats_layout(tmp_path / "compose", admin_password="nats0123abcd")
    ok = nats_t(nats_binary, compose, dict(os.environ))
    assert ok.returncode == 0, f"compose: {ok.stdout}{ok.stderr}"
    for what, path in (("k8s", k8s_nats_config(tmp_path / "k8s")),):
        without = {k: v for k, v in os.environ.items() if k != PASSWORD_VAR}
        ok = nats_t(nats_binary, path, {**without, PASSWORD_VAR: "nats-0123abcd"})
        assert ok.returncode == 0, f"{what}: {ok.stdout}{ok.stderr}"
        refused = nats_t(nats_binary, path, without)
        assert refused.returncode != 0, f"{what} starts without {PASSWORD_VAR}"
        assert PASSWORD_VAR in refused.stdout + refused.stderr, what


@pytest.mark.parametrize("stack", ["compose", "k8s"])
async def test_compose_and_k8s_nats_admit_only_their_user(
    stack: str, tmp_path: Path, nats_binary: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real nats-server from the shipped config (its client and monitoring ports moved to
    loopback by NatsServer's flags, its routes and store here): anonymous clients, a wrong
    password and another user are refused, the operator's user is admitted."""
    password = "nats-5e3f0c9a1b"
    monkeypatch.setenv(PASSWORD_VAR, password)  # the server process reads it (nats.conf)
    user = NATS_USER
    if stack == "compose":
        # the compose nodes are public servers: their trusted user is the admin, and every
        # other connection goes to the auth callout (not running here: refused)
        user, password = "admin", "nats5e3f0c9a1b"
        conf = compose_nats_layout(tmp_path / "etc", admin_password=password)
        routes = {f"nats-{i}:{ROUTE_PORT}": f"127.0.0.1:{free_port()}" for i in (1, 2, 3)}
        localize(
            conf.parent / "cluster.conf",
            conf.parent / "cluster.conf",
            {
                f"0.0.0.0:{ROUTE_PORT}": routes[f"nats-1:{ROUTE_PORT}"],
                **routes,
                '"/data/jetstream"': json.dumps(str(tmp_path / "js")),
            },
        )
    else:
        conf = k8s_nats_config(tmp_path / "etc")
    server = NatsServer(tmp_path / "store", port=free_port(), http_port=free_port(), config=conf)
    await asyncio.to_thread(server.start)
    try:

        async def quiet(exc: Exception) -> None:
            pass

        async def connect(user: str | None, secret: str | None) -> None:
            nc = NatsClient()
            try:
                await nc.connect(
                    server.url,
                    user=user,
                    password=secret,
                    connect_timeout=5,  # a refusal by the (absent) callout takes 2 s
                    allow_reconnect=False,
                    error_cb=quiet,
                )
                await nc.flush(timeout=2)
            finally:
                await nc.close()  # a refused connection too: its socket is open

        others = ((None, None), (user, "wrong"), ("someone", password))
        for other, secret in others:
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await connect(other, secret)
        await connect(user, password)
    finally:
        await asyncio.to_thread(server.stop)


def test_cluster_nodes_differ_only_in_their_name() -> None:
    texts = {p.stem: p.read_text() for p in sorted((NATS / "cluster").glob("nats-*.conf"))}
    assert list(texts) == ["nats-1", "nats-2", "nats-3"]
    for name, text in texts.items():
        assert f"server_name: {name}\n" in text
        assert [h for h, _ in node_names(text)] == list(texts)
        assert {int(p) for _, p in node_names(text)} == {ROUTE_PORT}
        assert f"0.0.0.0:{CLIENT_PORT}" in text and f"http: 127.0.0.1:{MONITOR_PORT}" in text
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
        mounts = {v.split(":")[1]: (COMPOSE / v.split(":")[0]).resolve() for v in svc["volumes"]}
        # the cluster node's config as it is, included by nats.conf, which adds the user
        assert mounts["/etc/nats/cluster.conf"] == NATS / "cluster" / f"{name}.conf"
        assert mounts["/etc/nats/nats.conf"] == COMPOSE / "nats.conf"
        # public by default: deploy/nats/public's part, its secrets from callout-init
        assert mounts["/etc/nats/public.conf"] == NATS / "public" / "public.conf"
        assert "public-secrets:/etc/nats/secrets:ro" in svc["volumes"]
        assert svc["depends_on"]["callout-init"]["condition"] == "service_completed_successfully"
        nats_conf = (COMPOSE / "nats.conf").read_text()
        assert 'include "cluster.conf"' in nats_conf and 'include "public.conf"' in nats_conf
        text = mounts["/etc/nats/cluster.conf"].read_text()
        assert f"server_name: {name}" in text
        assert '"/data/jetstream"' in text and any(v.endswith(":/data") for v in svc["volumes"])
        assert svc["command"] == ["-c", "/etc/nats/nats.conf"]
    # `${VAR:?message}`: compose refuses to start without the operator's password, which
    # callout-init writes as the admin's
    init = services["callout-init"]
    assert init["command"] == ["callout", "init", "/secrets"]
    assert init["environment"]["ASMAN_ADMIN_PASSWORD"].startswith(f"${{{PASSWORD_VAR}:?")
    assert "public-secrets:/secrets" in init["volumes"]
    callout = services["callout"]
    assert callout["command"] == ["callout", "serve"]
    assert callout["environment"]["ASMAN_CALLOUT_SECRETS"] == "/secrets"
    assert callout["environment"]["ASMAN_REPLICAS"] == "3"
    callout_params = cli.commands["callout"].commands["serve"].params  # type: ignore[attr-defined]
    callout_env = {p.envvar for p in callout_params if isinstance(p.envvar, str)}
    assert set(callout["environment"]) <= callout_env
    assert cli.commands["callout"].commands["init"].params[1].envvar == "ASMAN_ADMIN_PASSWORD"  # type: ignore[attr-defined]
    public = (NATS / "public" / "public.conf").read_text()
    assert re.search(r"\{ user: admin, password: \$ASMAN_ADMIN_PASSWORD \}", public)

    env = compose["x-asman-env"]
    urls = [urlparse(u) for u in env["ASMAN_NATS_URL"].split(",")]
    assert [(u.hostname, u.port) for u in urls] == [(f"nats-{i}", CLIENT_PORT) for i in (1, 2, 3)]
    assert {(u.username, u.password) for u in urls} == {("admin", f"${{{PASSWORD_VAR}}}")}
    assert env["ASMAN_REPLICAS"] == "3"
    # the worker logs in as no one: it names its queue, as a stranger's worker would
    worker_urls = [
        urlparse(u) for u in services["worker"]["environment"]["ASMAN_NATS_URL"].split(",")
    ]
    assert {(u.username, u.hostname) for u in worker_urls} == {
        (None, f"nats-{i}") for i in (1, 2, 3)
    }

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


def test_k8s_nats_has_a_user_whose_password_the_operator_supplies() -> None:
    """The NATS pods read the password from a Secret, the Asman pods their URL from another;
    neither Secret is in deploy/k8s (no password is committed, and a pod whose Secret is
    missing does not start), and the README's commands make both from one password."""
    (values,) = load_yaml(K8S / "nats-values.yaml")
    (user,) = values["config"]["merge"]["authorization"]["users"]
    assert user == {"user": NATS_USER, "password": f"<< ${PASSWORD_VAR} >>"}
    ref = values["container"]["env"][PASSWORD_VAR]["valueFrom"]["secretKeyRef"]
    secrets = [
        (doc.get("metadata", {}).get("namespace"), doc["metadata"]["name"])
        for path in sorted(K8S.glob("*.yaml"))
        for doc in load_yaml(path)
        if doc.get("kind") == "Secret"
    ]
    assert secrets == [("asman", "asman-s3")], "the NATS password must not be committed"

    readme = (K8S / "README.md").read_text()
    made = re.search(
        r'kubectl -n nats create secret generic ([\w-]+) --from-literal=(\w+)="\$(\w+)"', readme
    )
    assert made is not None and made.groups()[:2] == (ref["name"], ref["key"])
    url = re.search(
        r"kubectl -n asman create secret generic asman-nats \\\n\s+"
        r'--from-literal=ASMAN_NATS_URL="([^"]+)"',
        readme,
    )
    assert url is not None
    parsed = urlparse(url.group(1))
    assert (parsed.username, parsed.password) == (NATS_USER, f"${made.group(3)}")
    assert (parsed.hostname, parsed.port) == ("nats.nats.svc.cluster.local", CLIENT_PORT)


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
    assert "ASMAN_NATS_URL" not in config  # it holds the password: Secret asman-nats
    assert config["ASMAN_REPLICAS"] == "3"
    secret = _k8s("Secret", "asman-s3")["stringData"]
    assert set(secret) == EXTRA_ENV

    for name, command in (("asman-gateway", "gateway"), ("asman-worker", "worker")):
        deployment = _k8s("Deployment", name)
        container = _container(deployment)
        assert container["image"] == "asman:local"
        assert container["args"][0] == command
        refs = {r.get("configMapRef", r.get("secretRef"))["name"] for r in container["envFrom"]}
        assert refs == {"asman", "asman-s3", "asman-nats"}
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
