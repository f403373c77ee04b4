"""Signed checkpoints: the note format pinned, signatures that verify only for the right key and text."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.signing import (
    Checkpoint,
    checkpoint_body,
    generate_signing_key_file,
    key_id,
    load_public_key,
    load_signing_key,
    parse_checkpoint,
    parse_notes,
    public_key_pem,
    sign_checkpoint,
    verify_checkpoint,
)
from broker.errors import CheckpointInvalid, ConfigError

# A fixed test key (seed 0..31), so the golden signature below is reproducible. Not a real key.
SEED = bytes(range(32))
KEY = Ed25519PrivateKey.from_private_bytes(SEED)
HEAD = hashlib.sha256(b"head").digest()
CP = Checkpoint("agent-broker", 10050, HEAD, 1795877399)


class TestFormat:
    def test_body_golden(self) -> None:
        """The signed body is origin, size, base64 head, time: one per line."""
        assert checkpoint_body(CP) == (
            "agent-broker\n10050\n" + base64.b64encode(HEAD).decode() + "\n1795877399\n"
        )

    def test_note_golden(self) -> None:
        """The note is body, blank line, and one em-dash signature line with key id || signature."""
        note = sign_checkpoint(CP, KEY).note
        body, sig_line = note.split("\n\n")
        assert body + "\n" == checkpoint_body(CP)
        assert sig_line.startswith("\u2014 agent-broker ") and sig_line.endswith("\n")
        blob = base64.b64decode(sig_line.split(" ")[2])
        raw = KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert blob[:4] == hashlib.sha256(raw).digest()[:4] == key_id(KEY.public_key())
        assert len(blob) == 68
        # Ed25519 is deterministic: the whole note is pinned.
        assert note == (
            "agent-broker\n10050\nny5tM6NxfugmNTpAS6RhjRrutoea15Nrzo7V9GgUkk0=\n1795877399\n\n"
            "\u2014 agent-broker VkdapxFB6gEM56HB2ydjkvyVFyg8fuT7vdh5JUdAtWRtSeQf8eMi8km2AZjy3cGB+LJQDYstSjv2rhh86zM6QpCP"
            "dgM=\n"
        )
        KEY.public_key().verify(blob[4:], checkpoint_body(CP).encode())

    def test_parse_round_trip(self) -> None:
        """Parsing a signed note gives back the checkpoint it was made from."""
        signed = sign_checkpoint(CP, KEY)
        assert parse_checkpoint(signed.note) == signed

    @pytest.mark.parametrize("note", [
        "", "agent-broker\n1\n", "agent-broker\n01\nAAAA\n1\n\n\u2014 agent-broker AAAA\n",
        "agent broker\n1\n" + base64.b64encode(HEAD).decode() + "\n1\n\n\u2014 x AAAA\n",
        "agent-broker\n1\n" + base64.b64encode(HEAD).decode() + "\n1\n\nnot a signature\n",
        "agent-broker\n-1\n" + base64.b64encode(HEAD).decode() + "\n1\n\n\u2014 agent-broker AAAA\n",
    ])
    def test_malformed_rejected(self, note: str) -> None:
        """Anything not exactly in the format raises CheckpointInvalid."""
        with pytest.raises(CheckpointInvalid):
            parse_checkpoint(note)


class TestSignAndVerify:
    def test_verifies_with_its_key(self) -> None:
        """A note verifies under its key and returns its claims."""
        assert verify_checkpoint(sign_checkpoint(CP, KEY).note, KEY.public_key(), origin="agent-broker") == \
            sign_checkpoint(CP, KEY)

    def test_wrong_key(self) -> None:
        """A note signed by another key carries no signature by this one."""
        other = Ed25519PrivateKey.generate()
        with pytest.raises(CheckpointInvalid, match="no signature by key"):
            verify_checkpoint(sign_checkpoint(CP, other).note, KEY.public_key())

    def test_wrong_key_claiming_our_key_id(self) -> None:
        """A forged signature line under our key id fails the signature check."""
        other = Ed25519PrivateKey.generate()
        forged = sign_checkpoint(CP, other).note
        body, line = forged.split("\n\n")
        blob = base64.b64decode(line.split(" ")[2])
        line = "\u2014 agent-broker " + base64.b64encode(key_id(KEY.public_key()) + blob[4:]).decode() + "\n"
        with pytest.raises(CheckpointInvalid, match="does not verify"):
            verify_checkpoint(body + "\n\n" + line, KEY.public_key())

    @pytest.mark.parametrize("edit", [("10050", "10051"), ("1795877399", "1795877398"), ("agent-broker\n", "x\n")])
    def test_tampered_note(self, edit: tuple[str, str]) -> None:
        """Changing the size, the time or the origin breaks the signature."""
        note = sign_checkpoint(CP, KEY).note
        body, sig = note.split("\n\n")
        with pytest.raises(CheckpointInvalid):
            verify_checkpoint(body.replace(*edit, 1) + "\n\n" + sig, KEY.public_key())

    def test_tampered_head(self) -> None:
        """Another head under the same signature does not verify."""
        note = sign_checkpoint(CP, KEY).note
        other = note.replace(base64.b64encode(HEAD).decode(), base64.b64encode(bytes(32)).decode())
        with pytest.raises(CheckpointInvalid, match="does not verify"):
            verify_checkpoint(other, KEY.public_key())

    def test_other_origin(self) -> None:
        """A checkpoint of another log is refused when the origin is given."""
        with pytest.raises(CheckpointInvalid, match="origin"):
            verify_checkpoint(sign_checkpoint(CP, KEY).note, KEY.public_key(), origin="other-broker")

    def test_cosignature_ignored(self) -> None:
        """An extra signature line by another key does not stop ours from verifying."""
        ours = sign_checkpoint(CP, KEY).note
        theirs = sign_checkpoint(CP, Ed25519PrivateKey.generate()).note.split("\n\n")[1]
        assert verify_checkpoint(ours + theirs, KEY.public_key()).size == CP.size


class TestWitnessText:
    def test_split_notes(self) -> None:
        """Notes written one after another with a blank line come back one by one."""
        notes = [sign_checkpoint(Checkpoint("o", n, HEAD, n), KEY).note for n in (1, 2, 3)]
        assert parse_notes("".join(n + "\n" for n in notes)) == notes
        assert parse_notes("") == []

    def test_torn_write(self) -> None:
        """A witness cut in the middle of a note is reported, not skipped."""
        note = sign_checkpoint(CP, KEY).note
        with pytest.raises(CheckpointInvalid):
            parse_notes(note + "\n" + note[:-1])
        with pytest.raises(CheckpointInvalid):
            parse_notes(note + "\n" + note[:20])


class TestKeyFiles:
    def test_generate_and_load(self, tmp_path: Path) -> None:
        """A generated key is mode 0600, loads back, and is never overwritten."""
        path = tmp_path / "audit.key"
        key = generate_signing_key_file(path)
        assert path.stat().st_mode & 0o777 == 0o600
        assert key_id(load_signing_key(path).public_key()) == key_id(key.public_key())
        with pytest.raises(FileExistsError):
            generate_signing_key_file(path)

    def test_group_readable_refused(self, tmp_path: Path) -> None:
        """A key readable by group or others is refused, like the store key."""
        path = tmp_path / "audit.key"
        generate_signing_key_file(path)
        os.chmod(path, 0o640)
        with pytest.raises(ConfigError, match="chmod 600"):
            load_signing_key(path)

    def test_not_a_key(self, tmp_path: Path) -> None:
        """Garbage or another key type is a ConfigError."""
        path = tmp_path / "audit.key"
        path.write_text("not a key")
        path.chmod(0o600)
        with pytest.raises(ConfigError):
            load_signing_key(path)

    def test_public_key_pem_round_trip(self) -> None:
        """The exported PEM loads back as the same public key."""
        pem = public_key_pem(KEY.public_key())
        assert pem.startswith("-----BEGIN PUBLIC KEY-----")
        assert key_id(load_public_key(pem.encode())) == key_id(KEY.public_key())
