#!/usr/bin/env bash
# Runs the whole test suite against a real PostgreSQL: the one at
# USAGE_TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres)
# when it answers, otherwise a throwaway cluster started for the run.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh

ensure_postgres "${USAGE_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export USAGE_TEST_DATABASE_URL=$PG_URL
# The restart tests start clusters of their own: they need initdb and pg_ctl.
export USAGE_TEST_PG_BINDIR=${USAGE_TEST_PG_BINDIR:-$(pg_bindir)}

# Each test creates its own database named usage_test_<pid>_...; drop those
# left behind by test processes that no longer run (a panicking test cannot
# clean up after itself).
for db in $(psql "$PG_URL" -Atqc "SELECT datname FROM pg_database WHERE datname LIKE 'usage_test_%'"); do
    pid=$(cut -d_ -f3 <<<"$db")
    if ! kill -0 "$pid" 2>/dev/null; then
        psql "$PG_URL" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null
    fi
done

# The summary line adds up every test binary's result, so the last line says
# what the whole run did (cargo's own last line is only the last binary's).
log=$(mktemp)
status=0
cargo test --all-targets "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { passed += $4; failed += $6 }
     END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
rm -f "$log"
exit "$status"
