#!/usr/bin/env bash
# Builds and runs the service against PostgreSQL: the one at DATABASE_URL
# (default postgres://postgres@127.0.0.1:5432/postgres) when it answers,
# otherwise a throwaway cluster that lives as long as this script.
# Extra arguments go to `usage-service serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh

ensure_postgres "${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export DATABASE_URL=$PG_URL

cargo build --release --bin usage-service

# Reconciliation and the example product service work on the catalogue's
# products table. A database that has none (a fresh machine, a throwaway
# cluster) gets the example catalogue's empty table, so that the service
# starts with every feature on. Naming another table or --no-catalogue, in
# the environment or as an argument, skips this.
catalogue_configured=${USAGE_PRODUCTS_TABLE:-${USAGE_NO_CATALOGUE:-}}
for arg in "$@"; do
    case $arg in --products-table* | --no-catalogue) catalogue_configured=yes ;; esac
done
if [ -z "$catalogue_configured" ] \
    && [ "$(psql "$PG_URL" -Atqc "SELECT to_regclass('products') IS NULL")" = t ]; then
    pg_log "no products table: creating the example catalogue's (tests/fixtures/catalogue.sql)"
    psql "$PG_URL" -q -v ON_ERROR_STOP=1 -f tests/fixtures/catalogue.sql
fi

# Authentication is on by default. Without a configured key, make a secret
# for this run only, and print it with an admin token to try the API.
if [ "${USAGE_AUTH:-jwt}" != none ] && [ -z "${USAGE_AUTH_JWT_SECRET:-}" ] \
    && [ -z "${USAGE_AUTH_JWT_PUBLIC_KEY:-}" ]; then
    USAGE_AUTH_JWT_SECRET=$(head -c 48 /dev/urandom | base64 | tr -d '\n')
    export USAGE_AUTH_JWT_SECRET
    admin_token=$(target/release/usage-service token --role admin --sub developer --ttl 12h)
    pg_log "development JWT secret for this run: $USAGE_AUTH_JWT_SECRET"
    pg_log "admin token (12h), for grpcurl and the example product service:"
    pg_log "  export TOKEN=$admin_token"
    pg_log "try: grpcurl -plaintext -H \"authorization: Bearer \$TOKEN\" -d '{\"user_id\":\"alice\"}' localhost:50051 usage.v1.UsageService/Get"
fi
exec_args=(serve "$@")
# Not exec: the EXIT trap must stop a throwaway cluster after the service ends.
target/release/usage-service "${exec_args[@]}"
