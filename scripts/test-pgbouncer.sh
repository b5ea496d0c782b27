#!/usr/bin/env bash
# Runs the test suite with the service's connections going through a real
# PgBouncer in transaction-pooling mode, in front of the PostgreSQL that
# scripts/test.sh would use. Tests still create, migrate and check their
# databases directly (migrations hold a session-level advisory lock, which
# transaction pooling cannot keep). Extra arguments go to `cargo test`.
#
# PgBouncer comes from Debian's pgbouncer package (installed when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh

ensure_postgres "${USAGE_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export USAGE_TEST_DATABASE_URL=$PG_URL

if ! command -v pgbouncer >/dev/null 2>&1; then
    pg_log "installing Debian's pgbouncer package"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq pgbouncer >&2
fi
pg_log "$(pgbouncer --version | head -n 1)"

# host and port of PG_URL (postgres://user@host:port/db)
hostport=${PG_URL#*@}
hostport=${hostport%%/*}
pg_host=${hostport%:*}
pg_port=${hostport##*:}
[ "$pg_port" != "$hostport" ] || pg_port=5432

dir=$(mktemp -d /tmp/usage-pgbouncer.XXXXXX)
port=$(pg_free_port)
as_owner=()
if [ "$(id -u)" -eq 0 ]; then
    # PgBouncer refuses to run as root.
    chown postgres "$dir"
    as_owner=(runuser -u postgres --)
fi
cat >"$dir/pgbouncer.ini" <<INI
[databases]
; Every database of the server, with the service's statement_timeout set on
; each server connection PgBouncer opens (see ignore_startup_parameters).
* = host=$pg_host port=$pg_port connect_query='SET statement_timeout = 5000'

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $dir/userlist.txt
pool_mode = transaction
max_client_conn = 2000
default_pool_size = 40
; tokio-postgres sends statement_timeout as the startup parameter "options",
; which PgBouncer cannot track per client: let it through unused, and set
; statement_timeout on the role or database instead (see the README).
ignore_startup_parameters = extra_float_digits,options
server_reset_query =
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
INI
printf '"postgres" ""\n' >"$dir/userlist.txt"
"${as_owner[@]}" pgbouncer -d "$dir/pgbouncer.ini"
trap '"${as_owner[@]}" kill "$(cat "$dir/pgbouncer.pid")" 2>/dev/null || kill "$(cat "$dir/pgbouncer.pid")"; rm -rf "$dir"' EXIT
for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done
pg_log "PgBouncer (transaction pooling) at 127.0.0.1:$port in front of $pg_host:$pg_port"

export USAGE_TEST_POOLER_ADDR=127.0.0.1:$port
# PgBouncer before 1.21 cannot keep prepared statements in transaction mode.
export USAGE_DB_UNNAMED_STATEMENTS=${USAGE_DB_UNNAMED_STATEMENTS:-true}
pg_log "USAGE_DB_UNNAMED_STATEMENTS=$USAGE_DB_UNNAMED_STATEMENTS"
log=$(mktemp)
status=0
cargo test "${@:---all-targets}" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { passed += $4; failed += $6 }
     END { printf "tests through PgBouncer: %d passed, %d failed\n", passed, failed }' "$log"
rm -f "$log"
exit "$status"
