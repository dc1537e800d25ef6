#!/bin/sh
# First start: initialise $PGDATA (UTF-8, C.UTF-8 collation) with POSTGRES_USER as superuser,
# password auth from the network, and POSTGRES_DB (POSTGRES_INITDB_ARGS as in the official
# image, e.g. --no-sync for a throwaway test database). Then PostgreSQL itself runs as PID 1.
set -eu
: "${POSTGRES_USER:=postgres}" "${POSTGRES_DB:=$POSTGRES_USER}"
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }

if [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  chown postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 0700 "$PGDATA"
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  auth=scram-sha-256
  if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    [ "${POSTGRES_HOST_AUTH_METHOD:-}" = trust ] || {
      echo "postgres-entrypoint: set POSTGRES_PASSWORD (or POSTGRES_HOST_AUTH_METHOD=trust)" >&2
      exit 1
    }
    auth=trust
  fi
  pwfile=$(mktemp)
  printf '%s\n' "${POSTGRES_PASSWORD:-unused}" >"$pwfile"
  chown postgres "$pwfile"
  as_postgres initdb -D "$PGDATA" -U "$POSTGRES_USER" -E UTF8 --locale=C.UTF-8 \
    --auth-local=trust --auth-host="$auth" --pwfile="$pwfile" ${POSTGRES_INITDB_ARGS:-} >/dev/null
  rm -f "$pwfile"
  printf 'host all all all %s\n' "$auth" >>"$PGDATA/pg_hba.conf"
  printf "listen_addresses = '*'\n" >>"$PGDATA/postgresql.conf"
  if [ "$POSTGRES_DB" != postgres ]; then
    echo "CREATE DATABASE \"$POSTGRES_DB\";" | as_postgres postgres --single -D "$PGDATA" postgres >/dev/null
  fi
  echo "postgres-entrypoint: initialised $PGDATA (UTF-8, database $POSTGRES_DB)"
fi
if [ "${1:-}" = postgres ] && [ "$(id -u)" = 0 ]; then
  exec setpriv --reuid=postgres --regid=postgres --init-groups "$@"
fi
exec "$@"
