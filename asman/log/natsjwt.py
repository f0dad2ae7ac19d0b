"""NATS JWTs for the auth callout: read the server's authorization request, write the user
it admits and the authorization response (the claim formats of github.com/nats-io/jwt v2).

``nkeys`` (PyPI, by the NATS maintainers) holds the account key and signs. No well-kept Python
library encodes the callout's claims (``nats-jwt`` 0.2 has no authorization claims and calls
itself untested; ``nats-callout`` 0.1 pins a beta of its serialiser), so this module does,
following jwt v2's ``claims.go``: a header ``{"typ":"JWT","alg":"ed25519-nkey"}`` and a JSON
payload, each base64url without padding, then the Ed25519 signature of
``<header>.<payload>``, base64url. The real nats-server checks what it writes in
tests/federation/test_public.py.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.signing
import nkeys

from asman.errors import ConfigError, InvalidInput
from asman.log.permissions import Permissions

__all__ = [
    "AuthRequest",
    "Signer",
    "decode",
    "new_account_seed",
    "read_request",
    "response_jwt",
    "user_jwt",
]

_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
_LIB_VERSION = 2  # the claims version nats-server reads (jwt v2)
#: a request JWT larger than this is refused unread (nats-server's limit is 1 MiB)
MAX_TOKEN_BYTES = 64 * 1024
#: the audience nats-server gives its authorization requests
REQUEST_AUDIENCE = "nats-authorization-request"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_account_seed() -> str:
    """A new account nkey seed (``SA…``): the key that signs the users the callout admits."""
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT)).decode()


class Signer:
    """An account nkey from its seed: signs user JWTs and authorization responses."""

    def __init__(self, seed: str) -> None:
        try:
            prefix, _ = nkeys.decode_seed(seed.strip().encode())
            self._pair = nkeys.from_seed(seed.strip().encode())
        except (nkeys.NkeysError, binascii.Error, ValueError) as exc:
            raise ConfigError("the callout's issuer seed is not an nkey seed") from exc
        if prefix != nkeys.PREFIX_BYTE_ACCOUNT:
            raise ConfigError("the callout's issuer seed is not an account seed (SA…)")
        self.public_key: str = bytes(self._pair.public_key).decode()

    def encode(self, claims: dict[str, Any]) -> str:
        """Sign ``claims`` (the issuer, issue time and id are filled in) as a JWT."""
        data = {**claims, "iss": self.public_key, "iat": int(time.time())}
        data.pop("jti", None)
        data["jti"] = _claims_hash(data)
        head = _b64(json.dumps(_HEADER, separators=(",", ":")).encode())
        body = _b64(json.dumps(data, separators=(",", ":")).encode())
        signed = f"{head}.{body}"
        return f"{signed}.{_b64(self._pair.sign(signed.encode()))}"


def _claims_hash(data: dict[str, Any]) -> str:
    """jwt v2's ``jti``: base32 of SHA-512/256 of the standard claims (without ``jti``), in
    the order Go marshals them."""
    order = ("aud", "exp", "iat", "iss", "name", "nbf", "sub")
    std = {k: data[k] for k in order if data.get(k)}
    digest = hashlib.new("sha512_256", json.dumps(std, separators=(",", ":")).encode())
    return base64.b32encode(digest.digest()).rstrip(b"=").decode()


def _public_key(key: str, prefix: int, what: str) -> bytes:
    """The raw Ed25519 key of a public nkey of the given kind (its checksum checked)."""
    try:
        raw = base64.b32decode(key.encode() + b"=" * (-len(key) % 8))
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{what} {key!r} is not an nkey") from None
    if len(raw) != 35 or raw[0] != prefix:
        raise InvalidInput(f"{what} {key!r} is not a public {what} nkey")
    if int.from_bytes(raw[-2:], "little") != nkeys.crc16(bytearray(raw[:-2])):
        raise InvalidInput(f"{what} {key!r} has a wrong checksum")
    return raw[1:33]


def decode(token: str, issuer_prefix: int) -> dict[str, Any]:
    """The claims of ``token``, whose signature must verify for its issuer (``iss``), a public
    nkey of the kind ``issuer_prefix``. ``InvalidInput`` otherwise."""
    if len(token) > MAX_TOKEN_BYTES:
        raise InvalidInput(f"a JWT of {len(token)} bytes is over {MAX_TOKEN_BYTES}")
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidInput("not a JWT: it needs three parts")
    try:
        header = json.loads(_unb64(parts[0]))
        claims = json.loads(_unb64(parts[1]))
        signature = _unb64(parts[2])
    except (binascii.Error, ValueError):
        raise InvalidInput("not a JWT: a part is not base64url JSON") from None
    if not isinstance(header, dict) or str(header.get("alg", "")).lower() != _HEADER["alg"]:
        raise InvalidInput(f"JWT algorithm {header.get('alg')!r} is not ed25519-nkey")
    if not isinstance(claims, dict) or not isinstance(claims.get("iss"), str):
        raise InvalidInput("the JWT names no issuer")
    key = _public_key(claims["iss"], issuer_prefix, "issuer")
    try:
        nacl.signing.VerifyKey(key).verify(f"{parts[0]}.{parts[1]}".encode(), signature)
    except (nacl.exceptions.BadSignatureError, ValueError):
        raise InvalidInput("the JWT's signature does not verify for its issuer") from None
    return claims


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """What nats-server tells the callout about a connection it is admitting."""

    user_nkey: str  # the user the response must admit (a fresh key per connection)
    server_id: str  # the response's audience
    user: str | None  # CONNECT's user and password
    password: str | None
    host: str  # the client's address, for the callout's log


def read_request(token: str) -> AuthRequest:
    """Verify and read an authorization request JWT (signed by the server's nkey)."""
    claims = decode(token, nkeys.PREFIX_BYTE_SERVER)
    nats = claims.get("nats")
    if not isinstance(nats, dict) or nats.get("type") != "authorization_request":
        raise InvalidInput("the JWT is not an authorization request")
    if claims.get("aud") != REQUEST_AUDIENCE:
        raise InvalidInput(f"the request's audience is {claims.get('aud')!r}")
    expires = claims.get("exp")
    if isinstance(expires, int) and 0 < expires < time.time():
        raise InvalidInput("the authorization request has expired")
    server = nats.get("server_id") or {}
    user_nkey = nats.get("user_nkey")
    if not isinstance(user_nkey, str):
        raise InvalidInput("the request names no user nkey")
    _public_key(user_nkey, nkeys.PREFIX_BYTE_USER, "user")
    # the server's own key signs the request: its id is that key
    if not isinstance(server, dict) or server.get("id") != claims["iss"]:
        raise InvalidInput("the request's server id is not its signer")
    opts = nats.get("connect_opts") or {}
    info = nats.get("client_info") or {}
    user, password = opts.get("user"), opts.get("pass")
    return AuthRequest(
        user_nkey=user_nkey,
        server_id=str(server["id"]),
        user=user if isinstance(user, str) else None,
        password=password if isinstance(password, str) else None,
        host=str(info.get("host", "")),
    )


def user_jwt(
    signer: Signer, user_nkey: str, account: str, permissions: Permissions, name: str
) -> str:
    """A user of ``account`` (the callout's audience names it in server-config mode) with
    exactly ``permissions``: publish and subscribe allow-lists, everything else denied."""
    if not permissions.publish or not permissions.subscribe:
        # empty permissions would give the account's defaults (everything): never
        raise ValueError("a user JWT needs publish and subscribe permissions")
    return signer.encode(
        {
            "aud": account,
            "name": name,
            "sub": user_nkey,
            "nats": {
                "pub": {"allow": list(permissions.publish)},
                "sub": {"allow": list(permissions.subscribe)},
                "subs": -1,
                "data": -1,
                "payload": -1,
                "allowed_connection_types": ["STANDARD"],
                "type": "user",
                "version": _LIB_VERSION,
            },
        }
    )


def response_jwt(
    signer: Signer, request: AuthRequest, *, user: str | None = None, error: str | None = None
) -> str:
    """The authorization response: the admitted ``user`` JWT, or the ``error`` that refuses
    the connection (exactly one)."""
    if (user is None) == (error is None):
        raise ValueError("an authorization response holds a user JWT or an error")
    nats: dict[str, Any] = {"type": "authorization_response", "version": _LIB_VERSION}
    if user is not None:
        nats["jwt"] = user
    else:
        nats["error"] = error
    return signer.encode({"aud": request.server_id, "sub": request.user_nkey, "nats": nats})
