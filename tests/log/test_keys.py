"""Peer keys: identity, signatures, and key files (mode 0600, atomic, refused when too open)."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from asman.errors import InvalidInput, KeyFileError
from asman.log import keys
from asman.log.keys import (
    PeerKey,
    default_key_path,
    peer_id_from_bytes,
    peer_id_to_bytes,
    verify,
)

# RFC 8032 §7.1, TEST 1
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_SIG_EMPTY = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
    "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_all_lists_the_public_names() -> None:
    public = {
        name
        for name, value in vars(keys).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == keys.__name__
    }
    public |= {"PUBLIC_KEY_SIZE", "SIGNATURE_SIZE"}
    assert set(keys.__all__) == public


def test_rfc8032_vector() -> None:
    key = PeerKey.from_seed(RFC8032_SEED)
    assert key.public_bytes == RFC8032_PUBLIC
    assert key.peer_id == RFC8032_PUBLIC.hex()
    assert key.sign(b"") == RFC8032_SIG_EMPTY
    assert verify(key.peer_id, RFC8032_SIG_EMPTY, b"")
    assert verify(RFC8032_PUBLIC, RFC8032_SIG_EMPTY, b"")


def test_generate_gives_a_hex_peer_id() -> None:
    key = PeerKey.generate()
    assert len(key.public_bytes) == 32
    assert len(key.peer_id) == 64
    assert key.peer_id == key.peer_id.lower()
    assert peer_id_to_bytes(key.peer_id) == key.public_bytes
    assert peer_id_from_bytes(key.public_bytes) == key.peer_id
    assert PeerKey.generate().peer_id != key.peer_id


def test_verify_says_no_to_anything_wrong() -> None:
    key = PeerKey.generate()
    sig = key.sign(b"data")
    assert verify(key.peer_id, sig, b"data")
    assert not verify(key.peer_id, sig, b"datA")
    assert not verify(key.peer_id, sig[:-1] + bytes([sig[-1] ^ 1]), b"data")
    assert not verify(PeerKey.generate().peer_id, sig, b"data")
    assert not verify(key.peer_id, sig[:63], b"data")
    assert not verify(key.peer_id.upper(), sig, b"data")
    assert not verify("nothex", sig, b"data")
    assert not verify(key.public_bytes[:31], sig, b"data")


@pytest.mark.parametrize(
    "bad", ["", "ab", "g" * 64, "A" * 64, "a" * 63, "a" * 65, " " + "a" * 63, "é" * 64]
)
def test_peer_id_to_bytes_validates(bad: str) -> None:
    with pytest.raises(InvalidInput, match="peer id"):
        peer_id_to_bytes(bad)


@pytest.mark.parametrize("bad", [b"", b"\x00" * 31, b"\x00" * 33])
def test_peer_id_from_bytes_validates(bad: bytes) -> None:
    with pytest.raises(InvalidInput, match="32 raw bytes"):
        peer_id_from_bytes(bad)


def test_from_seed_validates() -> None:
    with pytest.raises(InvalidInput, match="32 bytes"):
        PeerKey.from_seed(b"\x00" * 31)


def test_peer_key_is_immutable_and_hides_its_secret() -> None:
    key = PeerKey.from_seed(RFC8032_SEED)
    with pytest.raises(AttributeError):
        key._private = None  # type: ignore[assignment]
    assert RFC8032_SEED.hex() not in repr(key)
    assert key.peer_id in repr(key)
    assert key == PeerKey.from_seed(RFC8032_SEED)
    assert hash(key) == hash(PeerKey.from_seed(RFC8032_SEED))
    assert key != PeerKey.generate()


def test_default_key_path(tmp_path: Path) -> None:
    assert default_key_path(tmp_path) == tmp_path / "peer.key"


# -- files -------------------------------------------------------------------------------


def test_save_writes_pem_0600_in_a_0700_dir(tmp_path: Path) -> None:
    path = tmp_path / "config" / "asman" / "peer.key"
    key = PeerKey.generate()
    key.save(path)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert sorted(p.name for p in path.parent.iterdir()) == ["peer.key"]  # no temp file left
    assert PeerKey.load(path) == key
    assert PeerKey.load(str(path)).peer_id == key.peer_id


def test_save_leaves_an_existing_dir_mode_alone(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    PeerKey.generate().save(tmp_path / "peer.key")
    assert mode(tmp_path) == 0o755


def test_save_refuses_to_replace_a_key_unless_told(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    first = PeerKey.generate()
    first.save(path)
    second = PeerKey.generate()
    with pytest.raises(KeyFileError, match="already exists") as info:
        second.save(path)
    assert info.value.path == str(path)
    assert PeerKey.load(path) == first
    second.save(path, overwrite=True)
    assert PeerKey.load(path) == second
    assert mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["peer.key"]


@pytest.mark.parametrize("too_open", [0o644, 0o640, 0o604, 0o660, 0o606, 0o601])
def test_load_refuses_a_file_others_can_access(tmp_path: Path, too_open: int) -> None:
    path = tmp_path / "peer.key"
    PeerKey.generate().save(path)
    path.chmod(too_open)
    with pytest.raises(KeyFileError, match=f"chmod 600 {path}") as info:
        PeerKey.load(path)
    assert info.value.path == str(path)
    assert f"{too_open:04o}" in str(info.value)


def test_load_accepts_0400(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    key = PeerKey.generate()
    key.save(path)
    path.chmod(0o400)
    assert PeerKey.load(path) == key


def test_load_follows_a_symlink(tmp_path: Path) -> None:
    # Kubernetes mounts secrets as symlinks; the target's mode is what counts.
    target = tmp_path / "data" / "peer.key"
    key = PeerKey.generate()
    key.save(target)
    link = tmp_path / "peer.key"
    link.symlink_to(target)
    assert PeerKey.load(link) == key


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.key"
    with pytest.raises(KeyFileError, match="no such file") as info:
        PeerKey.load(path)
    assert info.value.path == str(path)


def test_load_directory(tmp_path: Path) -> None:
    path = tmp_path / "dir.key"
    path.mkdir(mode=0o700)
    with pytest.raises(KeyFileError):
        PeerKey.load(path)


def write_0600(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage\n",
        b"\x00\xff" * 100,
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        RFC8032_SEED,
        b"x" * 100_000,
    ],
)
def test_load_garbage(tmp_path: Path, data: bytes) -> None:
    path = write_0600(tmp_path / "peer.key", data)
    with pytest.raises(KeyFileError) as info:
        PeerKey.load(path)
    assert info.value.path == str(path)


def test_load_refuses_another_key_type(tmp_path: Path) -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = write_0600(tmp_path / "peer.key", pem)
    with pytest.raises(KeyFileError, match="not an Ed25519 private key"):
        PeerKey.load(path)


def test_load_refuses_an_encrypted_key(tmp_path: Path) -> None:
    key = PeerKey.generate()
    pem = key._private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    path = write_0600(tmp_path / "peer.key", pem)
    with pytest.raises(KeyFileError, match="unencrypted"):
        PeerKey.load(path)


def test_load_unopenable(tmp_path: Path) -> None:
    """An OS error on open (here: a path through a regular file) is a KeyFileError that says
    so. (Permission bits cannot be tested: the tests run as root, who reads any file.)"""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(KeyFileError, match="cannot open it"):
        PeerKey.load(blocker / "peer.key")


def test_load_or_create_twice_gives_the_same_peer(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "peer.key"
    first = PeerKey.load_or_create(path)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert PeerKey.load_or_create(path).peer_id == first.peer_id


def test_load_or_create_refuses_an_open_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    PeerKey.generate().save(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        PeerKey.load_or_create(path)


def test_load_or_create_races_to_one_key(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    barrier = threading.Barrier(8)
    results: list[str] = []
    errors: list[BaseException] = []

    def create() -> None:
        barrier.wait()
        try:
            results.append(PeerKey.load_or_create(path).peer_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 8
    assert set(results) == {PeerKey.load(path).peer_id}
    assert [p.name for p in tmp_path.iterdir()] == ["peer.key"]
