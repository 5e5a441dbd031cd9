#!/usr/bin/env bash
# Runs the Autobahn|Testsuite fuzzing client (RFC 6455 conformance, 517 cases) against a
# fresh `chorus serve`, then judges the cases at the protocol level (see judge.py for why
# Autobahn's own verdicts do not apply to a server that is not an echo server).
#
# Needs Python 2.7 (pyenv has one on these machines) for `autobahntestsuite`, which this
# script installs into it when missing. Takes about 25 minutes: many cases wait for an
# echo that never comes. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/../.."
py2=${PYTHON2:-$HOME/.pyenv/versions/2.7.18/bin/python}
work=$(mktemp -d)
port=${CHORUS_AUTOBAHN_PORT:-18090}
"$py2" -m pip show autobahntestsuite >/dev/null 2>&1 || "$py2" -m pip install -q autobahntestsuite
cargo build --release --bin chorus
printf 'rate_per_s = 1000000.0\nrate_burst = 1000000.0\n' > "$work/chorus.toml"
target/release/chorus serve --data-dir "$work/data" --http "127.0.0.1:$port" \
  --config "$work/chorus.toml" > "$work/server.out" 2> "$work/server.log" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q listening "$work/server.out" && break; sleep 0.1; done
token=$(curl -s "http://127.0.0.1:$port/api/v1/auth/signup" \
  -d '{"email":"autobahn@example.com","password":"correct horse","name":"Autobahn"}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
cat > "$work/fuzzingclient.json" <<JSON
{"outdir": "$work/reports",
 "servers": [{"agent": "chorus", "url": "ws://127.0.0.1:$port/ws/v1/connect?token=$token"}],
 "cases": ["*"], "exclude-cases": [], "exclude-agent-cases": {}}
JSON
(cd "$work" && "$(dirname "$py2")/wstest" -m fuzzingclient -s fuzzingclient.json > wstest.log 2>&1)
echo "reports in $work/reports"
python3 tools/autobahn/judge.py "$work/reports" chorus
