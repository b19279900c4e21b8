# Sourced by .ci/test and .ci/demo: a venv in .venv with the asked extras, and mosquitto.
# Usage: source .ci/setup.sh EXTRAS   (e.g. "dev" or "agent,convert")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EXTRAS="${1:-dev}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }
apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 1
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    echo "setup: installing python3-venv" >&2
    apt_install python3-venv || { echo "setup: cannot create a venv; install python3-venv" >&2; exit 1; }
    "$PY" -m venv .venv
  fi
fi
STAMP=".venv/.edge-sdk-$EXTRAS-$(cat pyproject.toml .ci/constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "setup: installing edge-sdk[$EXTRAS] into .venv (first run takes a few minutes)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
  # PYTHONWARNINGS quiets setuptools' build-backend notices; pip's own errors still show.
  if ! PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q --disable-pip-version-check \
      -c .ci/constraints.txt -e ".[$EXTRAS]" > .venv/pip-install.log 2>&1; then
    grep -v '^WARNING: Location' .venv/pip-install.log >&2 || true
    echo "setup: pip install of edge-sdk[$EXTRAS] failed (log: .venv/pip-install.log)" >&2
    exit 1
  fi
  grep -v '^WARNING: Location' .venv/pip-install.log >&2 || true
  touch "$STAMP"
fi

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "setup: installing mosquitto from the system packages" >&2
  apt_install mosquitto || echo "setup: could not install mosquitto (not root?); MQTT parts need it" >&2
fi
# The NATS cluster tests (tests/test_nats_cluster.py): Debian's nats-server (2.9).
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
  echo "setup: installing nats-server from the system packages" >&2
  apt_install nats-server || echo "setup: could not install nats-server (not root?); the NATS cluster tests need it" >&2
fi
# The fleet page's browser test (tests/test_fleet_web_browser.py): Debian's chromium.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  echo "setup: installing chromium and chromium-driver from the system packages" >&2
  apt_install chromium chromium-driver || echo "setup: could not install chromium (not root?); the fleet page's browser test needs it" >&2
fi
# The arm64 job (tests/test_arm64.py, via .ci/arm64-rootfs.sh): an emulated Debian rootfs.
if [ "$EXTRAS" = dev ]; then
  missing=()
  for pair in qemu-aarch64-static:qemu-user-static update-binfmts:binfmt-support \
      debootstrap:debootstrap zstd:zstd; do
    PATH="$PATH:/usr/sbin" command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]} from the system packages (the arm64 job)" >&2
    apt_install "${missing[@]}" || echo "setup: could not install ${missing[*]} (not root?); the arm64 job needs them" >&2
  fi
fi
# The fleet database tests (tests/_fleetdb.py): PostgreSQL on 127.0.0.1:5432, unless
# EDGE_TEST_PG names another server.
if [ "$EXTRAS" = dev ] && [ -z "${EDGE_TEST_PG:-}" ]; then
  source "$ROOT/.ci/postgres.sh"
  test_postgres 5432 || true
fi
# Debian installs mosquitto and nats-server in /usr/sbin, which is not on every user's PATH.
export PATH="$ROOT/.venv/bin:$PATH:/usr/sbin"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
