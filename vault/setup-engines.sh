#!/usr/bin/env bash
# Example secret-engine set-up for a dev or test OpenBao: what the ORGANISATION configures,
# not what `broker vault sync` writes (see vault/README.md).
#
# Needs: bao on PATH, BAO_ADDR and BAO_TOKEN (an admin token), and a PostgreSQL reachable with a
# password-authenticated (scram-sha-256) admin role:
#   PG_HOST (127.0.0.1) PG_PORT (5432) PG_DB (postgres) PG_ADMIN_USER (postgres) PG_ADMIN_PASSWORD (required)
# The `tickets` table must exist (broker.devstack.seed_tickets_schema creates it).
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

echo "engines ready: pki/issue/agents, auth/token/create/agent-child, database/creds/tickets-{ro,rw}"
