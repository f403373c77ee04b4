"""Console sessions in the store (SQLite here; tests/api/test_console_replicas.py runs two replicas on
PostgreSQL), the identity they keep, and the shared sign-in form key."""

from __future__ import annotations

import base64
import hashlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from broker.console import LOGIN_KEY_LABEL, SessionStore, _identity_json, _identity_of
from broker.errors import RateLimited, StoreUnavailable
from broker.identity import UserIdentity
from broker.sealing import TokenSealer
from broker.store import Store, open_store

IDP = "https://idp.example"


def person(sub: str, *, exp: float = 10_000.0) -> UserIdentity:
    return UserIdentity(subject=sub, issuer=IDP, groups=frozenset({"secops", "secops-leads"}), auth_time=990.5,
                        expires_at=exp, email=f"{sub}@example.org", email_trusted=True)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await open_store(f"sqlite:///{tmp_path / 'broker.db'}")
    yield s
    await s.close()


def sessions(store: Store, clock: Clock, *, limit: int = 1000, per_person: int = 2) -> SessionStore:
    s = SessionStore(clock=clock, limit=limit, per_person=per_person)
    s.bind(store, b"k" * 32)
    return s


class TestIdentityKept:
    def test_round_trip(self) -> None:
        user = person("ana")
        assert _identity_of(_identity_json(user)) == user
        anon = UserIdentity(subject="s", issuer=IDP, groups=frozenset(), auth_time=None, expires_at=5.0)
        assert _identity_of(_identity_json(anon)) == anon

    @pytest.mark.parametrize("text", ["", "[]", '{"iss": "x"}', '{"iss":1,"sub":"s","groups":[],"auth_time":null,'
                                      '"exp":1,"email":null,"email_trusted":false}',
                                      '{"iss":"i","sub":"s","groups":"secops","auth_time":null,"exp":1,'
                                      '"email":null,"email_trusted":false}'])
    def test_an_unreadable_row_is_no_session(self, text: str) -> None:
        assert _identity_of(text) is None


class TestLoginKey:
    def test_derived_alike_from_one_key_file_and_apart_by_label(self, tmp_path: Path) -> None:
        path = tmp_path / "store.key"
        TokenSealer.generate_key_file(path)
        one, two = TokenSealer.from_file(path), TokenSealer.from_file(path)
        assert one.derive(LOGIN_KEY_LABEL) == two.derive(LOGIN_KEY_LABEL)
        assert len(one.derive(LOGIN_KEY_LABEL)) == 32
        assert one.derive(LOGIN_KEY_LABEL) != one.derive(b"another use")
        raw = base64.b64decode(path.read_text())
        assert one.derive(LOGIN_KEY_LABEL) != raw  # not the sealing key itself
        assert TokenSealer(bytes(32)).derive(LOGIN_KEY_LABEL) != one.derive(LOGIN_KEY_LABEL)


class TestSessionsInTheStore:
    async def test_create_get_flash_drop(self, store: Store, tmp_path: Path) -> None:
        clock = Clock()
        s = sessions(store, clock)
        sid, made = await s.create(person("ana"))
        got = await s.get(sid, take_flash=True)
        assert got is not None and got.user == person("ana") and got.csrf == made.csrf
        assert got.flash == "Signed in as ana@example.org."
        again = await s.get(sid, take_flash=True)
        assert again is not None and again.flash is None  # shown once
        await s.set_flash(again, "done")
        assert (await s.get(sid)) is not None  # a form post (no take_flash) leaves the message for the next page
        shown = await s.get(sid, take_flash=True)
        assert shown is not None and shown.flash == "done"
        with sqlite3.connect(tmp_path / "broker.db") as db:
            rows = db.execute("SELECT * FROM console_sessions").fetchall()
        assert [r[0] for r in rows] == [hashlib.sha256(sid.encode()).hexdigest()]
        assert not any(sid in str(col) for col in rows[0])
        await s.drop(sid)
        assert await s.get(sid) is None
        assert await s.get("x" * 129) is None and await s.get(None) is None

    async def test_expiry_and_purge(self, store: Store) -> None:
        clock = Clock()
        s = sessions(store, clock)
        short, _ = await s.create(person("ana", exp=1100.0))
        long, _ = await s.create(person("bo", exp=5000.0))
        clock.now = 1100.0
        assert await s.get(short) is None  # expired at exp, and deleted on the way
        assert await store.count_console_sessions(now=0) == 1
        clock.now = 5000.0
        assert await s.purge() == 1 and await s.get(long) is None

    async def test_per_person_cap_ends_own_oldest_and_global_cap_refuses(self, store: Store) -> None:
        clock = Clock()
        s = sessions(store, clock, limit=3, per_person=2)
        first, _ = await s.create(person("ana"))
        clock.now += 1
        second, _ = await s.create(person("ana"))
        clock.now += 1
        third, _ = await s.create(person("ana"))
        assert await s.get(first) is None and await s.get(second) is not None and await s.get(third) is not None
        bo, _ = await s.create(person("bo"))
        with pytest.raises(RateLimited):
            await s.create(person("cy"))
        # Ana's own sign-in still fits (it ends her own oldest) and evicts nobody else.
        fourth, _ = await s.create(person("ana"))
        assert await s.get(second) is None and await s.get(bo) is not None and await s.get(fourth) is not None
        assert await store.count_console_sessions(now=clock.now) == 3

    async def test_unbound_refuses(self) -> None:
        s = SessionStore()
        with pytest.raises(StoreUnavailable):
            s.login_token("nonce")
        with pytest.raises(StoreUnavailable):
            await s.get("some-id")
