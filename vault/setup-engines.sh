#!/usr/bin/env bash
# Example secret-engine set-up for a dev or test OpenBao: what the ORGANISATION configures,
# not what `broker vault sync` writes (see vault/README.md).
#
# Needs: bao on PATH, BAO_ADDR and BAO_TOKEN (an admin token), and a PostgreSQL reachable with a
# password-authenticated (scram-sha-256) admin role:
#   PG_HOST (127.0.0.1) PG_PORT (5432) PG_DB (postgres) PG_ADMIN_USER (postgres) PG_ADMIN_PASSWORD (required)
# The `tickets` table must exist (broker.devstack.seed_tickets_schema creates it).
# Optional, each set up only when its variables are set (broker.dev.engines does the same in Python):
#   MariaDB/MySQL: MYSQL_HOST (127.0.0.1) MYSQL_PORT (3306) MYSQL_ADMIN_USER MYSQL_ADMIN_PASSWORD MYSQL_DB (app)
#   Redis:         REDIS_HOST (127.0.0.1) REDIS_PORT (6379) REDIS_ADMIN_USER REDIS_ADMIN_PASSWORD
#   RabbitMQ:      RABBITMQ_URL (http://127.0.0.1:15672, the management API) RABBITMQ_ADMIN_USER
#                  RABBITMQ_ADMIN_PASSWORD RABBITMQ_VHOST (/)
# SSH certificates and a KV example need no server and are always set up.
# Idempotent: re-running rewrites the same roles; mounts and the root CA are created once.
set -euo pipefail

: "${BAO_ADDR:?set BAO_ADDR}" "${BAO_TOKEN:?set BAO_TOKEN}" "${PG_ADMIN_PASSWORD:?set PG_ADMIN_PASSWORD}"
PG_HOST="${PG_HOST:-127.0.0.1}"
PG_PORT="${PG_PORT:-5432}"
PG_DB="${PG_DB:-postgres}"
PG_ADMIN_USER="${PG_ADMIN_USER:-postgres}"

# Capture first: `bao ... | grep -q` under pipefail fails when grep exits early (SIGPIPE).
mounted() { local mounts; mounts="$(bao secrets list -format=json)"; grep -q "\"$1/\"" <<<"$mounts"; }

# --- PKI: an EC root CA and a role for agent certificates -------------------------------------
mounted pki || bao secrets enable -max-lease-ttl=87600h pki
if [ -z "$(bao read -field=default pki/config/issuers)" ]; then
  bao write -field=certificate pki/root/generate/internal \
    common_name="broker dev root CA" ttl=87600h key_type=ec key_bits=256 >/dev/null
fi
# generate_lease=true: every certificate gets a lease, so revoking the task token revokes the cert.
bao write pki/roles/agents \
  allow_any_name=true enforce_hostnames=false allowed_uri_sans="spiffe://*" \
  key_type=ec key_bits=256 max_ttl=24h generate_lease=true no_store=false

# --- Token role for child tokens of a task token ----------------------------------------------
# Not orphan: revoking the task token revokes its children. token_explicit_max_ttl is what caps them
# (OpenBao silently ignores token_ttl/token_max_ttl on token roles).
bao write auth/token/roles/agent-child \
  allowed_policies=default orphan=false renewable=true token_type=service token_explicit_max_ttl=3600

# --- Database engine: PostgreSQL with SCRAM passwords -----------------------------------------
mounted database || bao secrets enable database
bao write database/config/tickets \
  plugin_name=postgresql-database-plugin \
  connection_url="postgresql://{{username}}:{{password}}@${PG_HOST}:${PG_PORT}/${PG_DB}?sslmode=disable" \
  username="${PG_ADMIN_USER}" password="${PG_ADMIN_PASSWORD}" \
  password_authentication=scram-sha-256 \
  allowed_roles="tickets-ro,tickets-rw" verify_connection=true

# Explicit revocation statements: the plugin's default revocation runs ~50/s, these ~800-960/s.
# pg_terminate_backend ends sessions the credential still holds, so a revoked login stops now.
REVOKE="SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}'; \
REVOKE ALL PRIVILEGES ON ALL TABLES IN SCHEMA public FROM \"{{name}}\"; \
REVOKE ALL PRIVILEGES ON ALL SEQUENCES IN SCHEMA public FROM \"{{name}}\"; \
DROP ROLE IF EXISTS \"{{name}}\";"
CREATE_LOGIN="CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"

# Note: database/creds/<role> ignores a per-request ttl (measured on OpenBao 2.7.2): default_ttl is
# the TTL every credential gets. A tighter cap needs a renew with a smaller increment, or a role per TTL.
bao write database/roles/tickets-ro db_name=tickets default_ttl=10m max_ttl=1h \
  creation_statements="${CREATE_LOGIN} GRANT SELECT ON tickets TO \"{{name}}\";" \
  revocation_statements="${REVOKE}"

bao write database/roles/tickets-rw db_name=tickets default_ttl=10m max_ttl=1h \
  creation_statements="${CREATE_LOGIN} GRANT SELECT, INSERT, UPDATE, DELETE ON tickets TO \"{{name}}\"; GRANT USAGE, SELECT ON SEQUENCE tickets_id_seq TO \"{{name}}\";" \
  revocation_statements="${REVOKE}"

