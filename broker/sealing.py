"""Task tokens at rest: sealed with AES-256-GCM under a key that lives outside the store.

A copy of the database alone (a backup, a stolen replica) yields no usable Vault token. The task id is
bound in as associated data, so a sealed token moved to another task's row does not open.
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.errors import ConfigError, SealBroken
from broker.keyfiles import read_private_file
from broker.vault import Sensitive

_VERSION = b"\x01"


class TokenSealer:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            msg = "the store key must be 32 bytes (AES-256)"
            raise ConfigError(msg)
        self._aead = AESGCM(key)
        self._key = key

    def derive(self, label: bytes) -> bytes:
        """A 32-byte key for another use, the same on every replica sharing the key file (HKDF-SHA256, ``label``
        as info): one file to distribute and rotate, and no derived key opens a sealed token or another label's."""
        return HKDF(algorithm=SHA256(), length=32, salt=None, info=b"broker/" + label).derive(self._key)

    def __repr__(self) -> str:
        return "TokenSealer(<key redacted>)"

    @classmethod
    def from_file(cls, path: Path) -> TokenSealer:
        """Raises: ConfigError: the key file is missing, unreadable, not base64 of 32 bytes, or readable by others."""
        text = read_private_file(path, what="store key file").strip()
        try:
            key = base64.b64decode(text, validate=True)
        except ValueError as exc:
            msg = f"store key file {path} is not base64"
            raise ConfigError(msg) from exc
        return cls(key)

    @staticmethod
    def generate_key_file(path: Path) -> None:
        """Write a fresh random key, readable by the owner only. Never overwrites an existing file."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")

    def seal(self, token: Sensitive, *, task_id: str) -> bytes:
        nonce = secrets.token_bytes(12)
        return _VERSION + nonce + self._aead.encrypt(nonce, token.reveal().encode(), task_id.encode())

    def open(self, blob: bytes, *, task_id: str) -> Sensitive:
        """Raises: SealBroken: wrong key, wrong task, or altered ciphertext."""
        if blob[:1] != _VERSION or len(blob) < 29:
            raise SealBroken(reason=f"sealed token of task {task_id} has an unknown format")
        try:
            plain = self._aead.decrypt(blob[1:13], blob[13:], task_id.encode())
        except InvalidTag as exc:
            raise SealBroken(reason=f"sealed token of task {task_id} does not open with this key") from exc
        return Sensitive(plain.decode())
