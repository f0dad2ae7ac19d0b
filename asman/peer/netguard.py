"""What a job may make the worker fetch: no request to this machine or its private networks.

A job names URLs (inputs, config files, build contexts) and an image; the *worker* fetches
them, from the worker's own network, whatever the job's ``network`` says. Left alone, a job
could read the local NATS monitor, a cloud metadata service (169.254.169.254) or anything on
the worker's LAN, and copy it into its outputs (server-side request forgery).

So every address a fetch would go to is checked, after DNS resolution, and refused when it is
loopback, link-local, private (RFC 1918, CGNAT 100.64/10, other special-purpose blocks),
unique-local (fc00::/7), site-local, multicast, unspecified or reserved, including the IPv6
forms that carry an IPv4 address (IPv4-mapped, IPv4-compatible, 6to4, NAT64). The operator
allows named hosts, addresses or networks with ``asman worker --allow-url`` (a
:class:`UrlPolicy`).

The check holds against DNS rebinding because it is done where the connection is made:
:class:`GuardedResolver` is the aiohttp connector's resolver, so the connection goes to the
very addresses that were checked; a literal IP in a URL never reaches a resolver and is
checked by :func:`check_url` before each request. Redirects are followed here, one hop at a
time, each hop checked the same way.

Image references are checked by resolving their registry host (:func:`check_image_reference`);
the Docker engine resolves the name again when it pulls, so that check stops a job naming a
loopback or private registry, not a name whose DNS answer changes in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from asman.errors import ConfigError, UrlRefused

__all__ = [
    "MAX_REDIRECTS",
    "GuardedResolver",
    "UrlPolicy",
    "check_image_reference",
    "check_url",
    "guarded_get",
    "guarded_post",
    "guarded_session",
    "non_public",
    "registry_of",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Redirects followed per fetch (each one checked).
MAX_REDIRECTS = 5
#: How long resolving an image's registry host may take.
RESOLVE_TIMEOUT_S = 15.0

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RFC1918 = tuple(
    ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")


def non_public(address: IPAddress) -> str | None:
    """Why ``address`` is not a public unicast address ("loopback", "private", …), or None
    when it is one. An IPv6 address that carries an IPv4 one is judged by the IPv4 one too."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded: ipaddress.IPv4Address | None = None
        if address.ipv4_mapped is not None:
            return non_public(address.ipv4_mapped)
        if address.sixtofour is not None:
            embedded = address.sixtofour
        elif address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and (why := non_public(embedded)) is not None:
            return f"{why} (inside {address})"
        if address in _NAT64:
            return None  # the well-known NAT64 prefix to a public IPv4 address (DNS64)
        if address in _NAT64_LOCAL:
            return "NAT64 local-use"
        if address.is_site_local:
            return "site-local"
        if address in _UNIQUE_LOCAL:
            return "unique-local"
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv4Address):
        if any(address in n for n in _RFC1918):
            return "private"
        if address in _CGNAT:
            return "shared (CGNAT)"
    if address.is_reserved:
        return "reserved"
    if address.is_private or not address.is_global:
        return "special-purpose"
    return None


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _host_port(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}" if port is not None else shown


