#!/usr/bin/env bash
# The whole test suite, from a fresh machine with only Rust installed.
#
# 1. Installs what the tests need when it is missing (Debian packages with
#    apt-get; a Python venv in .venv with the foreign clients the interop tests
#    use).
# 2. Checks formatting, lints and the API docs (warnings are errors).
# 3. Runs every test of the workspace with cargo-nextest when it is installed
#    (cargo test otherwise), then the doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*"; }

# --- system packages -------------------------------------------------------
missing=()
command -v g++ >/dev/null 2>&1 || missing+=(g++)          # zmq-sys builds libzmq from source
command -v make >/dev/null 2>&1 || missing+=(make)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
# Real servers for the integration tests (each test starts its own on free
# loopback ports; the packages' system services are not used).
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)   # certificates for the NATS TLS test
# etcd-client (the crate) generates its gRPC code with protoc at build time.
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
[ -e /usr/include/google/protobuf/timestamp.proto ] || missing+=(libprotobuf-dev)
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

# --- Python clients for interop tests ---------------------------------------
if ! .venv/bin/python -c 'import zmq, msgpack, msgspec, nats' >/dev/null 2>&1; then
  say "creating .venv with pyzmq, msgpack, msgspec and nats-py"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check pyzmq msgpack msgspec nats-py
fi
export EVENTPLANE_PYTHON="$PWD/.venv/bin/python"

# --- checks -----------------------------------------------------------------
say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy (warnings are errors), default features and with etcd"
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo clippy --workspace --all-targets --all-features --quiet -- -D warnings
say "cargo doc (broken links and other rustdoc warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps --quiet

# --- tests ------------------------------------------------------------------
if cargo nextest --version >/dev/null 2>&1; then
  # Doc tests first (nextest does not run them), so that the run ends with
  # nextest's summary of every other test.
  say "doc tests"
  cargo test --workspace --all-features --doc --quiet
  say "cargo nextest run (all features: etcd included)"
  cargo nextest run --workspace --all-features --no-fail-fast
else
  say "cargo test (install cargo-nextest for a faster, clearer run)"
  cargo test --workspace --all-features --no-fail-fast
fi
