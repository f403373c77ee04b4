"""Signed checkpoints of the audit chain: Ed25519 keys and the checkpoint note format.

A checkpoint commits to the chain's head: how many records there are and the hash of the last one.
Its text is modelled on C2SP ``tlog-checkpoint`` (a signed note)::

    <origin>\\n
    <size>\\n
    <base64 head hash>\\n
    <unix time>\\n
    \\n
    — <origin> <base64(key id (4 bytes) || Ed25519 signature (64 bytes))>\\n

The signature covers the body: the four lines before the blank line, each with its newline, as UTF-8.
The key id is the first 4 bytes of SHA-256 over the raw 32-byte public key; it names the key, it proves
nothing (the signature does). Unlike C2SP, the head is the hash-chain head of ``broker.audit``, not a
Merkle root, and a fourth line carries the signing time.

Rules this file keeps: everything here is pure (bytes and strings in, values out) except the three key
file functions at the top; every check *raises* ``CheckpointInvalid`` and never returns a bool, so a
caller cannot forget to look at the answer.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from broker.errors import CheckpointInvalid, ConfigError
from broker.keyfiles import read_private_file

__all__ = [
    "Checkpoint", "checkpoint_body", "generate_signing_key_file", "key_id",
    "load_public_key", "load_signing_key", "parse_checkpoint", "parse_notes", "public_key_pem",
    "sign_checkpoint", "verify_checkpoint",
]

_SIG_PREFIX = "\u2014 "  # an em dash and a space, as in C2SP signed notes
_KEY_ID_LEN = 4
_SIG_LEN = 64
_MAX_NOTE = 4096


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint claims: ``size`` records, the last one hashing to ``head``, at ``time``.

    ``note`` is the signed text it came from ("" for one not signed yet). Where the claim and the note
    can disagree (a store row has both), the verifier checks that they do not.
    """

    origin: str
    size: int
    head: bytes
    time: int
    note: str = ""


