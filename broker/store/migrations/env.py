"""Alembic environment: the broker runs migrations on its own connection (``open_store``).

Run by hand: ``alembic -x url=sqlite:///broker.db upgrade head`` from this folder's parent config is
not needed; ``broker serve`` upgrades at start-up.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from broker.store.schema import metadata

config = context.config
connection = config.attributes.get("connection")

if connection is not None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("give the database with -x url=...")
    engine = create_engine(url)
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
