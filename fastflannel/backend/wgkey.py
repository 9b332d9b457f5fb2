# SPDX-License-Identifier: Apache-2.0
"""WireGuard keys: Curve25519 key pairs and the private key file (flannel ``pkg/backend/wireguard/wireguard.go``).

The only module that imports ``cryptography`` (its X25519 is OpenSSL's, well kept and constant-time; hand-writing
Curve25519 or shelling out to ``wg genkey``/``wg pubkey`` would be worse). Keys travel as WireGuard's text form:
standard base64 of 32 bytes (44 characters ending in ``=``), as ``wg genkey`` prints and as Flannel puts
``PublicKey`` in the lease.

The key file is Flannel's: ``$WIREGUARD_KEY_FILE`` or ``/run/flannel/wgkey``. Missing: a new key is generated,
the directory made (0755), the file created 0400 (``O_EXCL``: two starts never write two keys) holding the
base64 key without a newline. Present: it is read and parsed, so the public key survives restarts as long as the
file does. Better than Flannel: surrounding whitespace is accepted (``wg genkey > wgkey`` writes a newline) and a
bad file names itself and what to do.
"""
from __future__ import annotations

import base64
import binascii
import os
from typing import Mapping, Optional

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from fastflannel.errors import BackendError

KEY_LEN = 32
DEFAULT_KEY_FILE = "/run/flannel/wgkey"
KEY_FILE_ENV = "WIREGUARD_KEY_FILE"


class WgKeyError(BackendError):
    """A key (file, lease field or config value) is not a WireGuard key."""


def parse_key(text: str, what: str) -> bytes:
    """Return the 32 raw bytes of base64 key ``text``; raise ``WgKeyError`` naming ``what``."""
    if not isinstance(text, str):
        raise WgKeyError(f"{what}: a WireGuard key must be a base64 string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise WgKeyError(f"{what}: {text[:60]!r} is not base64") from None
    if len(raw) != KEY_LEN:
        raise WgKeyError(f"{what}: key is {len(raw)} bytes, a WireGuard key is {KEY_LEN} (as from wg genkey)")
    return raw


def encode_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def generate_private_key() -> str:
    """Return a new private key, clamped as ``wg genkey`` does (RFC 7748)."""
    raw = bytearray(X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return encode_key(bytes(raw))


def public_key(private_key: str) -> str:
    """Return the public key of base64 ``private_key`` (``wg pubkey``)."""
    priv = X25519PrivateKey.from_private_bytes(parse_key(private_key, "private key"))
    return encode_key(priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def key_file_path(env: Optional[Mapping[str, str]] = None) -> str:
    """Return ``$WIREGUARD_KEY_FILE`` or Flannel's default ``/run/flannel/wgkey``."""
    env = os.environ if env is None else env
    return env.get(KEY_FILE_ENV) or DEFAULT_KEY_FILE


def load_or_create_private_key(path: str) -> "tuple[str, bool]":
    """Return (base64 private key, created). Read ``path`` if it exists; else create it 0400 with a new key."""
    try:
        with open(path, "r", encoding="ascii", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        text = None
    except OSError as e:
        raise WgKeyError(f"could not read private key file {path}: {e.strerror}") from None
    if text is not None:
        try:
            parse_key(text, f"could not parse private key from file {path}")
        except WgKeyError as e:
            raise WgKeyError(f"{e}; fix it or delete it to generate a new key (peers then learn the new public "
                            f"key from the lease)") from None
        return text.strip(), False
    key = generate_private_key()
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    except FileExistsError:  # another process won the race: use its key
        return load_or_create_private_key(path)
    except OSError as e:
        raise WgKeyError(f"could not create private key file {path}: {e.strerror}; set {KEY_FILE_ENV} to a "
                        f"writable path") from None
    try:
        os.fchmod(fd, 0o400)  # the umask may have removed bits, never added any: make it exactly 0400
        os.write(fd, key.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return key, True