# -- keys (the only I/O in this module) -------------------------------------------------------------


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read an unencrypted PKCS#8 PEM Ed25519 private key.

    Raises:
        ConfigError: the file is missing or unreadable, readable by group or others, or not an Ed25519 key.
    """
    data = read_private_file(path, what="checkpoint signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        msg = f"checkpoint signing key {path} is not an unencrypted PKCS#8 PEM private key"
        raise ConfigError(msg) from exc
    if not isinstance(key, Ed25519PrivateKey):
        msg = f"checkpoint signing key {path} is not an Ed25519 key"
        raise ConfigError(msg)
    return key


def generate_signing_key_file(path: Path) -> Ed25519PrivateKey:
    """Write a fresh Ed25519 key as PKCS#8 PEM, mode 0600, and return it.

    Raises:
        FileExistsError: the file exists; a signing key is never overwritten (old checkpoints would no
            longer verify under the published public key).
    """
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def load_public_key(data: bytes) -> Ed25519PublicKey:
    """Parse a PEM SubjectPublicKeyInfo Ed25519 public key (what :func:`public_key_pem` writes).

    Raises:
        ConfigError: not a PEM public key, or not Ed25519.
    """
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        msg = "the checkpoint public key is not a PEM public key"
        raise ConfigError(msg) from exc
    if not isinstance(key, Ed25519PublicKey):
        msg = "the checkpoint public key is not an Ed25519 key"
        raise ConfigError(msg)
    return key


def public_key_pem(key: Ed25519PublicKey) -> str:
    """The public key as PEM SubjectPublicKeyInfo, for auditors."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def key_id(key: Ed25519PublicKey) -> bytes:
    """First 4 bytes of SHA-256 over the raw public key (``.hex()`` it for display)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:_KEY_ID_LEN]


# -- the note -----------------------------------------------------------------------------------------


def checkpoint_body(cp: Checkpoint) -> str:
    """The signed part of a checkpoint: origin, size, base64 head, time; one per line.

    Raises:
        CheckpointInvalid: an origin that is empty or holds whitespace, a negative size or time, or a head
            that is not 32 bytes.
    """
    if not cp.origin or any(c.isspace() for c in cp.origin):
        msg = "a checkpoint origin must be non-empty and without whitespace"
        raise CheckpointInvalid(msg)
    if cp.size < 0 or cp.time < 0 or len(cp.head) != 32:
        msg = "a checkpoint needs a size and a time >= 0 and a 32-byte head"
        raise CheckpointInvalid(msg)
    return f"{cp.origin}\n{cp.size}\n{base64.b64encode(cp.head).decode()}\n{cp.time}\n"


def sign_checkpoint(cp: Checkpoint, key: Ed25519PrivateKey) -> Checkpoint:
    """The same checkpoint with ``note`` set to its signed text.

    Raises:
        CheckpointInvalid: see :func:`checkpoint_body`.
    """
    body = checkpoint_body(cp)
    sig = key.sign(body.encode())
    line = f"{_SIG_PREFIX}{cp.origin} {base64.b64encode(key_id(key.public_key()) + sig).decode()}\n"
    return Checkpoint(cp.origin, cp.size, cp.head, cp.time, body + "\n" + line)


def parse_checkpoint(note: str) -> Checkpoint:
    """Read a checkpoint's claims from its text, without checking the signature.

    Raises:
        CheckpointInvalid: the text is not a checkpoint in the format above.
    """
    body, _sigs = _split(note)
    lines = body.split("\n")[:-1]
    if len(lines) != 4:
        msg = "a checkpoint body has four lines: origin, size, head, time"
        raise CheckpointInvalid(msg)
    origin, size, head_b64, time_s = lines
    if not (size.isdigit() and time_s.isdigit()) or (size != "0" and size.startswith("0")):
        msg = "checkpoint size and time must be decimal integers"
        raise CheckpointInvalid(msg)
    try:
        head = base64.b64decode(head_b64, validate=True)
    except binascii.Error as exc:
        msg = "the checkpoint head is not base64"
        raise CheckpointInvalid(msg) from exc
    cp = Checkpoint(origin, int(size), head, int(time_s), note)
    if checkpoint_body(cp) != body:  # also rejects a non-canonical base64 or an origin with spaces
        msg = "the checkpoint body is not in canonical form"
        raise CheckpointInvalid(msg)
    return cp


def verify_checkpoint(note: str, key: Ed25519PublicKey, *, origin: str | None = None) -> Checkpoint:
    """Check a checkpoint's signature by ``key`` and return what it claims.

    Only a signature line that names the checkpoint's origin and carries ``key``'s id counts; lines by
    other keys (co-signers, witnesses) are ignored, as in C2SP signed notes.

    Raises:
        CheckpointInvalid: malformed, another origin than ``origin``, no signature by ``key``, or a
            signature that does not verify over the body.
    """
    cp = parse_checkpoint(note)
    if origin is not None and cp.origin != origin:
        msg = f"checkpoint of origin {cp.origin!r}, expected {origin!r}"
        raise CheckpointInvalid(msg)
    body, sigs = _split(note)
    kid = key_id(key)
    for line in sigs:
        name, _, blob_b64 = line[len(_SIG_PREFIX):].partition(" ")
        try:
            blob = base64.b64decode(blob_b64, validate=True)
        except binascii.Error as exc:
            msg = "a checkpoint signature is not base64"
            raise CheckpointInvalid(msg) from exc
        if name != cp.origin or blob[:_KEY_ID_LEN] != kid:
            continue
        if len(blob) != _KEY_ID_LEN + _SIG_LEN:
            msg = "a checkpoint signature has the wrong length"
            raise CheckpointInvalid(msg)
        try:
            key.verify(blob[_KEY_ID_LEN:], body.encode())
        except InvalidSignature as exc:
            msg = f"the signature of checkpoint {cp.size} does not verify"
            raise CheckpointInvalid(msg) from exc
        return cp
    msg = f"checkpoint {cp.size} carries no signature by key {kid.hex()}"
    raise CheckpointInvalid(msg)


def parse_notes(text: str) -> list[str]:
    """Split a witness file (notes one after another, each followed by a blank line) into notes.

    Raises:
        CheckpointInvalid: text that is not a sequence of complete notes (a torn last write included:
            the witness is evidence, and a damaged witness is reported, not skipped).
    """
    notes: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        if lines[i] == "" and i == len(lines) - 1:
            break
        if lines[i] == "":
            i += 1
            continue
        j = i + 5  # four body lines and the blank line
        if j >= len(lines) or lines[i + 4] != "" or not lines[j].startswith(_SIG_PREFIX):
            msg = f"the witness text is not a sequence of checkpoints (line {i + 1})"
            raise CheckpointInvalid(msg)
        while j < len(lines) and lines[j].startswith(_SIG_PREFIX):
            j += 1
        if j >= len(lines):  # the last signature line has no newline: a torn write
            msg = "the witness text ends in the middle of a checkpoint"
            raise CheckpointInvalid(msg)
        notes.append("\n".join(lines[i:j]) + "\n")
        i = j
    return notes


def _split(note: str) -> tuple[str, list[str]]:
    """Body (with its final newline) and the signature lines (without newlines).

    Raises:
        CheckpointInvalid: oversized, no blank line, no signature line, or a malformed signature line.
    """
    if len(note) > _MAX_NOTE or not note.endswith("\n"):
        msg = "a checkpoint note is at most 4 KiB and ends with a newline"
        raise CheckpointInvalid(msg)
    body, sep, rest = note.partition("\n\n")
    if not sep:
        msg = "a checkpoint note has a blank line between its body and its signatures"
        raise CheckpointInvalid(msg)
    sigs = rest[:-1].split("\n")
    if not sigs or any(not s.startswith(_SIG_PREFIX) or s.count(" ") != 2 for s in sigs):
        msg = "a checkpoint note ends with one or more signature lines"
        raise CheckpointInvalid(msg)
    return body + "\n", sigs
