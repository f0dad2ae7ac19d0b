"""The wire format: deterministic CBOR and COSE_Sign1 envelopes, decoded strictly.

Envelopes for the negative cases are built byte by byte here (``cose``, ``header``), so the
tests do not share code with the module under test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asman.errors import (
    BadSignature,
    EnvelopeError,
    EnvelopeTooLarge,
    MalformedEnvelope,
    WrongSubject,
)
from asman.log import wire
from asman.log.keys import PeerKey
from asman.log.wire import Opened, decode, encode, open_envelope, seal

SUBJECT = "asman.q.gpu-a100.job.3f2a"
KEY = PeerKey.from_seed(bytes(range(32)))
OTHER = PeerKey.from_seed(bytes(range(1, 33)))
EVENT: dict[str, Any] = {
    "type": "claimed",
    "job": "ab" * 32,
    "attempt": 2,
    "seq": 1234567,
    "expires_ms": 1_732_200_030_000,
    "nonce": b"\x01\x02\x03",
    "tags": ["gpu", "fast"],
    "meta": {"a": None, "b": True, "c": -5},
}


# -- CBOR built by hand --------------------------------------------------------------------


def head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for extra, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | extra]) + n.to_bytes(size, "big")
    raise AssertionError(n)


def cint(n: int) -> bytes:
    return head(0, n) if n >= 0 else head(1, -1 - n)


def bstr(b: bytes) -> bytes:
    return head(2, len(b)) + b


def tstr(s: str) -> bytes:
    return head(3, len(s.encode())) + s.encode()


def header(alg: int = -19, kid: bytes = KEY.public_bytes, sub: str = SUBJECT) -> bytes:
    return head(5, 3) + cint(1) + cint(alg) + cint(4) + bstr(kid) + tstr("sub") + tstr(sub)


def sig_structure(protected: bytes, aad: bytes, payload: bytes) -> bytes:
    return head(4, 4) + tstr("Signature1") + bstr(protected) + bstr(aad) + bstr(payload)


def cose(
    protected: bytes,
    payload: bytes,
    signature: bytes,
    unprotected: bytes = b"\xa0",
    tag: bytes = b"\xd2",
) -> bytes:
    return tag + head(4, 4) + bstr(protected) + unprotected + bstr(payload) + bstr(signature)


def signed(
    payload: bytes,
    *,
    protected: bytes | None = None,
    aad: str = SUBJECT,
    key: PeerKey = KEY,
    unprotected: bytes = b"\xa0",
) -> bytes:
    protected = header() if protected is None else protected
    signature = key.sign(sig_structure(protected, aad.encode(), payload))
    return cose(protected, payload, signature, unprotected)


def sample() -> bytes:
    return seal(KEY, SUBJECT, EVENT)


# -- API -------------------------------------------------------------------------------------


def test_all_lists_the_public_names() -> None:
    public = {
        name
        for name, value in vars(wire).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == wire.__name__
    }
    constants = {"ALG_ED25519", "ALG_EDDSA", "COSE_SIGN1_TAG", "DEFAULT_MAX_SIZE", "MAX_DEPTH"}
    constants |= {"DONE_ENTRY"}
    assert set(wire.__all__) == public | constants | {"SCHEMA_VERSION"}


def test_an_event_signed_elsewhere_is_the_envelope_seal_makes() -> None:
    """``to_sign`` + a signature made by the key's holder + ``assemble``: a browser's key
    signs the bytes the gateway prepared, and readers see what ``seal`` would have written."""
    unsigned = wire.to_sign(KEY.public_bytes, SUBJECT, EVENT)
    envelope = wire.assemble(unsigned.protected, unsigned.payload, KEY.sign(unsigned.data))
    assert envelope == seal(KEY, SUBJECT, EVENT)  # Ed25519 is deterministic
    opened = open_envelope(envelope, SUBJECT)
    assert opened.signer == KEY.peer_id and opened.event == {"v": 2, **EVENT}
    # signed by another key under this kid: refused as any forged envelope is
    forged = wire.assemble(unsigned.protected, unsigned.payload, OTHER.sign(unsigned.data))
    with pytest.raises(BadSignature):
        open_envelope(forged, SUBJECT)
    with pytest.raises(TypeError, match="32-byte"):
        wire.to_sign(b"short", SUBJECT, EVENT)


def test_opened_is_frozen() -> None:
    opened = open_envelope(sample(), SUBJECT)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opened.signer = "x"  # type: ignore[misc]


# -- encode / decode ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "hex_"),
    [
        (0, "00"),
        (23, "17"),
        (24, "1818"),
        (255, "18ff"),
        (256, "190100"),
        (65536, "1a00010000"),
        (2**32, "1b0000000100000000"),
        (2**64 - 1, "1bffffffffffffffff"),
        (-1, "20"),
        (-25, "3818"),
        (-(2**64), "3bffffffffffffffff"),
        (None, "f6"),
        (True, "f5"),
        (False, "f4"),
        ("", "60"),
        ("é", "62c3a9"),
        (b"\x00", "4100"),
        ([], "80"),
        ((1, "a"), "82016161"),
        ({}, "a0"),
        # sorted keys, shortest first (= bytewise order of the encoded text keys)
        ({"bb": 1, "a": 2, "b": 3, "aa": 4}, "a46161026162036261610462626201"),
    ],
)
def test_encode_is_deterministic_cbor(value: object, hex_: str) -> None:
    assert encode(value).hex() == hex_


def test_encode_sorts_long_keys_bytewise() -> None:
    # 23-byte and 24-byte keys straddle the one-byte/two-byte length header
    keys = ["z" * 23, "a" * 24, "b", "y" * 300]
    data = encode(dict.fromkeys(reversed(keys), 0))
    assert data == encode(dict.fromkeys(keys, 0))
    encoded_keys = [tstr(k) for k in keys]
    assert data == head(5, 4) + b"".join(k + b"\x00" for k in sorted(encoded_keys))


def test_encode_accepts_enum_members() -> None:
    class State(enum.StrEnum):
        QUEUED = "queued"

    class Code(enum.IntEnum):
        OK = 7

    assert encode({"s": State.QUEUED, "c": Code.OK}) == encode({"s": "queued", "c": 7})


@pytest.mark.parametrize(
    ("value", "path", "reason"),
    [
        (1.5, r"\$", "float"),
        ({"a": [1, 2.0]}, r"\$\['a'\]\[1\]", "float"),
        ({"a": {"b": {1, 2}}}, r"\$\['a'\]\['b'\]", "set"),
        ({1: "x"}, r"\$", "map key 1 is a int"),
        ({"a": {b"k": 1}}, r"\$\['a'\]", "map key b'k'"),
        ({"t": dt.datetime(2025, 1, 1)}, r"\$\['t'\]", "datetime"),
        ([bytearray(b"x")], r"\$\[0\]", "bytearray"),
        (2**64, r"\$", "64-bit"),
        ([-(2**64) - 1], r"\$\[0\]", "64-bit"),
        (object(), r"\$", "object"),
        (frozenset(), r"\$", "frozenset"),
    ],
)
def test_encode_rejects_what_the_log_does_not_carry(value: object, path: str, reason: str) -> None:
    with pytest.raises(TypeError, match=f"cannot encode {path}: .*{reason}"):
        encode(value)


def test_encode_rejects_deep_nesting_and_cycles() -> None:
    deep: list[Any] = []
    for _ in range(wire.MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(TypeError, match="nesting deeper"):
        encode(deep)
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(TypeError, match="nesting deeper"):
        encode(cycle)


def test_encode_rejects_lone_surrogates() -> None:
    with pytest.raises(TypeError, match="Unicode"):
        encode({"a": "\ud800"})


def test_decode_round_trip_turns_tuples_into_lists() -> None:
    assert decode(encode({"a": (1, (2, b"x")), "b": None})) == {"a": [1, [2, b"x"]], "b": None}


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty"),
        (b"\x01\x02", "trailing byte"),
        (encode({"a": 1}) + b"\x00", "trailing byte after a map"),
        (b"\xf9\x3c\x00", "half float"),
        (b"\xfb" + bytes(8), "double float"),
        (b"\xf7", "undefined"),
        (b"\xf0", "simple value 16"),
        (b"\xf8\xff", "simple value 255"),
        (b"\xff", "lone break"),
        (b"\x1c", "reserved additional info"),
        (b"\x9f\x01\xff", "indefinite array"),
        (b"\xbf\x61a\x01\xff", "indefinite map"),
        (b"\x5f\x41a\xff", "indefinite bytes"),
        (b"\x7f\x61a\xff", "indefinite text"),
        (b"\xa2\x61a\x01\x61a\x02", "duplicate key"),
        (b"\xa1\x01\x02", "int key"),
        (b"\xa1\x41a\x02", "bytes key"),
        (b"\xa1\x80\x02", "array key"),
        (b"\x62\xff\xfe", "invalid UTF-8"),
        (b"\x63\xed\xa0\x80", "encoded surrogate"),
        (b"\x9b" + b"\xff" * 8, "array of 2**64-1 items"),
        (b"\x9b\x00\x00\x00\x01\x00\x00\x00\x00", "array of 2**32 items"),
        (b"\xbb\x00\x00\x00\x01\x00\x00\x00\x00", "map of 2**32 pairs"),
        (b"\x5b" + b"\x7f" + b"\xff" * 7, "byte string of 2**63 bytes"),
        (b"\x7b\x00\x00\x00\x01\x00\x00\x00\x00" + b"a" * 100, "text of 2**32 bytes"),
        (b"\x9a\x10\x00\x00\x00" + b"\x80" * 10_000, "array of 2**28 empty arrays"),
        (b"\x81" * 10_000 + b"\x00", "nesting 10000 deep"),
        (b"\xa1\x61a" * 1000 + b"\x00", "maps nested 1000 deep"),
        (b"\x81" * (wire.MAX_DEPTH + 1) + b"\x00", "nesting just over the limit"),
    ],
)
def test_decode_rejects(data: bytes, why: str) -> None:
    with pytest.raises(MalformedEnvelope):
        decode(data)


def test_decode_accepts_nesting_up_to_the_limit() -> None:
    value: list[Any] = []
    for _ in range(wire.MAX_DEPTH - 1):
        value = [value]
    assert decode(encode(value)) == value


def tagged(tag: int, content: bytes) -> bytes:
    return head(6, tag) + content


@pytest.mark.parametrize(
    "tag", [0, 1, 2, 3, 4, 5, 18, 21, 24, 25, 28, 29, 30, 32, 35, 36, 37, 52, 54, 100]
)
@pytest.mark.parametrize("content", [b"\x00", b"\x61a", b"\x41a", b"\x82\x00\x01", b"\xa0"])
def test_decode_rejects_every_tag(tag: int, content: bytes) -> None:
    with pytest.raises(MalformedEnvelope):
        decode(tagged(tag, content))
    with pytest.raises(MalformedEnvelope):
        decode(b"\xa1\x61a" + tagged(tag, content))


@pytest.mark.parametrize("tag", [256, 258, 260, 261, 1004, 43000, 55799, 2**16, 2**32, 2**64 - 1])
def test_decode_rejects_large_tags(tag: int) -> None:
    with pytest.raises(MalformedEnvelope):
        decode(b"\x81" + tagged(tag, b"\x80"))


def test_decode_rejects_shared_reference_cycles() -> None:
    # 28(shareable [29(sharedref 0)]): a list that contains itself
    with pytest.raises(MalformedEnvelope):
        decode(tagged(28, b"\x81" + tagged(29, b"\x00")))


def test_no_builtin_cbor2_decoder_runs() -> None:
    """Every tag the installed cbor2 decodes itself is overridden, so its decoder never runs.

    Probes cbor2 through the module under test (``wire.cbor2``): tags that do not reach the
    tag hook have a built-in decoder, and each of those must be in the override list.
    """
    cbor2 = getattr(wire, "cbor2")  # noqa: B009 (the test must not import cbor2 itself)
    reached: list[int] = []

    def hook(tag: Any, immutable: bool) -> None:
        reached.append(tag.tag)

    builtin = []
    for tag in range(70_000):
        reached.clear()
        with contextlib.suppress(Exception):
            cbor2.loads(tagged(tag, b"\x00"), tag_hook=hook)
        if not reached:
            builtin.append(tag)
    assert set(builtin) <= set(wire._CBOR2_SEMANTIC_TAGS)


def test_decode_size_limit() -> None:
    data = encode({"blob": bytes(1000)})
    assert decode(data, max_size=len(data)) == {"blob": bytes(1000)}
    with pytest.raises(EnvelopeTooLarge, match="over the 1000-byte limit"):
        decode(data, max_size=1000)
    with pytest.raises(EnvelopeTooLarge):
        decode(bytes(wire.DEFAULT_MAX_SIZE + 1))


# -- envelopes -------------------------------------------------------------------------------


def test_round_trip() -> None:
    opened = open_envelope(sample(), SUBJECT)
    assert opened == Opened(
        signer=KEY.peer_id, event={**EVENT, "v": wire.SCHEMA_VERSION}, protected_sub=SUBJECT
    )


def test_seal_matches_the_spec_byte_for_byte() -> None:
    payload = encode({**EVENT, "v": wire.SCHEMA_VERSION})
    assert sample() == signed(payload)  # Ed25519 signatures are deterministic


def test_seal_is_deterministic_whatever_the_dict_order() -> None:
    reordered = dict(reversed(list(EVENT.items())))
    reordered["meta"] = dict(reversed(list(EVENT["meta"].items())))
    assert list(reordered) != list(EVENT)
    assert seal(KEY, SUBJECT, reordered) == sample()


def test_seal_keeps_a_given_version_and_does_not_touch_the_event() -> None:
    event = {"type": "x", "v": 2}
    opened = open_envelope(seal(KEY, SUBJECT, event), SUBJECT)
    assert opened.event == {"type": "x", "v": 2}
    assert event == {"type": "x", "v": 2}
    plain = {"type": "x"}
    seal(KEY, SUBJECT, plain)
    assert plain == {"type": "x"}


@pytest.mark.parametrize("v", ["1", 1.0, True, None])
def test_seal_refuses_a_non_int_version(v: object) -> None:
    with pytest.raises(TypeError, match="'v'"):
        seal(KEY, SUBJECT, {"v": v})


def test_seal_refuses_floats() -> None:
    with pytest.raises(TypeError, match=r"\$\['cpu'\]: float"):
        seal(KEY, SUBJECT, {"cpu": 0.5})


def test_unknown_keys_are_kept() -> None:
    event = {"type": "started", "from_the_future": {"x": [1, 2]}}
    assert open_envelope(seal(KEY, SUBJECT, event), SUBJECT).event == {
        **event,
        "v": wire.SCHEMA_VERSION,
    }


def test_unknown_protected_header_params_are_ignored() -> None:
    protected = head(5, 4) + cint(1) + cint(-19) + cint(4) + bstr(KEY.public_bytes)
    protected += cint(99) + tstr("future") + tstr("sub") + tstr(SUBJECT)
    opened = open_envelope(signed(encode({"v": 1}), protected=protected), SUBJECT)
    assert opened.signer == KEY.peer_id


def test_wrong_subject() -> None:
    with pytest.raises(WrongSubject, match=re.escape(f"signed for subject {SUBJECT!r}")) as e:
        open_envelope(sample(), "asman.q.gpu-a100.job.ffff")
    assert e.value.subject == "asman.q.gpu-a100.job.ffff"


def test_subject_is_bound_by_the_aad_too() -> None:
    # header says the right subject, but the signature was made for another one
    data = signed(encode({"v": 1}), aad="asman.q.other.job.1")
    with pytest.raises(BadSignature):
        open_envelope(data, SUBJECT)


def test_forged_signature_with_the_victims_kid() -> None:
    # OTHER signs, claiming to be KEY
    data = signed(encode({"v": 1, "type": "finished"}), key=OTHER)
    with pytest.raises(BadSignature, match=KEY.peer_id):
        open_envelope(data, SUBJECT)


def test_payload_swapped_under_a_valid_signature() -> None:
    protected = header()
    signature = KEY.sign(sig_structure(protected, SUBJECT.encode(), encode({"v": 1, "n": 1})))
    with pytest.raises(BadSignature):
        open_envelope(cose(protected, encode({"v": 1, "n": 2}), signature), SUBJECT)


def test_eddsa_alg_is_accepted() -> None:
    data = signed(encode({"v": 1, "a": 1}), protected=header(alg=-8))
    assert open_envelope(data, SUBJECT).event == {"v": 1, "a": 1}


@pytest.mark.parametrize("alg", [-7, -35, -20, 0, 1, -18, -9, 8, 19])
def test_other_algs_are_rejected(alg: int) -> None:
    data = signed(encode({"v": 1}), protected=header(alg=alg))
    with pytest.raises(MalformedEnvelope, match=f"alg {alg} is not supported"):
        open_envelope(data, SUBJECT)


@pytest.mark.parametrize(
    ("protected", "match"),
    [
        (b"", "protected header"),
        (b"\xa0", "alg"),
        (head(5, 2) + cint(4) + bstr(KEY.public_bytes) + tstr("sub") + tstr(SUBJECT), "alg"),
        (
            head(5, 3)
            + cint(1)
            + tstr("EdDSA")
            + cint(4)
            + bstr(KEY.public_bytes)
            + tstr("sub")
            + tstr(SUBJECT),
            "alg",
        ),
        (head(5, 2) + cint(1) + cint(-19) + tstr("sub") + tstr(SUBJECT), "kid"),
        (head(5, 2) + cint(1) + cint(-19) + cint(4) + bstr(KEY.public_bytes), "'sub'"),
        (header(kid=KEY.public_bytes[:31]), "kid is 31 bytes"),
        (header(kid=KEY.public_bytes + b"\x00"), "kid is 33 bytes"),
        (
            head(5, 4)
            + cint(1)
            + cint(-19)
            + cint(2)
            + b"\x81\x63abc"
            + cint(4)
            + bstr(KEY.public_bytes)
            + tstr("sub")
            + tstr(SUBJECT),
            "critical",
        ),
        (b"\x82\x01\x02", "not a map"),
        (header() + b"\x00", "trailing"),
        (b"\xa1\x01\xfb" + bytes(8), "protected header"),
        (bytes(5000), "over 4096 bytes"),
    ],
)
def test_bad_protected_headers(protected: bytes, match: str) -> None:
    with pytest.raises(MalformedEnvelope, match=match):
        open_envelope(signed(encode({"v": 1}), protected=protected), SUBJECT)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "not CBOR"),
        (b"\x00", "COSE_Sign1"),
        (head(4, 4) + bstr(header()) + b"\xa0" + bstr(b"\xa0") + bstr(bytes(64)), "COSE_Sign1"),
        (
            b"\xd3" + head(4, 4) + bstr(header()) + b"\xa0" + bstr(b"\xa0") + bstr(bytes(64)),
            "tag 19",
        ),
        (b"\xd2\x83" + bstr(header()) + b"\xa0" + bstr(b"\xa0"), "4 items"),
        (
            b"\xd2\x85" + bstr(header()) + b"\xa0" + bstr(b"\xa0") + bstr(bytes(64)) + b"\xa0",
            "4 items",
        ),
        (b"\xd2\xa0", "4 items"),
        (cose(header(), b"\xa0", bytes(64), unprotected=b"\xa1\x04\x41a"), "map key"),
        (cose(header(), b"\xa0", bytes(64), unprotected=b"\x80"), "unprotected"),
        (cose(header(), b"\xa0", bytes(64), unprotected=b"\xa1\x61a\xd2\x80"), "unprotected"),
        (b"\xd2\x84" + tstr("x") + b"\xa0" + bstr(b"\xa0") + bstr(bytes(64)), "protected"),
        (b"\xd2\x84" + bstr(header()) + b"\xa0\xf6" + bstr(bytes(64)), "payload"),
        (b"\xd2\x84" + bstr(header()) + b"\xa0" + bstr(b"\xa0") + tstr("s"), "signature"),
        (cose(header(), b"\xa0", bytes(63)), "signature"),
        (sample() + b"\x00", "trailing"),
        (b"\xd2\xd2" + sample()[1:], "4 items"),  # 18(18([...]))
        (b"\xd2\x9f" + sample()[2:] + b"\xff", "not CBOR"),
    ],
)
def test_bad_envelope_shapes(data: bytes, match: str) -> None:
    with pytest.raises(MalformedEnvelope, match=match):
        open_envelope(data, SUBJECT)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (encode([1, 2]), "not a map"),
        (encode({"type": "x"}), "'v'"),
        (encode({"v": "1"}), "'v'"),
        (b"\xa1\x61v\xf5", "'v'"),  # {"v": true}
        (b"\xa1\x61v\xfb" + bytes(8), "float"),  # {"v": 0.0}
        (b"\xa2\x61v\x01\x61t" + tagged(1, b"\x00"), "tag"),
        (b"\xa2\x61v\x01\x01\x02", "text string"),  # int key
        (encode({"v": 1}) + b"\x00", "trailing"),
        (b"\xa2\x61v\x01\x61v\x02", "Duplicate"),
        (b"\xa1\x61v", "payload"),
    ],
)
def test_bad_payloads_are_rejected_after_the_signature(payload: bytes, match: str) -> None:
    data = signed(payload)
    with pytest.raises(MalformedEnvelope, match=match):
        open_envelope(data, SUBJECT)
    with pytest.raises(BadSignature):  # the signature is checked before the payload
        open_envelope(signed(payload, key=OTHER), SUBJECT)


def test_size_limit() -> None:
    data = sample()
    assert open_envelope(data, SUBJECT, max_size=len(data)).signer == KEY.peer_id
    with pytest.raises(EnvelopeTooLarge, match="over the") as e:
        open_envelope(data, SUBJECT, max_size=len(data) - 1)
    assert e.value.subject == SUBJECT
    big = seal(KEY, SUBJECT, {"blob": bytes(wire.DEFAULT_MAX_SIZE)})
    with pytest.raises(EnvelopeTooLarge):
        open_envelope(big, SUBJECT)
    # size is checked before anything else
    with pytest.raises(EnvelopeTooLarge):
        open_envelope(b"\xff" * 100, SUBJECT, max_size=99)


def test_every_truncation_is_rejected() -> None:
    data = sample()
    for cut in range(len(data)):
        with pytest.raises((MalformedEnvelope, BadSignature)):
            open_envelope(data[:cut], SUBJECT)


def test_every_bit_flip_is_rejected_or_harmless() -> None:
    data = sample()
    original = open_envelope(data, SUBJECT)
    accepted = 0
    for i in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            try:
                opened = open_envelope(bytes(flipped), SUBJECT)
            except EnvelopeError:
                continue
            accepted += 1
            assert opened == original
    assert accepted == 0


# -- properties ----------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
events = st.dictionaries(st.text(max_size=10).filter(lambda k: k != "v"), values, max_size=8)


@settings(max_examples=200, deadline=None, database=None)
@given(events)
def test_seal_open_round_trip(event: dict[str, Any]) -> None:
    data = seal(KEY, SUBJECT, event)
    assert open_envelope(data, SUBJECT).event == {**event, "v": wire.SCHEMA_VERSION}
    assert seal(KEY, SUBJECT, dict(reversed(list(event.items())))) == data


@settings(max_examples=300, deadline=None, database=None)
@given(values)
def test_encode_decode_round_trip(value: Any) -> None:
    data = encode(value)
    assert decode(data) == value
    assert encode(decode(data)) == data


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=200))
def test_decode_never_raises_anything_else(data: bytes) -> None:
    with contextlib.suppress(MalformedEnvelope):
        decode(data)


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=400))
def test_open_never_raises_anything_else(data: bytes) -> None:
    with contextlib.suppress(EnvelopeError):
        open_envelope(data, SUBJECT)


@pytest.mark.parametrize("size", [0, 1, 23, 24, 255, 256, 65_535, 65_536])
def test_hand_written_structures_are_the_cbor_cbor2_writes(size: int) -> None:
    """The Sig_structure and the envelope are assembled by hand for speed: they must be the
    very bytes of the deterministic CBOR encoder, at every length boundary of a byte string."""
    cbor2 = getattr(wire, "cbor2")  # noqa: B009 (the test must not import cbor2 itself)
    key = PeerKey.generate()
    subject = "asman.job.q." + "s" * (size % 200 + 1)
    event = {"type": "note", "blob": b"\x07" * size}
    envelope = seal(key, subject, event)
    item = cbor2.loads(envelope)
    protected, unprotected, payload, _signature = item.value
    assert item.tag == 18 and unprotected == {}
    assert envelope == cbor2.dumps(cbor2.CBORTag(18, item.value), canonical=True)
    for parts in ((protected, subject.encode(), payload), (b"", b"", b"x" * size)):
        assert wire._sig_structure(*parts) == cbor2.dumps(["Signature1", *parts])
    assert open_envelope(envelope, subject).event["blob"] == event["blob"]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (wire.waiting_entry(7), wire.Entry("w", 7)),
        (wire.waiting_entry(7, 2**30), wire.Entry("w", 7, memory=2**30)),
        (wire.waiting_entry(7, 0, tagged=True), wire.Entry("w", 7, tagged=True)),
        (wire.waiting_entry(7, 5, tagged=True), wire.Entry("w", 7, memory=5, tagged=True)),
        (b"w 7 5 x", None),  # an unknown flag is junk, not a waiting job
        (b"w 7 t", None),
        (b"w 7 5 t extra", None),
        (b"w 7 " + b"9" * 21, None),
    ],
)
def test_waiting_entries_carry_memory_and_a_tag_flag(data: bytes, expected: object) -> None:
    assert wire.parse_entry(data) == expected
