#!/usr/bin/env bash
# Watches a test run for a hung test binary: any process whose executable lies under
# `<target>/debug/deps/` (a test binary, or a child it started from itself) that has run
# longer than the limit gets every thread's stack printed (with gdb, when installed) and is
# then killed, so that the run fails in minutes with the place it hung rather than running
# into the CI's time limit with nothing to show.
#
# Usage: tools/test-watchdog.sh <target-dir> <limit-seconds> &   (kill it when the run ends)
set -uo pipefail

target=$(realpath -m "${1:?usage: test-watchdog.sh <target-dir> <limit-seconds>}")
limit=${2:?usage: test-watchdog.sh <target-dir> <limit-seconds>}
deps="$target/debug/deps/"

while sleep 15; do
    for proc in /proc/[0-9]*; do
        pid=${proc#/proc/}
        exe=$(readlink "$proc/exe" 2>/dev/null) || continue
        case "$exe" in "$deps"*) ;; *) continue ;; esac
        age=$(ps -o etimes= -p "$pid" 2>/dev/null | tr -d ' ') || continue
        [ -n "$age" ] && [ "$age" -gt "$limit" ] || continue
        echo
        echo "== test-watchdog: pid $pid has run ${age} s (limit ${limit} s): $(tr '\0' ' ' <"$proc/cmdline" 2>/dev/null)"
        if command -v gdb >/dev/null 2>&1; then
            timeout 120 gdb -p "$pid" -batch -ex "thread apply all bt" 2>&1 \
                | grep -E '^(Thread|#)' | head -n 600
        else
            echo "(gdb is not installed: no stacks)"
        fi
        echo "== test-watchdog: killing pid $pid"
        kill -9 "$pid" 2>/dev/null
    done
done
