#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 for the storage tests and print its SQLAlchemy URL.
# Installs Debian's `postgresql` package when the server binaries are missing. Prints nothing (and exits 0)
# when no server can be had, so the tests then run against SQLite only and say so.
set -u
PORT=${SLIMRAY_PG_PORT:-54329}
DIR=${SLIMRAY_PG_DIR:-/tmp/slimray-pg}
log() { echo "postgres.sh: $*" >&2; }

bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    log "installing Debian's postgresql"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null 2>&1
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  fi
fi
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
  log "no PostgreSQL server available; storage tests run on SQLite only"
  exit 0
fi

# PostgreSQL refuses to run as root: the cluster belongs to the postgres user (or the current one).
user=$(id -un)
[ "$user" = root ] && user=postgres
id "$user" >/dev/null 2>&1 || useradd -r -M postgres 2>/dev/null
run() { if [ "$(id -un)" = "$user" ]; then "$@"; else su "$user" -s /bin/sh -c "$(printf '%q ' "$@")"; fi; }

if ! run "$bin/pg_ctl" -D "$DIR" status >/dev/null 2>&1; then
  if [ ! -f "$DIR/PG_VERSION" ]; then  # a stopped cluster is restarted with its data, not re-created
    rm -rf "$DIR" && mkdir -p "$DIR" && chown "$user" "$DIR"
    run "$bin/initdb" -D "$DIR" -U slimray --auth=trust >/dev/null || { log "initdb failed"; exit 0; }
  fi
  run "$bin/pg_ctl" -D "$DIR" -l "$DIR/server.log" -w \
      -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c fsync=off" start >/dev/null \
      || { log "server did not start (see $DIR/server.log)"; exit 0; }
fi
run "$bin/createdb" -h 127.0.0.1 -p "$PORT" -U slimray slimray_test 2>/dev/null || true
echo "postgresql+psycopg://slimray@127.0.0.1:$PORT/slimray_test"
