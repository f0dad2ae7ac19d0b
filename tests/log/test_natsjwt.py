"""The callout's decision on authorization requests, without a server: requests are signed
here by an encoder of the test's own (jwt v2's layout), so the reader is checked against
something it did not write. The real nats-server checks what the callout writes in
tests/federation/test_public.py."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import nkeys
import pytest

from asman.errors import InvalidInput
from asman.log import natsjwt
from asman.log.callout import Callout, CalloutConfig, init_secrets
from asman.log.permissions import Capability


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _pair(prefix: int) -> Any:
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def _jwt(pair: Any, claims: dict[str, Any]) -> str:
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    return f"{head}.{body}.{_b64(pair.sign(f'{head}.{body}'.encode()))}"


def request(
    user: str | None, password: str | None, *, signer: Any = None, expires: int | None = None
) -> tuple[str, str, str]:
    """(token, server id, user nkey) of a request as nats-server sends it."""
    server = signer or _pair(nkeys.PREFIX_BYTE_SERVER)
    server_id = bytes(server.public_key).decode()
    user_nkey = bytes(_pair(nkeys.PREFIX_BYTE_USER).public_key).decode()
    claims = {
        "aud": natsjwt.REQUEST_AUDIENCE,
        "exp": expires if expires is not None else int(time.time()) + 2,
        "iss": server_id,
        "sub": "ISSUER",
        "nats": {
            "type": "authorization_request",
            "version": 2,
            "server_id": {"id": server_id, "name": "s", "host": "127.0.0.1"},
            "user_nkey": user_nkey,
            "client_info": {"host": "127.0.0.1"},
            "connect_opts": {"user": user, "pass": password, "protocol": 1},
        },
    }
    return _jwt(server, claims), server_id, user_nkey


@pytest.fixture
def callout(tmp_path: Path) -> Callout:
    init_secrets(tmp_path / "secrets")
    return Callout(CalloutConfig(servers=("nats://127.0.0.1:1",), secrets_dir=tmp_path / "secrets"))


def test_a_named_queue_gets_its_subjects_and_inbox_only(callout: Callout) -> None:
    capability = Capability.new(["alpha"])
    token, server_id, user_nkey = request(capability.user, capability.password)
    answer = callout.decide(token.encode())
    assert answer is not None
    response = natsjwt.decode(answer.decode(), nkeys.PREFIX_BYTE_ACCOUNT)
    assert (response["sub"], response["aud"]) == (user_nkey, server_id)
    assert response["iss"] == callout.signer.public_key
    user = natsjwt.decode(response["nats"]["jwt"], nkeys.PREFIX_BYTE_ACCOUNT)
    assert (user["sub"], user["aud"], user["nats"]["type"]) == (user_nkey, "ASMAN", "user")
    pub, sub = user["nats"]["pub"]["allow"], user["nats"]["sub"]["allow"]
    assert "asman.job.alpha.*" in pub and "asman.workers.alpha.*.*" in pub
    assert sub[0] == f"{capability.inbox_prefix}.>"
    assert capability.secret not in json.dumps(user)  # only its hash names the inbox
    for subject in [*pub, *sub]:
        assert ">" not in subject.split(".")[:-1] and subject not in (">", "asman.>")
        # alpha's, its inbox's, or a pull/delete of a read consumer by its random name
        unconfined = subject.startswith(("$JS.API.CONSUMER.MSG.NEXT.", "$JS.API.CONSUMER.DELETE."))
        assert "alpha" in subject or subject.startswith(capability.inbox_prefix) or unconfined


@pytest.mark.parametrize(
    ("user", "password", "why"),
    [
        (None, None, "no user"),
        ("admin", "x", "user 'admin'"),
        ("asman", "a" * 32, "no queue named"),
        ("asman", "a" * 32 + " a.b", "not valid"),
        ("asman", "short alpha", "secret"),
    ],
)
def test_anything_else_is_refused_with_a_reason(
    callout: Callout, user: str | None, password: str | None, why: str
) -> None:
    token, _, user_nkey = request(user, password)
    answer = callout.decide(token.encode())
    assert answer is not None
    response = natsjwt.decode(answer.decode(), nkeys.PREFIX_BYTE_ACCOUNT)
    assert response["sub"] == user_nkey and "jwt" not in response["nats"]
    assert why in response["nats"]["error"]
    assert callout.refused == 1 and callout.admitted == 0


def test_a_request_not_signed_by_a_server_gets_no_answer(callout: Callout) -> None:
    capability = Capability.new(["alpha"])
    token, _, _ = request(capability.user, capability.password)
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["nats"]["connect_opts"]["pass"] = capability.password + " beta"
    forged = f"{head}.{_b64(json.dumps(claims).encode())}.{sig}"  # the old signature
    by_a_user = request(capability.user, capability.password, signer=_pair(nkeys.PREFIX_BYTE_USER))
    expired = request(capability.user, capability.password, expires=int(time.time()) - 10)
    for bad in (forged, by_a_user[0], expired[0], "junk", "a.b.c"):
        assert callout.decide(bad.encode()) is None, bad
    with pytest.raises(InvalidInput, match="signature"):
        natsjwt.decode(forged, nkeys.PREFIX_BYTE_SERVER)
