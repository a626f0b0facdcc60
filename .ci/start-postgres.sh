#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on 127.0.0.1:55432 for the Optuna storage tests and
# print its URL. Idempotent: if a server already answers there, only the role and database
# are ensured. Installs Debian's postgresql when missing. No systemd on the development and CI
# machines, so the server is started with pg_ctl directly (docs/environments.md, "PostgreSQL for
# the storage tests").
#
#   URL: postgresql+psycopg2://kit:kit@127.0.0.1:55432/kit_optuna
#
# The role's password is a fixed test value on a loopback-only server, not a secret.
set -euo pipefail

port=55432
base=/tmp/kitpg            # data directory and log, owned by the server's user
sock=/tmp/kitpg-sock       # unix socket directory
data="$base/data"
log="$base/postgres.log"
url="postgresql+psycopg2://kit:kit@127.0.0.1:$port/kit_optuna"

say() { echo "start-postgres: $*" >&2; }

bindir() {
    # Debian keeps the server binaries out of PATH, one folder per major version.
    local d
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return; fi
    d="$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")"
    [ -x "$d/initdb" ] && echo "$d"
}

if [ "$(id -u)" = 0 ]; then
    user=postgres
    as_db() { runuser -u postgres -- "$@"; }
else
    # initdb refuses root only; any other user can own a private cluster.
    user="$(id -un)"
    as_db() { "$@"; }
fi

bin="$(bindir || true)"
if [ -z "$bin" ]; then
    [ "$(id -u)" = 0 ] || { say "postgresql is not installed and installing needs root"; exit 1; }
    say "installing Debian's postgresql"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    bin="$(bindir)"
fi

psql_db() { as_db "$bin/psql" -h "$sock" -p "$port" -d postgres -v ON_ERROR_STOP=1 -qtA "$@"; }

if "$bin/pg_isready" -q -h 127.0.0.1 -p "$port"; then
    say "a server already answers on 127.0.0.1:$port; not starting another"
else
    # A fresh cluster every time the server is not running: the tests own its contents.
    [ -f "$data/postmaster.pid" ] && as_db "$bin/pg_ctl" -D "$data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$base" "$sock"
    mkdir -p "$base" "$sock"
    chown "$user" "$base" "$sock"
    chmod 700 "$base"
    as_db "$bin/initdb" -D "$data" --auth-local=peer --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    # -l: without a log file pg_ctl keeps the caller's pipe open and a CI step hangs.
    as_db "$bin/pg_ctl" -D "$data" -w -t 60 -l "$log" \
        -o "-p $port -c listen_addresses=127.0.0.1 -c fsync=off -k $sock" start >/dev/null
    say "started PostgreSQL ($("$bin/postgres" --version | awk '{print $3}')) in $data, log $log"
fi

if [ "$(psql_db -c "SELECT 1 FROM pg_roles WHERE rolname = 'kit'")" != 1 ]; then
    psql_db -c "CREATE ROLE kit LOGIN PASSWORD 'kit'"
fi
if [ "$(psql_db -c "SELECT 1 FROM pg_database WHERE datname = 'kit_optuna'")" != 1 ]; then
    psql_db -c "CREATE DATABASE kit_optuna OWNER kit"
fi
echo "$url"
