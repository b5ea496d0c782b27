#!/usr/bin/env bash
# Benchmark of `usage-service backfill`: a fresh database with USERS users and
# PRODUCTS products (scripts/generate_catalogue.sql), then the backfill timed
# by /usr/bin/time -v (wall time and peak resident memory), then a second run
# that must change nothing.
#
#   scripts/bench-backfill.sh [USERS] [PRODUCTS]      # default 100000 1000000
#
# The server comes from USAGE_TEST_DATABASE_URL (default
# postgres://postgres@127.0.0.1:5432/postgres); the database it creates is
# named usage_bench_backfill and left in place for inspection.
set -euo pipefail
cd "$(dirname "$0")/.."
users=${1:-100000}
products=${2:-1000000}
admin=${USAGE_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
db=usage_bench_backfill
url="${admin%/*}/$db"

cargo build --release --quiet
bin=target/release/usage-service

psql "$admin" -q -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
echo "generating the catalogue"
/usr/bin/time -f "generated in %e s" env DATABASE_URL="$url" \
    scripts/generate-catalogue.sh "$users" "$products"
RUST_LOG=warn "$bin" migrate --database-url "$url"

run() {
    local log
    log=$(mktemp)
    RUST_LOG=warn /usr/bin/time -v "$bin" backfill --database-url "$url" "$@" 2>"$log"
    grep -E "Elapsed \(wall clock\)|Maximum resident set size|Percent of CPU" "$log" | sed 's/^\s*/  /'
    rm -f "$log"
}
echo "backfill, first run:"
run
echo "backfill, second run (must change nothing):"
run
psql "$url" -tAc "SELECT format('check: %s users whose counter, ledger or audit trail disagree', count(*))
                    FROM ($(cat src/store/sql/check.sql)) AS d"
