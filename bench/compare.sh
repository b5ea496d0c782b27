#!/usr/bin/env bash
# The service against PostgreSQL's own ceiling, on the same machine in the
# same run.
#
# For each scenario, pgbench -M prepared runs the very statements the service
# sends (generated from src/store/sql/*.sql, so the two cannot drift) at each
# concurrency of PGBENCH_CONCURRENCY and the best tps is kept; then the
# release build of the service runs under usage-bench at SERVICE_CONCURRENCY.
# One pgbench transaction is one usage-bench operation: Reserve + Release for
# spread and hot, one Reserve for refused, one Get for get.
#
# pgbench sends each call as its own statement, as the service does when no
# calls queue; under load the service sends queued calls together (see "How
# the limit is enforced" in the README), which is how it can pass the
# per-statement ceiling. SERVICE_ARGS="--db-batch-max 1" measures it without.
#
# The service, usage-bench and PostgreSQL share this machine's CPUs, so the
# service runs with one Tokio worker per two CPUs (SERVICE_WORKERS): with a
# worker per CPU it spent more CPU per call on workers waking each other,
# CPU that PostgreSQL and usage-bench needed (see the README's Performance
# section). In production the service's CPUs are its own and the default,
# one worker per CPU, is right.
#
# PIN_CPUS=1 pins the service to the first CPU and usage-bench to the
# second (with taskset), and leaves PostgreSQL and pgbench to the
# scheduler. Unpinned, perf sched shows each process waiting about 0.1 ms
# between being woken and running while the CPUs are a sixth idle; pinned,
# the service and its load generator never compete for a CPU, closer to
# the two being on different machines. It does not help every point (see the README's
# Performance section), so it is off by default.
#
# Then, unless EXTRAS=0: the server's peak resident memory at concurrency 256,
# and p99 at half the service's maximum throughput for HALF_RATE_SCENARIOS
# (which must be among SCENARIOS).
#
# Both sides use the same database server and settings (durable commits on:
# this script changes none). Needs psql and pgbench on PATH.
#
#   bench/compare.sh                       # every scenario, 10 s per point
#   SECONDS_PER_POINT=20 SCENARIOS="spread hot" bench/compare.sh
#   SERVICE_ARGS="--db-pool-size 16" bench/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ADMIN_URL=${ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
BENCH_DB=${BENCH_DB:-usage_bench}
SECONDS_PER_POINT=${SECONDS_PER_POINT:-10}
SCENARIOS=${SCENARIOS:-spread hot refused get}
PGBENCH_CONCURRENCY=${PGBENCH_CONCURRENCY:-1 4 8 16 32}
SERVICE_CONCURRENCY=${SERVICE_CONCURRENCY:-32}
MEMORY_CONCURRENCY=${MEMORY_CONCURRENCY:-256}
EXTRAS=${EXTRAS:-1}
HALF_RATE_SCENARIOS=${HALF_RATE_SCENARIOS:-spread get}
SERVICE_ARGS=${SERVICE_ARGS:-}
SERVICE_WORKERS=${SERVICE_WORKERS:-$(($(nproc) / 2 > 0 ? $(nproc) / 2 : 1))}
PIN_CPUS=${PIN_CPUS:-0}
USERS=100000
BENCH_ACTOR=usage-bench
GRPC_ADDR=127.0.0.1:50071
METRICS_ADDR=127.0.0.1:9191

DB_URL="${ADMIN_URL%/*}/$BENCH_DB"
SERVICE_ON=()
BENCH_ON=()
if [[ $PIN_CPUS == 1 ]]; then
    if ! taskset -c 0 true 2>/dev/null || ! taskset -c 1 true 2>/dev/null; then
        echo "compare.sh: PIN_CPUS=1 needs CPUs 0 and 1 (and taskset)" >&2
        exit 1
    fi
    SERVICE_ON=(taskset -c 0)
    BENCH_ON=(taskset -c 1)
fi
WORK=$(mktemp -d)
SERVICE_PID=

