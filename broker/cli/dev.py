"""``broker dev``: DEV ONLY. The whole path on one machine (see :mod:`broker.dev.demo`)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from broker.cli.common import setup_logging
from broker.errors import BrokerError

__all__ = ["dev"]


@click.command("dev")
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), default=Path(".broker-dev"),
              show_default=True, help="Where the dev OpenBao, keys, config and SQLite store live.")
@click.option("--port", type=int, default=8400, show_default=True, help="The broker's port on 127.0.0.1.")
@click.option("--pg-dsn", envvar="BROKER_DEV_PG_DSN",
              help="An admin DSN of a PostgreSQL server: adds a database grant to the demo.")
@click.option("--once", is_flag=True, help="Exit after the demo instead of serving until Ctrl-C.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the broker listens on.")
@click.option("--vault-addr", envvar="BROKER_DEV_VAULT_ADDR",
              help="Use this dev Vault/OpenBao instead of starting one (needs --vault-token).")
@click.option("--vault-token", envvar="BROKER_DEV_VAULT_TOKEN", help="Root token of --vault-addr.")
@click.option("--mysql-url", envvar="BROKER_DEV_MYSQL_URL",
              help="mysql://ADMIN:PASSWORD@HOST:3306/DB: adds a MariaDB/MySQL grant (else skipped).")
@click.option("--redis-url", envvar="BROKER_DEV_REDIS_URL",
              help="redis://ADMIN:PASSWORD@HOST:6379 (an ACL user allowed ACL commands): adds a Redis grant.")
@click.option("--rabbitmq-url", envvar="BROKER_DEV_RABBITMQ_URL",
              help="http://ADMIN:PASSWORD@HOST:15672/VHOST (the management API): adds a RabbitMQ grant.")
@click.option("--vault-audit-log", envvar="BROKER_DEV_VAULT_AUDIT_LOG", type=click.Path(path_type=Path),
              help="Where --vault-addr writes its file audit device.")
def dev(workdir: Path, port: int, pg_dsn: str | None, once: bool, host: str, vault_addr: str | None,
        vault_token: str | None, vault_audit_log: Path | None, mysql_url: str | None, redis_url: str | None,
        rabbitmq_url: str | None) -> None:
    """DEV ONLY: a dev OpenBao, dev identities, the broker on SQLite, and a demo agent walked through a task.

    SSH certificates and a KV value are always in the demo; MariaDB, Redis and RabbitMQ where their admin
    URLs are given (each one not given or not reachable is skipped, and said so).
    """
    from broker.dev.demo import run_dev
    from broker.dev.engines import OptionalEngines

    setup_logging("warning")
    try:
        code = asyncio.run(run_dev(workdir=workdir, port=port, pg_dsn=pg_dsn, once=once, host=host,
                                   vault_addr=vault_addr, vault_token=vault_token, vault_audit_log=vault_audit_log,
                                   engines=OptionalEngines(mysql_url, redis_url, rabbitmq_url)))
    except KeyboardInterrupt:
        code = 0
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(code)
