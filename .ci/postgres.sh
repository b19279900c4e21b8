# Sourced by .ci/setup.sh (the test command): the PostgreSQL server the fleet database
# tests connect to (tests/_fleetdb.py: postgres@127.0.0.1:5432/test, no password).
#
# test_postgres PORT: when nothing answers on 127.0.0.1:PORT and this runs as root,
# install postgresql if it is missing, start the cluster on PORT (or create one), let the
# postgres role in over loopback without a password, as the tests expect, and create the
# database "test". A server that already answers is never changed: at most its missing
# "test" database is created, or one line says why the tests cannot connect.
# Quiet when there is nothing to do; one line when it does something.

_pg_answers() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# Connect as the tests do; create the database "test" when only it is missing.
# Exit 0: ready; 3: the server wants a password; else 1, with the reason on stdout.
_pg_ready() {
  "$ROOT/.venv/bin/python" - "$1" <<'PY'
import sys

import psycopg

base = f"postgresql://postgres@127.0.0.1:{sys.argv[1]}"
try:
    psycopg.connect(f"{base}/test", connect_timeout=5).close()
    sys.exit(0)
except psycopg.OperationalError as err:
    why = " ".join(str(err).split())
try:
    if 'database "test" does not exist' in why:
        with psycopg.connect(f"{base}/postgres", connect_timeout=5, autocommit=True) as c:
            c.execute("CREATE DATABASE test")
        sys.exit(0)
except psycopg.Error as err:
    why = " ".join(str(err).split())
print(why)
sys.exit(3 if "password" in why or "pg_hba.conf" in why else 1)
PY
}

test_postgres() {
  local port="$1" ver="" name="" conf line why rc
  if _pg_answers "$port"; then
    why=$(_pg_ready "$port") && return 0
    echo "setup: PostgreSQL on 127.0.0.1:$port refuses the tests' connection (set EDGE_TEST_PG): $why" >&2
    return 1
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "setup: no PostgreSQL on 127.0.0.1:$port and not root to start one: its tests skip (in CI they fail)" >&2
    return 1
  fi
  echo "setup: starting PostgreSQL on 127.0.0.1:$port for the fleet database tests (postgres trusted on loopback)" >&2
  if ! command -v pg_lsclusters >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    apt_install postgresql || { echo "setup: could not install postgresql; the fleet database tests need it" >&2; return 1; }
  fi
  read -r ver name < <(pg_lsclusters --no-header 2>/dev/null | awk -v p="$port" '$3 == p { print $1, $2; exit }') || true
  if [ -z "$ver" ]; then
    ver=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    name="edge-sdk-$port"
    pg_createcluster -p "$port" "$ver" "$name" >/dev/null ||
      { echo "setup: pg_createcluster $ver $name failed" >&2; return 1; }
  fi
  _pg_answers "$port" || pg_ctlcluster "$ver" "$name" start >/dev/null ||
    { echo "setup: pg_ctlcluster $ver $name start failed (see /var/log/postgresql/)" >&2; return 1; }
  why=$(_pg_ready "$port") && return 0 || rc=$?
  if [ "$rc" = 3 ]; then
    conf="/etc/postgresql/$ver/$name/pg_hba.conf"
    line="host all postgres 127.0.0.1/32 trust  # edge-sdk .ci/setup.sh: the fleet database tests"
    { grep -qxF "$line" "$conf" || sed -i "1i $line" "$conf"; } &&
      pg_ctlcluster "$ver" "$name" reload >/dev/null && why=$(_pg_ready "$port") && return 0
  fi
  echo "setup: PostgreSQL $ver/$name on 127.0.0.1:$port refuses the tests' connection: $why" >&2
  return 1
}
