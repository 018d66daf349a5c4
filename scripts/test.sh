#!/usr/bin/env bash
# Runs the quality gates (cargo fmt --check, cargo clippy -D warnings) and the whole test
# suite: unit tests, integration tests (against real redis-server
# processes on free ports) and doc tests. Extra arguments go to `cargo test`, for example
#   scripts/test.sh -- --nocapture
#   scripts/test.sh --test it failover
# On a fresh Debian/Ubuntu machine it installs redis-server and etcd-server (apt) and
# redis-py (pip) first when they are missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() {
    echo "test.sh: $*" >&2
    exit 1
}
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

command -v cargo >/dev/null 2>&1 || die "cargo not found on PATH; install Rust (https://rustup.rs) first"

if ! command -v redis-server >/dev/null 2>&1; then
    echo "test.sh: redis-server not found; installing it with apt-get"
    apt_install redis-server
fi

# etcd, for the centralized mode's tests (tests/it/modes.rs start their own on free ports).
if ! command -v etcd >/dev/null 2>&1; then
    echo "test.sh: etcd not found; installing it with apt-get"
    apt_install etcd-server
fi

# redis-py, for the scenario in tests/py/ (a second real client besides redis-rs).
if ! python3 -c 'import redis' >/dev/null 2>&1; then
    echo "test.sh: redis-py not found; installing it with pip"
    python3 -m pip install --quiet 'redis>=5,<9' \
        || python3 -m pip install --quiet --break-system-packages 'redis>=5,<9' \
        || apt_install python3-redis
fi

echo "test.sh: $(redis-server --version)"
# The quality gates first: a change that is not formatted or not clippy-clean does not land.
cargo fmt --check || die "cargo fmt --check failed: run cargo fmt"
cargo clippy --locked --all-targets -- -D warnings || die "cargo clippy found warnings"
cargo test --locked "$@"
# The integration tests again, with every proxy multiplexing (proxy.multiplex = true): the
# differential harness and every scenario must hold in both models.
echo "test.sh: the integration tests again with proxy.multiplex = true"
GEOPROXY_TEST_MULTIPLEX=1 exec cargo test --locked --test it "$@"