READY="pki/issue/agents, auth/token/create/agent-child, database/creds/tickets-{ro,rw}"

# --- MariaDB / MySQL (mysql-database-plugin): database/creds/app-ro ---------------------------
# The admin user needs CREATE USER, CONNECTION ADMIN and SELECT ... WITH GRANT OPTION on MYSQL_DB.
if [ -n "${MYSQL_ADMIN_USER:-}" ]; then
  bao write database/config/app-mysql plugin_name=mysql-database-plugin \
    connection_url="{{username}}:{{password}}@tcp(${MYSQL_HOST:-127.0.0.1}:${MYSQL_PORT:-3306})/" \
    username="${MYSQL_ADMIN_USER}" password="${MYSQL_ADMIN_PASSWORD:?set MYSQL_ADMIN_PASSWORD}" \
    allowed_roles=app-ro username_template='v_{{random 16}}' verify_connection=true
  # DROP first (no new login), then KILL USER (MariaDB) ends the sessions it still holds.
  bao write database/roles/app-ro db_name=app-mysql default_ttl=10m max_ttl=1h \
    creation_statements="CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'; GRANT SELECT ON \`${MYSQL_DB:-app}\`.* TO '{{name}}'@'%';" \
    revocation_statements="DROP USER IF EXISTS '{{name}}'@'%'; KILL USER '{{name}}';"
  READY="$READY, database/creds/app-ro"
else
  echo "skipping MariaDB/MySQL: set MYSQL_ADMIN_USER and MYSQL_ADMIN_PASSWORD" >&2
fi

# --- Redis (redis-database-plugin, ACL users): database/creds/cache-rw ------------------------
if [ -n "${REDIS_ADMIN_USER:-}" ]; then
  bao write database/config/cache-redis plugin_name=redis-database-plugin \
    host="${REDIS_HOST:-127.0.0.1}" port="${REDIS_PORT:-6379}" \
    username="${REDIS_ADMIN_USER}" password="${REDIS_ADMIN_PASSWORD:?set REDIS_ADMIN_PASSWORD}" \
    allowed_roles=cache-rw verify_connection=true
  # ACL rules as a JSON list; ACL DELUSER on revocation also disconnects the user's clients.
  bao write database/roles/cache-rw db_name=cache-redis default_ttl=10m max_ttl=1h \
    creation_statements='["~app:*", "+@read", "+@write", "+ping"]'
  READY="$READY, database/creds/cache-rw"
else
  echo "skipping Redis: set REDIS_ADMIN_USER and REDIS_ADMIN_PASSWORD" >&2
fi

# --- RabbitMQ (its own engine, over the management API): rabbitmq/creds/agent ----------------
if [ -n "${RABBITMQ_ADMIN_USER:-}" ]; then
  mounted rabbitmq || bao secrets enable rabbitmq
  bao write rabbitmq/config/connection connection_uri="${RABBITMQ_URL:-http://127.0.0.1:15672}" \
    username="${RABBITMQ_ADMIN_USER}" password="${RABBITMQ_ADMIN_PASSWORD:?set RABBITMQ_ADMIN_PASSWORD}" \
    verify_connection=true username_template='v-{{random 16}}'
  # The engine's leases default to 32 days: bound them here (the broker caps each one further).
  bao write rabbitmq/config/lease ttl=10m max_ttl=1h
  bao write rabbitmq/roles/agent vhosts="{\"${RABBITMQ_VHOST:-/}\": {\"configure\": \".*\", \"write\": \".*\", \"read\": \".*\"}}"
  READY="$READY, rabbitmq/creds/agent"
else
  echo "skipping RabbitMQ: set RABBITMQ_ADMIN_USER and RABBITMQ_ADMIN_PASSWORD (management plugin enabled)" >&2
fi

# --- SSH certificates: ssh/sign/agents (expiry-only: a certificate cannot be revoked) ----------
mounted ssh || bao secrets enable ssh
bao read ssh/config/ca >/dev/null 2>&1 || bao write ssh/config/ca generate_signing_key=true key_type=ssh-ed25519 >/dev/null
# allow_user_key_ids: a grant's key_id="{task}" puts the task in sshd's log. Trust the CA on hosts with
# `bao read -field=public_key ssh/config/ca` in TrustedUserCAKeys.
bao write ssh/roles/agents - <<'JSON'
{"key_type": "ca", "allow_user_certificates": true, "allow_host_certificates": false,
 "allowed_users": "deploy,ops", "default_user": "deploy", "allow_user_key_ids": true, "ttl": "10m",
 "max_ttl": "1h", "allowed_extensions": "permit-pty", "default_extensions": {"permit-pty": ""}}
JSON
READY="$READY, ssh/sign/agents"

# --- KV version 2: secret/data/example/api-key (static: valid until someone rotates it) --------
mounted secret || bao secrets enable -path=secret -version=2 kv
bao kv get -mount=secret example/api-key >/dev/null 2>&1 || bao kv put -mount=secret example/api-key api_key=example-not-a-secret >/dev/null
READY="$READY, secret/data/example/api-key"

echo "engines ready: $READY"
