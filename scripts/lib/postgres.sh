# Sourced by the scripts in scripts/: makes sure a PostgreSQL server answers.
#
# ensure_postgres URL
#   If a server answers at URL, exports PG_URL=URL. Otherwise starts a private
#   throwaway cluster on 127.0.0.1 (installing Debian's postgresql package when
#   the server binaries are missing), exports PG_URL pointing at it, and stops
#   and deletes it when the calling script exits.

pg_log() { printf '==> %s\n' "$*" >&2; }

# True when a server accepts a query at $1.
pg_answers() {
    command -v psql >/dev/null 2>&1 || return 1
    PGCONNECT_TIMEOUT=3 psql "$1" -Atqc 'SELECT 1' >/dev/null 2>&1
}

# The newest directory of PostgreSQL server binaries, installing them if needed.
pg_bindir() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$dir" ] || [ ! -x "$dir/initdb" ]; then
        pg_log "PostgreSQL server binaries not found; installing Debian's postgresql package"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >&2
        dir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi
    printf '%s\n' "$dir"
}

# A TCP port on 127.0.0.1 that nothing listens on.
pg_free_port() {
    local port
    for port in $(seq 55432 55532); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            printf '%s\n' "$port"
            return
        fi
    done
    return 1
}

ensure_postgres() {
    local url=$1
    if pg_answers "$url"; then
        export PG_URL=$url
        return
    fi
    # The server answers but the database does not exist yet: create it.
    local base=${url%%\?*} query=""
    [ "$base" = "$url" ] || query="?${url#*\?}"
    local dbname=${base##*/}
    if [ -n "$dbname" ] && pg_answers "${base%/*}/postgres$query"; then
        pg_log "creating database $dbname"
        psql "${base%/*}/postgres$query" -qc "CREATE DATABASE \"$dbname\"" >&2
        export PG_URL=$url
        return
    fi

    pg_log "no PostgreSQL answers at ${url%%\?*}; starting a throwaway cluster"
    local bindir dir port as_owner=()
    bindir=$(pg_bindir)
    dir=$(mktemp -d /tmp/usage-pg.XXXXXX)
    port=$(pg_free_port)
    # initdb and postgres refuse to run as root: run them as the postgres user.
    if [ "$(id -u)" -eq 0 ]; then
        id postgres >/dev/null 2>&1 || useradd --system --home-dir "$dir" postgres
        chown postgres "$dir"
        as_owner=(runuser -u postgres --)
    fi
    "${as_owner[@]}" "$bindir/initdb" -D "$dir/data" -U postgres -A trust --no-sync >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; return 1; }
    "${as_owner[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300" start >&2 \
        || { cat "$dir/server.log" >&2; return 1; }

    PG_THROWAWAY_STOP="${as_owner[*]} $bindir/pg_ctl -D $dir/data -m fast stop"
    PG_THROWAWAY_DIR=$dir
    trap 'pg_log "stopping the throwaway cluster"; $PG_THROWAWAY_STOP >/dev/null 2>&1; rm -rf "$PG_THROWAWAY_DIR"' EXIT
    export PG_URL="postgres://postgres@127.0.0.1:$port/postgres"
    pg_log "throwaway PostgreSQL at $PG_URL (data in $dir, removed on exit)"
}
