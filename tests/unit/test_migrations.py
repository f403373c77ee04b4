"""The Alembic migrations produce exactly the tables the code's metadata describes."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from broker.store import open_store
from broker.store.schema import metadata


class TestMigrations:
    async def test_migrated_schema_matches_metadata(self, tmp_path: Path) -> None:
        """Upgrading an empty SQLite file to head leaves no difference from broker.store.schema."""
        store = await open_store(f"sqlite:///{tmp_path / 'm.db'}")
        await store.close()
        engine = create_engine(f"sqlite:///{tmp_path / 'm.db'}")
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        engine.dispose()
        assert diff == []

    async def test_upgrade_is_idempotent(self, tmp_path: Path) -> None:
        """Opening the store twice runs no migration twice and keeps the data."""
        url = f"sqlite:///{tmp_path / 'm.db'}"
        for _ in range(2):
            store = await open_store(url)
            await store.ping()
            await store.close()

    async def test_legacy_people_rows_migrate(self, tmp_path: Path) -> None:
        """Rows from before person ids keep their name as display name; an address becomes the trusted email,
        so a revocation by that address still fences the task, and a lock by it holds the legacy name."""
        from alembic import command
        from alembic.config import Config
        from sqlalchemy import text

        from broker.audit import AuditRecord
        from broker.store import RevocationRow

        url = f"sqlite:///{tmp_path / 'm.db'}"
        engine = create_engine(url)
        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parents[2] / "broker/store/migrations"))
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0008")
            for tid, user in (("tsk_legacy_mail", "Zoe@Example.test"), ("tsk_legacy_sub", "u-1234")):
                conn.execute(text(
                    "INSERT INTO tasks (id, user, agent, role, tenant, reason, created_at, expires_at, state, "
                    "token_accessor, sealed_token, token_state) VALUES (:id, :user, 'spiffe://example.org/a', "
                    "'r', 'acme', 'x', 1, 9e9, 'active', 'acc', x'00', 'live')"), {"id": tid, "user": user})
        engine.dispose()
        store = await open_store(url)
        try:
            mail = await store.get_task("tsk_legacy_mail")
            sub = await store.get_task("tsk_legacy_sub")
            assert mail is not None and (mail.user_name, mail.user_email) == ("Zoe@Example.test", "zoe@example.test")
            assert sub is not None and (sub.user_name, sub.user_email) == ("u-1234", None)
            rev = RevocationRow(id="rvk_1", kind="user", value="zoe@example.test", reason="offboarding",
                                created_by="https://idp#op", created_at=2, lock=True, lifted_at=None,
                                lifted_by=None, tasks=0, leases=0)
            fenced = await store.fence_selected(rev, now=2, created=AuditRecord(2, "revocation.created", "success"),
                                                reason="offboarding")
            assert [t.id for t in fenced] == ["tsk_legacy_mail"]
        finally:
            await store.close()