@dataclass(frozen=True, slots=True)
class UrlPolicy:
    """Which non-public destinations the worker may fetch from anyway (the operator's
    ``--allow-url``). Empty, it allows public addresses only.

    ``names`` are host names (lower case, no trailing dot): a URL naming one is allowed
    whatever the name resolves to, since the operator vouched for the name. ``networks`` are
    addresses and networks: a resolved address inside one is allowed. Each carries a port, or
    None for any port.
    """

    names: frozenset[tuple[str, int | None]] = frozenset()
    networks: tuple[tuple[IPNetwork, int | None], ...] = ()
    #: who is told to allow a refused address, and with which command (for the message)
    who: str = "the worker"
    command: str = "asman worker"

    @classmethod
    def parse(cls, entries: Iterable[str]) -> UrlPolicy:
        """A policy from ``--allow-url`` values: each is ``HOST`` or ``HOST:PORT``, where
        HOST is a name (``files.example.org``), an IPv4 address or network (``127.0.0.1``,
        ``10.0.0.0/8``) or an IPv6 address or network (``::1``, ``fd00::/8``; in brackets
        when a port follows: ``[::1]:8080``). A value may hold several, separated by commas
        or spaces."""
        names: set[tuple[str, int | None]] = set()
        networks: list[tuple[IPNetwork, int | None]] = []
        for value in entries:
            for entry in value.replace(",", " ").split():
                host, port = _split_entry(entry)
                if "/" in host or _ip(host) is not None:
                    try:
                        network = ipaddress.ip_network(host, strict=True)
                    except ValueError as exc:
                        raise ConfigError(
                            f"--allow-url {entry!r}: {exc}: give an address (10.0.0.5) or a "
                            "network by its first address (10.0.0.0/8)"
                        ) from None
                    if (network, port) not in networks:
                        networks.append((network, port))
                else:
                    name = host.lower().rstrip(".")
                    if not _NAME.fullmatch(name):
                        raise ConfigError(
                            f"--allow-url {entry!r} is not a host name, an address or a "
                            "network: give e.g. files.example.org, 10.0.0.5:8080 or 10.0.0.0/8"
                        )
                    names.add((name, port))
        return cls(frozenset(names), tuple(networks))

    def allows_name(self, host: str, port: int) -> bool:
        name = host.lower().rstrip(".")
        return (name, None) in self.names or (name, port) in self.names

    def allows_address(self, address: IPAddress, port: int) -> bool:
        forms: list[IPAddress] = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            forms.append(address.ipv4_mapped)
        return any(
            a.version == net.version and a in net and p in (None, port)
            for net, p in self.networks
            for a in forms
        )

    def check_address(self, host: str, port: int, address: str, target: str = "") -> None:
        """Raise :class:`UrlRefused` unless ``address`` (what ``host`` resolved to) may be
        connected to. ``target`` says what was being fetched, for the message."""
        prefix = f"{target}: " if target else ""
        ip = _ip(address)
        if ip is None:
            raise UrlRefused(f"{prefix}{host} resolved to {address!r}, not an IP address")
        if self.allows_address(ip, port) or (why := non_public(ip)) is None:
            return
        shown = _host_port(host, port)
        where = f"{shown} is" if _ip(host) is not None else f"{shown} resolves to {address},"
        raise UrlRefused(
            f"{prefix}{where} a {why} address: refused "
            f"(to allow it, start {self.who} with `{self.command} --allow-url {shown}`)",
            host=host,
            address=address,
        )


def _split_entry(entry: str) -> tuple[str, int | None]:
    if "://" in entry:
        raise ConfigError(f"--allow-url {entry!r}: give a host, not a URL (e.g. files.example.org)")
    if entry.startswith("["):
        host, sep, rest = entry[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"--allow-url {entry!r}: write an IPv6 address as [::1]:8080")
        return host, _port(entry, rest[1:]) if rest else None
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host, _port(entry, port)
    return entry, None  # a name, an IPv4 address or network, or a bare IPv6 one


