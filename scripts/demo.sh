#!/usr/bin/env bash
# Quick start, one command: install what is missing, bring up `asman dev` (nats-server,
# object store, gateway, worker), run a real job with an input file and output files,
# print the outputs, and stop everything (by PID).
set -euo pipefail
cd "$(dirname "$0")/.."
make -s install >/dev/null
A=.venv/bin/asman
data=${ASMAN_DEMO_DIR:-$(mktemp -d /tmp/asman-demo.XXXXXX)}
nats_port=${ASMAN_DEMO_NATS_PORT:-14222}
http_port=${ASMAN_DEMO_HTTP_PORT:-18080}
export ASMAN_NATS_URL="nats://127.0.0.1:${nats_port}"
export ASMAN_KEY_FILE="$data/client.key"

"$A" dev --data-dir "$data" --nats-port "$nats_port" --http-port "$http_port" >"$data/dev.log" 2>&1 &
dev_pid=$!
trap 'kill -INT $dev_pid 2>/dev/null; wait $dev_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  grep -q "asman dev is up" "$data/dev.log" 2>/dev/null && break
  kill -0 "$dev_pid" 2>/dev/null || { cat "$data/dev.log"; exit 1; }
  sleep 0.2
done
grep -q "asman dev is up" "$data/dev.log" || { cat "$data/dev.log"; echo "asman dev did not come up" >&2; exit 1; }
sed -n '/asman dev is up/,/Ctrl-C/p' "$data/dev.log"

printf 'the quick brown fox\njumps over the lazy dog\n' >"$data/poem.txt"
queue=$(cat "$data/queue")
echo
echo "\$ asman submit $queue asman/busybox:local -f poem.txt --wait -- sh -c '…'"
"$A" submit "$queue" asman/busybox:local -f "$data/poem.txt" --wait -o "$data/outputs" -- \
  sh -c 'echo "counting words in /inputs/poem.txt"; wc -w < /inputs/poem.txt > /outputs/words.txt; mkdir -p /outputs/shout; tr a-z A-Z < /inputs/poem.txt > /outputs/shout/poem.txt'
echo
for f in $(cd "$data/outputs" && find . -type f | sort); do
  echo "== outputs/${f#./}"
  cat "$data/outputs/$f"
done
