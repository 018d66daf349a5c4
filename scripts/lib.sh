# Shared by demo.sh and test.sh: run as root, install Debian packages when missing.
# Sourced, not run. Callers define die() (message, exit 1).

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# apt_install PACKAGE... : installs them, and stops the system redis-server the package may
# start (our servers use their own ports; don't leave one holding 6379).
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update
    as_root apt-get install -y "$@"
    as_root service redis-server stop 2>/dev/null || true
}
