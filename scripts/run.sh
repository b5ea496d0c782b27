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
exec_args=(serve "$@")
# Not exec: the EXIT trap must stop a throwaway cluster after the service ends.
target/release/usage-service "${exec_args[@]}"