def _port(entry: str, text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(f"--allow-url {entry!r}: the port must be a number from 1 to 65535")
    return int(text)


def check_url(url: URL, policy: UrlPolicy, target: str) -> None:
    """What can be checked before connecting: the scheme is http or https and a literal IP
    host is allowed (aiohttp connects to a literal without asking the resolver). A named host
    is checked by :class:`GuardedResolver` when the connection is made."""
    if url.scheme not in ("http", "https"):
        raise UrlRefused(f"{target}: only http and https URLs may be fetched, not {url.scheme!r}")
    host = url.host
    if not host:
        raise UrlRefused(f"{target}: the URL has no host")
    port = url.port or (443 if url.scheme == "https" else 80)
    if _ip(host) is not None:
        policy.check_address(host, port, host, target)
    elif _legacy_ipv4(host):
        raise UrlRefused(
            f"{target}: host {host!r} is an IPv4 address in a legacy form: write it as a.b.c.d",
            host=host,
        )


def _legacy_ipv4(host: str) -> bool:
    """``127.1``, ``2130706433``, ``0x7f.0.0.1``: names the C resolver reads as addresses."""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing a name if any of its addresses is not allowed: the
    connector connects only to the addresses this returns, so a name cannot be checked
    against one answer and connected to another."""

    def __init__(self, policy: UrlPolicy) -> None:
        self.policy = policy
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if _legacy_ipv4(host):
            raise UrlRefused(f"host {host!r} is an IPv4 address in a legacy form", host=host)
        results = await self._inner.resolve(host, port, family)
        if not self.policy.allows_name(host, port):
            for r in results:
                self.policy.check_address(host, port, r["host"])
        return results

    async def close(self) -> None:
        await self._inner.close()


def guarded_session(policy: UrlPolicy, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    """A client session whose every connection goes through the policy's resolver. It never
    reads proxy settings from the environment: a proxy would connect on our behalf,
    unchecked."""
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy), use_dns_cache=False)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False)


@contextlib.asynccontextmanager
async def guarded_get(
    session: aiohttp.ClientSession,
    url: str,
    policy: UrlPolicy,
    *,
    headers: Mapping[str, str] | None = None,
    target: str = "",
) -> AsyncIterator[aiohttp.ClientResponse]:
    """GET ``url`` through a :func:`guarded_session`, following at most
    :data:`MAX_REDIRECTS` redirects, each Location (a relative one resolved against the URL
    that answered) checked like the first URL. Yields the final response, whatever its
    status. ``target`` names what is fetched, for messages."""
    label = target or f"fetching {url}"
    current = URL(url)
    for hop in range(MAX_REDIRECTS + 1):
        what = label if hop == 0 else f"{label} (redirected to {_shown(current)})"
        check_url(current, policy, what)
        try:
            resp = await session.get(current, headers=headers, allow_redirects=False)
        except UrlRefused as exc:  # from the resolver, which does not know the URL
            raise UrlRefused(f"{what}: {exc}", host=exc.host, address=exc.address) from None
        async with resp:
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECTS or not location:
                yield resp
                return
        current = current.join(URL(location))
    raise UrlRefused(f"{label}: more than {MAX_REDIRECTS} redirects")


async def guarded_post(
    session: aiohttp.ClientSession,
    url: str,
    policy: UrlPolicy,
    *,
    data: bytes,
    headers: Mapping[str, str],
    target: str = "",
) -> int:
    """POST ``data`` to ``url`` through a :func:`guarded_session`; the answer's status.
    Only the method-keeping redirects (307, 308) are followed, at most :data:`MAX_REDIRECTS`,
    each Location checked like the first URL; any other status is returned as it is."""
    label = target or f"posting to {url}"
    current = URL(url)
    for hop in range(MAX_REDIRECTS + 1):
        what = label if hop == 0 else f"{label} (redirected to {_shown(current)})"
        check_url(current, policy, what)
        try:
            resp = await session.post(current, data=data, headers=headers, allow_redirects=False)
        except UrlRefused as exc:  # from the resolver, which does not know the URL
            raise UrlRefused(f"{what}: {exc}", host=exc.host, address=exc.address) from None
        async with resp:
            location = resp.headers.get("Location")
            if resp.status not in (307, 308) or not location:
                return resp.status
        current = current.join(URL(location))
    raise UrlRefused(f"{label}: more than {MAX_REDIRECTS} redirects")


def _shown(url: URL) -> URL:
    """``url`` for a message: a Location's credentials or query may hold a secret."""
    if url.user is not None or url.password is not None:
        url = url.with_user(None)
    return url.with_query(None).with_fragment(None)


def registry_of(image: str) -> tuple[str, int] | None:
    """The registry (host, port) an image reference names, or None when it names none (a
    Docker Hub or local image). Docker's rule: the part before the first ``/`` is a
    registry when it contains ``.`` or ``:``, is ``localhost``, or has upper-case letters."""
    first, slash, _ = image.partition("/")
    if not slash or not (
        "." in first or ":" in first or first == "localhost" or first.lower() != first
    ):
        return None
    if first.startswith("["):
        host, _, rest = first[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif ":" in first:
        host, _, port = first.rpartition(":")
    else:
        host, port = first, ""
    return host, int(port) if port.isdigit() else 443


async def check_image_reference(image: str, policy: UrlPolicy) -> None:
    """Refuse ``image`` when its registry is on a loopback, private or other non-public
    address (the Docker engine would send requests there on the job's say-so), unless the
    policy allows it. A name that does not resolve is left to the engine, which fails the
    pull or uses a local image of that name."""
    registry = registry_of(image)
    if registry is None:
        return
    host, port = registry
    target = f"image {image!r}"
    if _ip(host) is not None:
        policy.check_address(host, port, host, target)
        return
    if _legacy_ipv4(host):
        raise UrlRefused(f"{target}: registry {host!r} is an IPv4 address in a legacy form")
    if policy.allows_name(host, port):
        return
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError):
        return
    for *_, sockaddr in infos:
        policy.check_address(host, port, str(sockaddr[0]), target)
