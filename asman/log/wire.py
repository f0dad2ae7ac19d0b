"""The wire format: deterministic CBOR, and every event on the log a signed COSE_Sign1 envelope.

This is the only module that imports ``cbor2``.

**Values.** ``encode`` takes None, bool, int (64-bit CBOR range), str, bytes, list/tuple and dict
with str keys; nothing else (no floats: times and durations are integer milliseconds). Output is
deterministic CBOR (RFC 8949 §4.2): shortest integers, definite lengths, sorted map keys. cbor2's
``canonical=True`` sorts keys length-first; for text keys that is the same as bytewise order.
``decode`` accepts the same set of values back, and nothing else: no tags, floats, simple values,
indefinite lengths, duplicate keys or trailing bytes. Lists come back as lists.

**Envelope** (COSE_Sign1, RFC 9052, tag 18)::

    18([protected: bstr, unprotected: {}, payload: bstr, signature: bstr])

    protected = encode({1: -19, 4: kid, "sub": subject})   # alg Ed25519 (RFC 9864), signer key
    payload   = encode(event)                               # event["v"] = schema version
    signature = Ed25519(["Signature1", protected, subject.encode(), payload])

The subject is both in the protected header and the external AAD, so an event cannot be replayed
onto another subject (job or queue). Readers verify the bytes as received, never re-encoded.
EdDSA (-8) is accepted on input; the unprotected header must be empty.

**Signed elsewhere.** A key this process does not hold (a browser's, through the gateway)
signs in two steps: ``to_sign`` gives the protected header, the payload and the exact bytes
to sign; ``assemble`` makes the envelope of those parts and the signature, which a reader
then verifies with ``open_envelope`` like any other.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NoReturn

import cbor2

from asman.errors import (
    BadSignature,
    EnvelopeTooLarge,
    MalformedEnvelope,
    WrongSubject,
)
from asman.log.keys import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, PeerKey, verify

__all__ = [
    "ALG_ED25519",
    "ALG_EDDSA",
    "COSE_SIGN1_TAG",
    "DEFAULT_MAX_SIZE",
    "DONE_ENTRY",
    "MAX_DEPTH",
    "SCHEMA_VERSION",
    "Entry",
    "Opened",
    "ToSign",
    "assemble",
    "decode",
    "encode",
    "open_envelope",
    "parse_entry",
    "running_entry",
    "seal",
    "seal_opened",
    "to_sign",
    "waiting_entry",
]

COSE_SIGN1_TAG = 18
ALG_ED25519 = -19  # RFC 9864, fully specified
ALG_EDDSA = -8  # RFC 9053, deprecated by RFC 9864; accepted on input
SCHEMA_VERSION = 2
DEFAULT_MAX_SIZE = 1024 * 1024
MAX_DEPTH = 64  # nested containers, on encode and decode

_HDR_ALG = 1
_HDR_CRIT = 2
_HDR_KID = 4
_HDR_SUB = "sub"
_ACCEPTED_ALGS = frozenset({ALG_ED25519, ALG_EDDSA})
# A protected header is ~40 bytes plus the subject. The bound also keeps its int-keyed map
# small: Python int hashes collide by construction, so big int-keyed maps are a DoS vector.
_MAX_PROTECTED_SIZE = 4096
_INT_MIN = -(2**64)
_INT_MAX = 2**64 - 1

# Tags cbor2 decodes itself (found by probing cbor2 6.2; a test re-probes the installed
# version). Each is overridden to fail, so no built-in semantic decoder ever runs on input
# (no regex compiling, MIME parsing or shared references), and tag_hook rejects the rest.
_CBOR2_SEMANTIC_TAGS = (
    0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004,
    43000, 55799,
)  # fmt: skip


def _reject_semantic(value: object, immutable: bool) -> NoReturn:
    raise ValueError("CBOR tags are not allowed")


def _reject_tag(tag: cbor2.CBORTag, immutable: bool) -> NoReturn:
    raise ValueError(f"CBOR tag {tag.tag} is not allowed")


def _envelope_tag(tag: cbor2.CBORTag, immutable: bool) -> cbor2.CBORTag:
    if tag.tag != COSE_SIGN1_TAG:
        raise ValueError(f"CBOR tag {tag.tag} is not allowed")
    return tag


_NO_SEMANTIC = MappingProxyType({tag: _reject_semantic for tag in _CBOR2_SEMANTIC_TAGS})


@dataclass(frozen=True, slots=True)
class Opened:
    """A verified event: who signed it, what it says, and the subject it was signed for."""

    signer: str  # peer id of the signing key
    event: dict[str, Any]
    protected_sub: str


# -- values ------------------------------------------------------------------------------


class _Unencodable(Exception):
    def __init__(self, what: str) -> None:
        self.what = what
        self.path: list[str] = []


def _check_encodable(obj: object, depth: int) -> None:
    """Raise _Unencodable, its path filled in on the way out, for a value we do not encode.

    str, bytes and int subclasses (StrEnum, IntEnum) are accepted: cbor2 encodes them as
    their base type.
    """
    if obj is None or isinstance(obj, (str, bytes, bool)):
        return
    if isinstance(obj, int):
        if not _INT_MIN <= obj <= _INT_MAX:
            raise _Unencodable("integer outside the 64-bit CBOR range")
        return
    if depth >= MAX_DEPTH:
        raise _Unencodable(f"nesting deeper than {MAX_DEPTH} levels")
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise _Unencodable(f"map key {key!r} is a {type(key).__name__}, not a str")
            try:
                _check_encodable(value, depth + 1)
            except _Unencodable as err:
                err.path.append(f"[{key!r}]")
                raise
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            try:
                _check_encodable(item, depth + 1)
            except _Unencodable as err:
                err.path.append(f"[{i}]")
                raise
        return
    if isinstance(obj, float):
        raise _Unencodable("float is not allowed: use an int (milliseconds for times)")
    raise _Unencodable(f"{type(obj).__name__} is not a value the log carries")


def encode(obj: object) -> bytes:
    """Deterministic CBOR for ``obj``; ``TypeError`` naming the path of a disallowed value."""
    try:
        _check_encodable(obj, 0)
    except _Unencodable as err:
        path = "$" + "".join(reversed(err.path))
        raise TypeError(f"cannot encode {path}: {err.what}") from None
    try:
        return cbor2.dumps(obj, canonical=True)
    except UnicodeEncodeError as exc:  # lone surrogates
        raise TypeError(f"cannot encode a str that is not valid Unicode: {exc}") from None


def _check_decoded(obj: object, depth: int, int_keys: bool) -> None:
    """Reject decoded values outside our model: floats, simple values, undefined, tags."""
    if obj is None or isinstance(obj, (str, int, bytes)):  # bool is an int
        return
    if depth >= MAX_DEPTH:  # also guards against cycles, should a shared reference get in
        raise ValueError(f"nesting deeper than {MAX_DEPTH} levels")
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not (type(key) is str or (int_keys and type(key) is int)):
                raise ValueError(f"map key {key!r} is not a text string")
            _check_decoded(value, depth + 1, int_keys)
        return
    if isinstance(obj, list):
        for item in obj:
            _check_decoded(item, depth + 1, int_keys)
        return
    if isinstance(obj, float):
        raise ValueError("floats are not allowed")
    raise ValueError(f"{obj!r} is not allowed")


def _loads(data: bytes, *, int_keys: bool = False) -> Any:
    """Strictly decode exactly one CBOR value from ``data``; ValueError / CBORError if not."""
    fp = io.BytesIO(data)
    obj = cbor2.CBORDecoder(
        fp,
        tag_hook=_reject_tag,
        semantic_decoders=_NO_SEMANTIC,
        max_depth=MAX_DEPTH,
        allow_indefinite=False,
        allow_duplicate_keys=False,
        strict_hashable_types=not int_keys,
    ).decode()
    if fp.tell() != len(data):
        raise ValueError(f"{len(data) - fp.tell()} trailing bytes after the CBOR value")
    _check_decoded(obj, 0, int_keys)
    return obj


def decode(data: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> Any:
    """Decode one CBOR value (see the module docstring for what is accepted).

    ``EnvelopeTooLarge`` over ``max_size`` bytes, ``MalformedEnvelope`` for anything else wrong.
    """
    if len(data) > max_size:
        raise EnvelopeTooLarge(f"{len(data)} bytes is over the {max_size}-byte limit")
    try:
        return _loads(data)
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise MalformedEnvelope(f"not valid CBOR for the log: {exc}") from None


# -- envelopes ---------------------------------------------------------------------------


def _bstr(data: bytes) -> bytes:
    """The CBOR head of a byte string of ``len(data)`` bytes (shortest form, RFC 8949 §4.2)."""
    n = len(data)
    if n < 24:
        return bytes((0x40 | n,))
    if n < 0x100:
        return bytes((0x58, n))
    if n < 0x10000:
        return b"\x59" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\x5a" + n.to_bytes(4, "big")
    return b"\x5b" + n.to_bytes(8, "big")


# The fixed parts of the two structures below, in deterministic CBOR: an array of 4 items;
# the text "Signature1"; tag 18; an empty map. Both are written by hand (the same bytes
# cbor2 writes, which a test checks): they are made for every event signed or verified.
_SIG1_HEAD = b"\x84\x6aSignature1"
_SIGN1_HEAD = b"\xd2\x84"
_EMPTY_MAP = b"\xa0"


def _sig_structure(protected: bytes, subject_bytes: bytes, payload: bytes) -> bytes:
    """``["Signature1", protected, subject, payload]``: the bytes the signature covers."""
    return b"".join(
        (
            _SIG1_HEAD,
            _bstr(protected),
            protected,
            _bstr(subject_bytes),
            subject_bytes,
            _bstr(payload),
            payload,
        )
    )


@functools.lru_cache(maxsize=4096)
def _protected_header(kid: bytes, subject: str) -> bytes:
    """The protected header of our events on ``subject`` (a worker signs three per job)."""
    return cbor2.dumps({_HDR_ALG: ALG_ED25519, _HDR_KID: kid, _HDR_SUB: subject}, canonical=True)


def seal(key: PeerKey, subject: str, event: Mapping[str, Any]) -> bytes:
    """Sign ``event`` for ``subject`` with ``key``: a COSE_Sign1 envelope, ready to publish.

    Adds ``"v": SCHEMA_VERSION`` unless the event has a ``"v"`` (which must be an int).
    ``TypeError`` if the event holds a value ``encode`` refuses.
    """
    return _seal(key, subject, event)[0]


def seal_opened(key: PeerKey, subject: str, event: Mapping[str, Any]) -> tuple[bytes, Opened]:
    """``seal``, and the ``Opened`` that ``open_envelope`` returns for that envelope on
    ``subject``: the signer's own first-hand view of its event (the payload is decoded from
    the very bytes that were signed), so the signer need not verify its own signature."""
    envelope, payload = _seal(key, subject, event)
    return envelope, Opened(signer=key.peer_id, event=_loads(payload), protected_sub=subject)


def _payload(subject: str, event: Mapping[str, Any]) -> bytes:
    if not isinstance(subject, str):
        raise TypeError(f"subject must be a str, not {type(subject).__name__}")
    body = {"v": SCHEMA_VERSION, **event}
    if type(body["v"]) is not int:
        raise TypeError(f"event field 'v' (schema version) must be an int: {body['v']!r}")
    return encode(body)


def _seal(key: PeerKey, subject: str, event: Mapping[str, Any]) -> tuple[bytes, bytes]:
    payload = _payload(subject, event)
    protected = _protected_header(key.public_bytes, subject)
    signature = key.sign(_sig_structure(protected, subject.encode(), payload))
    return assemble(protected, payload, signature), payload


@dataclass(frozen=True, slots=True)
class ToSign:
    """An event made ready for a key this process does not hold: ``data`` is what that key
    signs (the ``Sig_structure``), ``protected`` and ``payload`` go into the envelope."""

    protected: bytes
    payload: bytes
    data: bytes


def to_sign(kid: bytes, subject: str, event: Mapping[str, Any]) -> ToSign:
    """The parts of ``event``'s envelope for ``subject`` signed by the key ``kid`` (32 raw
    bytes), as ``seal`` would make them; ``assemble`` puts the signature to them. Adds ``"v"``
    as ``seal`` does; ``TypeError`` for a value ``encode`` refuses or a kid of the wrong size."""
    if not isinstance(kid, bytes) or len(kid) != PUBLIC_KEY_SIZE:
        raise TypeError(f"kid must be a {PUBLIC_KEY_SIZE}-byte public key")
    payload = _payload(subject, event)
    protected = _protected_header(kid, subject)
    return ToSign(protected, payload, _sig_structure(protected, subject.encode(), payload))


def assemble(protected: bytes, payload: bytes, signature: bytes) -> bytes:
    """The COSE_Sign1 envelope ``18([protected, {}, payload, signature])`` of its parts, as
    given: nothing is checked here (``open_envelope`` checks it, as for any envelope)."""
    return b"".join(
        (
            _SIGN1_HEAD,
            _bstr(protected),
            protected,
            _EMPTY_MAP,
            _bstr(payload),
            payload,
            _bstr(signature),
            signature,
        )
    )


def _malformed(what: str, subject: str) -> MalformedEnvelope:
    return MalformedEnvelope(f"not a valid signed event: {what}", subject)


def open_envelope(data: bytes, subject: str, *, max_size: int = DEFAULT_MAX_SIZE) -> Opened:
    """Verify an envelope received on ``subject`` and return its signer and event.

    Checks, in order: size (``EnvelopeTooLarge``); COSE_Sign1 shape and the algorithm and key
    id (``MalformedEnvelope``); the signed subject (``WrongSubject``); the Ed25519 signature
    over the bytes as received (``BadSignature``); the payload, a map with an int ``"v"``
    (``MalformedEnvelope``). Unknown event fields are kept.
    """
    if len(data) > max_size:
        raise EnvelopeTooLarge(
            f"envelope is {len(data)} bytes, over the {max_size}-byte limit", subject
        )

    # Shape: 18([protected: bstr, unprotected: {}, payload: bstr, signature: bstr])
    try:
        fp = io.BytesIO(data)
        outer = cbor2.CBORDecoder(
            fp,
            tag_hook=_envelope_tag,
            semantic_decoders=_NO_SEMANTIC,
            max_depth=4,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        ).decode()
        trailing = len(data) - fp.tell()
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise _malformed(f"not CBOR ({exc})", subject) from None
    if trailing:
        raise _malformed(f"{trailing} trailing bytes after the envelope", subject)
    if type(outer) is not cbor2.CBORTag or outer.tag != COSE_SIGN1_TAG:
        raise _malformed(f"not a COSE_Sign1 message (tag {COSE_SIGN1_TAG})", subject)
    items = outer.value  # cbor2 decodes a tag's content immutable: a tuple, a frozendict
    if not isinstance(items, (list, tuple)) or len(items) != 4:
        raise _malformed("COSE_Sign1 must be an array of 4 items", subject)
    protected, unprotected, payload, signature = items
    if type(protected) is not bytes:
        raise _malformed("protected header is not a byte string", subject)
    if not isinstance(unprotected, Mapping) or unprotected:
        raise _malformed("unprotected header must be an empty map", subject)
    if type(payload) is not bytes:
        raise _malformed("payload is not a byte string (detached payloads are not used)", subject)
    if type(signature) is not bytes or len(signature) != SIGNATURE_SIZE:
        raise _malformed(f"signature is not a {SIGNATURE_SIZE}-byte string", subject)
    if len(protected) > _MAX_PROTECTED_SIZE:
        raise _malformed(f"protected header is over {_MAX_PROTECTED_SIZE} bytes", subject)
    try:
        header = _loads(protected, int_keys=True)
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise _malformed(f"protected header is not valid CBOR ({exc})", subject) from None
    if type(header) is not dict:
        raise _malformed("protected header is not a map", subject)
    if _HDR_CRIT in header:
        raise _malformed("protected header has critical parameters we do not know", subject)
    alg = header.get(_HDR_ALG)
    kid = header.get(_HDR_KID)
    signed_sub = header.get(_HDR_SUB)
    if type(alg) is not int:
        raise _malformed("protected header has no integer alg (1)", subject)
    if type(kid) is not bytes:
        raise _malformed("protected header has no byte-string kid (4)", subject)
    if type(signed_sub) is not str:
        raise _malformed("protected header has no text 'sub'", subject)

    if alg not in _ACCEPTED_ALGS:
        raise _malformed(
            f"alg {alg} is not supported: expected Ed25519 ({ALG_ED25519}) or EdDSA ({ALG_EDDSA})",
            subject,
        )
    if len(kid) != PUBLIC_KEY_SIZE:
        raise _malformed(f"kid is {len(kid)} bytes, not a {PUBLIC_KEY_SIZE}-byte key", subject)
    if signed_sub != subject:
        raise WrongSubject(
            f"event signed for subject {signed_sub!r} was published on another subject "
            "(a replay; ignore it)",
            subject,
        )

    if not verify(kid, signature, _sig_structure(protected, subject.encode(), payload)):
        raise BadSignature(f"signature does not verify for key {kid.hex()}", subject)

    try:
        event = _loads(payload)
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise _malformed(f"payload is not valid CBOR ({exc})", subject) from None
    if type(event) is not dict:
        raise _malformed("payload is not a map", subject)
    if type(event.get("v")) is not int:
        raise _malformed("payload has no integer schema version 'v'", subject)
    return Opened(signer=kid.hex(), event=event, protected_sub=signed_sub)


# -- the waiting index ----------------------------------------------------------------------

#: An entry of ``ASMAN_WAITING`` says what a job needs from workers, as a hint: a worker
#: always reads (or claims by compare-and-set on) the job's own subject before it believes
#: anything, so an entry needs no signature. One entry per job (the stream keeps the last):
#:
#: * ``w <seq> [<memory> [t]]``: waiting; ``seq`` is the job's last sequence when written (a
#:   worker claims by compare-and-set on it while it reads the job: one round trip);
#:   ``memory``, the bytes its definition asks for, when it asks (a worker whose ceiling is
#:   lower leaves it to others without reading it: a hint it checks before believing a
#:   "too big", and after claiming a "fits"); ``t`` when the job has ``tags`` (a worker
#:   reads its definition once before trying it, and runs it only with every tag among its
#:   labels);
#: * ``r <seq> <peer id> <proc>``: running, claimed at ``seq`` by that worker process;
#: * ``d``: finished (written with a short per-message TTL, so it goes away).
ENTRY_WAITING = "w"
ENTRY_RUNNING = "r"
ENTRY_DONE = "d"


@dataclass(frozen=True, slots=True)
class Entry:
    kind: str
    seq: int = 0
    holder: str = ""
    proc: str = ""
    memory: int = 0  # waiting: the memory the job asks for (0: nothing said)
    tagged: bool = False  # waiting: the job has tags


def waiting_entry(last_seq: int, memory: int = 0, tagged: bool = False) -> bytes:
    if tagged:
        return f"w {max(0, last_seq)} {max(0, memory)} t".encode()
    if memory > 0:
        return f"w {max(0, last_seq)} {memory}".encode()
    return f"w {max(0, last_seq)}".encode()


def running_entry(claim_seq: int, holder: str, proc: str) -> bytes:
    return f"r {claim_seq} {holder} {proc}".encode()


DONE_ENTRY = b"d"


def parse_entry(data: bytes) -> Entry | None:
    """The entry in ``data``, or None when it is not one (junk is ignored)."""
    if len(data) > 100:
        return None
    parts = data.split(b" ")
    kind = parts[0]
    try:
        if kind == b"d" and len(parts) == 1:
            return Entry(ENTRY_DONE)
        tagged = len(parts) == 4 and parts[3] == b"t"
        numbers = parts[1:3]
        if (
            kind == b"w"
            and (len(parts) in (2, 3) or tagged)
            and all(p.isdigit() and len(p) <= 20 for p in numbers)
        ):
            memory = int(numbers[1]) if len(numbers) > 1 else 0
            return Entry(ENTRY_WAITING, int(parts[1]), memory=memory, tagged=tagged)
        if (
            kind == b"r"
            and len(parts) == 4
            and parts[1].isdigit()
            and len(parts[1]) <= 20
            and len(parts[2]) == 64
            and 0 < len(parts[3]) <= 32
        ):
            holder, proc = parts[2].decode("ascii"), parts[3].decode("ascii")
            if holder.strip("0123456789abcdef") or proc.strip("0123456789abcdef"):
                return None
            return Entry(ENTRY_RUNNING, int(parts[1]), holder, proc)
    except (ValueError, UnicodeDecodeError):
        return None
    return None