cleanup() {
    if [[ -n $SERVICE_PID ]]; then
        kill "$SERVICE_PID" 2>/dev/null || true
        wait "$SERVICE_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

say() { printf '== %s\n' "$*" >&2; }

# The statement of src/store/sql/$1.sql as a pgbench command: comment lines
# dropped, $1, $2, ... replaced by the remaining arguments in order.
statement() {
    local file="src/store/sql/$1.sql"
    shift
    local args=() n=1 value
    for value in "$@"; do
        args+=(-e "s/\\\$$n\\b/$value/g")
        n=$((n + 1))
    done
    local sql
    sql=$(grep -v '^[[:space:]]*--' "$file" | sed "${args[@]}")
    if grep -q '\$[0-9]' <<<"$sql"; then
        echo "compare.sh: $file has a parameter the $# given values do not cover" >&2
        exit 1
    fi
    printf '%s;\n' "$sql"
}

# The pgbench script of a scenario. The audit actor is the bench token's
# subject, as the service records it; the product id doubles as the request
# id; no hold (a permanent slot).
script() {
    local reserve release
    reserve=$(statement reserve :uid :feature :pid :action :actor :pid NULL)
    release=$(statement release :uid :feature :pid :actor :pid)
    case $1 in
        spread) printf '\\set uid random(1, %d)\n\\set pid random(1, 1000000000000)\n%s\n%s\n' \
            "$USERS" "$reserve" "$release" ;;
        hot) printf '\\set pid random(1, 1000000000000)\n%s\n%s\n' "$reserve" "$release" ;;
        refused) printf '\\set pid random(1, 1000000000000)\n%s\n' "$reserve" ;;
        get) printf '\\set uid random(1, %d)\n%s\n' "$USERS" "$(statement get :uid :feature)" ;;
    esac
}

# The fixed user of a scenario, as the service bench names it.
fixed_user() {
    case $1 in
        hot) echo hot ;;
        refused) echo full ;;
        *) echo none ;;
    esac
}

# Runs pgbench; prints "tps p99_ms".
pgbench_point() {
    local scenario=$1 clients=$2 threads=$(($2 < 2 ? $2 : 2))
    local log="$WORK/log-$scenario-$clients"
    pgbench -n -M prepared -c "$clients" -j "$threads" -T "$SECONDS_PER_POINT" \
        -D feature=product_slot -D action=reserve -D actor="$BENCH_ACTOR" \
        -D uid="$(fixed_user "$scenario")" \
        -f "$WORK/$scenario.pgbench" -l --log-prefix="$log" "$DB_URL" \
        >"$WORK/pgbench.out" 2>&1 || { cat "$WORK/pgbench.out" >&2; exit 1; }
    local tps p99
    tps=$(awk '/^tps = / { print $3; exit }' "$WORK/pgbench.out")
    # Column 3 of the transaction log is the latency in microseconds.
    p99=$(cat "$log".* | awk '{ print $3 }' | sort -n |
        awk '{ v[NR] = $1 } END { i = int(NR * 0.99); if (i < 1) i = 1; printf "%.2f", v[i] / 1000 }')
    rm -f "$log".*
    echo "$tps $p99"
}

# Runs usage-bench; prints its RESULT line.
service_point() {
    "${BENCH_ON[@]}" target/release/usage-bench --target "http://$GRPC_ADDR" --database-url "$DB_URL" \
        --users "$USERS" --duration "${SECONDS_PER_POINT}s" --warmup 2s \
        --server-pid "$SERVICE_PID" "$@" | tee "$WORK/bench.out" >&2 ||
        { echo "compare.sh: usage-bench failed, stopping" >&2; exit 1; }
    grep '^RESULT ' "$WORK/bench.out"
}

# Every point starts from a vacuumed database, so that neither side pays for
# the dead rows the other left behind (each Release deletes a slot row).
vacuum() { psql -q "$DB_URL" -c "VACUUM ANALYZE" >/dev/null; }

field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }

say "building the release binaries"
cargo build --release --quiet --bin usage-service --bin usage-bench

say "fresh database $BENCH_DB"
psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $BENCH_DB WITH (FORCE)" \
    -c "CREATE DATABASE $BENCH_DB" >/dev/null
psql -At "$DB_URL" -c "SELECT 'postgres ' || current_setting('server_version') \
    || ', synchronous_commit=' || current_setting('synchronous_commit') \
    || ', fsync=' || current_setting('fsync') \
    || ', wal_sync_method=' || current_setting('wal_sync_method')" >&2

say "starting the service (authentication on, with a secret for this run)"
USAGE_AUTH_JWT_SECRET=$(head -c 48 /dev/urandom | base64 | tr -d '\n')
export USAGE_AUTH_JWT_SECRET
USAGE_BENCH_TOKEN=$(target/release/usage-service token --role service --sub "$BENCH_ACTOR" --ttl 12h)
export USAGE_BENCH_TOKEN
# shellcheck disable=SC2086 # SERVICE_ARGS is a list of flags
"${SERVICE_ON[@]}" target/release/usage-service --database-url "$DB_URL" --listen-addr "$GRPC_ADDR" \
    --metrics-addr "$METRICS_ADDR" --no-catalogue --worker-threads "$SERVICE_WORKERS" \
    $SERVICE_ARGS >"$WORK/service.log" 2>&1 &
