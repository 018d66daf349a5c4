#!/usr/bin/env bash
# Runs the whole test suite: unit tests, integration tests (against real redis-server
# processes on free ports) and doc tests. Extra arguments go to `cargo test`, for example
#   scripts/test.sh -- --nocapture
#   scripts/test.sh --test it failover
# On a fresh Debian/Ubuntu machine it installs redis-server (apt) and redis-py (pip) first
# when they are missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "test.sh: need root (or sudo) to run: $*" >&2
        exit 1
    fi
}

if ! command -v cargo >/dev/null 2>&1; then
    echo "test.sh: cargo not found on PATH; install Rust (https://rustup.rs) first" >&2
    exit 1
fi

if ! command -v redis-server >/dev/null 2>&1; then
    echo "test.sh: redis-server not found; installing it with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update
    as_root apt-get install -y redis-server
    # The package may start a system redis-server on port 6379; the tests use their own
    # servers on free ports, so stop it rather than leave it running.
    as_root service redis-server stop 2>/dev/null || true
fi

# redis-py, for the scenario in tests/py/ (a second real client besides redis-rs).
if ! python3 -c 'import redis' >/dev/null 2>&1; then
    echo "test.sh: redis-py not found; installing it with pip"
    python3 -m pip install --quiet 'redis>=5,<9' \
        || python3 -m pip install --quiet --break-system-packages 'redis>=5,<9' \
        || { as_root apt-get update && as_root apt-get install -y python3-redis; }
fi

echo "test.sh: $(redis-server --version)"
exec cargo test --locked "$@"
