#!/usr/bin/env bash
# Starts the Docker engine when none answers (machines of this kind have no systemd).
set -euo pipefail
if docker info >/dev/null 2>&1; then exit 0; fi
if ! command -v dockerd >/dev/null 2>&1; then
  echo "asman: no Docker engine: install Debian's docker.io (scripts/install-system.sh)" >&2
  exit 1
fi
log=${ASMAN_DOCKERD_LOG:-/tmp/asman-dockerd.log}
nohup dockerd >"$log" 2>&1 &
echo $! >/tmp/asman-dockerd.pid
for _ in $(seq 1 150); do docker info >/dev/null 2>&1 && exit 0; sleep 0.2; done
echo "asman: dockerd did not come up; last lines of $log:" >&2
tail -30 "$log" >&2
exit 1