SERVICE_PID=$!
for _ in $(seq 100); do
    (echo >"/dev/tcp/${GRPC_ADDR%:*}/${GRPC_ADDR#*:}") 2>/dev/null && break
    sleep 0.1
done
target/release/usage-bench --target "http://$GRPC_ADDR" --database-url "$DB_URL" \
    --users "$USERS" --setup-only

declare -A BEST_TPS BEST_AT PG_P99 SVC_RPS SVC_P99
for scenario in $SCENARIOS; do
    script "$scenario" >"$WORK/$scenario.pgbench"
    best=0
    for clients in $PGBENCH_CONCURRENCY; do
        vacuum
        point=$(pgbench_point "$scenario" "$clients")
        read -r tps p99 <<<"$point"
        say "pgbench $scenario -c $clients: $tps tps, p99 $p99 ms"
        if awk -v a="$tps" -v b="$best" 'BEGIN { exit !(a > b) }'; then
            best=$tps
            BEST_AT[$scenario]=$clients
            PG_P99[$scenario]=$p99
        fi
    done
    BEST_TPS[$scenario]=$best

    say "usage-bench $scenario --concurrency $SERVICE_CONCURRENCY"
    vacuum
    result=$(service_point --scenario "$scenario" --concurrency "$SERVICE_CONCURRENCY")
    SVC_RPS[$scenario]=$(field ops_per_s "$result")
    SVC_P99[$scenario]=$(field p99_ms "$result")
done

if [[ $EXTRAS == 1 ]]; then
    say "usage-bench spread --concurrency $MEMORY_CONCURRENCY (resident memory)"
    vacuum
    result=$(service_point --scenario spread --concurrency "$MEMORY_CONCURRENCY")
    MEMORY_RSS=$(field rss_kib "$result")
    MEMORY_RPS=$(field ops_per_s "$result")
    MEMORY_P99=$(field p99_ms "$result")

    declare -A HALF_RATE HALF_RPS HALF_P99
    for scenario in $HALF_RATE_SCENARIOS; do
        HALF_RATE[$scenario]=$(awk -v r="${SVC_RPS[$scenario]}" 'BEGIN { printf "%.0f", r / 2 }')
        say "usage-bench $scenario paced at ${HALF_RATE[$scenario]} ops/s (half the maximum)"
        vacuum
        result=$(service_point --scenario "$scenario" --concurrency "$SERVICE_CONCURRENCY" \
            --rate "${HALF_RATE[$scenario]}")
        HALF_RPS[$scenario]=$(field ops_per_s "$result")
        HALF_P99[$scenario]=$(field p99_ms "$result")
    done
fi

echo
echo "$(nproc) CPUs, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)," \
    "$SECONDS_PER_POINT s per point, service at concurrency $SERVICE_CONCURRENCY" \
    "(--worker-threads $SERVICE_WORKERS${SERVICE_ARGS:+ $SERVICE_ARGS})" \
    "$([[ $PIN_CPUS == 1 ]] && echo "pinned: service CPU 0, usage-bench CPU 1" || echo unpinned)"
printf '| %-8s | %-22s | %-14s | %-13s | %-14s | %-10s |\n' \
    scenario "pgbench best tps (@c)" "pgbench p99 ms" "service ops/s" "service p99 ms" ratio
printf '|%s|%s|%s|%s|%s|%s|\n' ---------- ------------------------ ---------------- \
    --------------- ---------------- ------------
for scenario in $SCENARIOS; do
    ratio=$(awk -v s="${SVC_RPS[$scenario]}" -v p="${BEST_TPS[$scenario]}" \
        'BEGIN { printf "%.2f", (p > 0 ? s / p : 0) }')
    printf '| %-8s | %-22s | %-14s | %-13s | %-14s | ratio %-4s |\n' "$scenario" \
        "$(printf '%.1f (@%s)' "${BEST_TPS[$scenario]}" "${BEST_AT[$scenario]}")" \
        "${PG_P99[$scenario]}" "${SVC_RPS[$scenario]}" "${SVC_P99[$scenario]}" "$ratio"
done
if [[ $EXTRAS == 1 ]]; then
    echo
    echo "spread at concurrency $MEMORY_CONCURRENCY: $MEMORY_RPS ops/s, p99 $MEMORY_P99 ms," \
        "server peak RSS $(awk -v k="$MEMORY_RSS" 'BEGIN { printf "%.1f", k / 1024 }') MiB"
    for scenario in $HALF_RATE_SCENARIOS; do
        echo "$scenario paced at ${HALF_RATE[$scenario]} ops/s (half the maximum):" \
            "${HALF_RPS[$scenario]} ops/s, p99 ${HALF_P99[$scenario]} ms"
    done
fi
