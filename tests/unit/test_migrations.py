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
