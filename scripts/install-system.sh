#!/usr/bin/env bash
# Installs what a fresh machine of this kind lacks for Asman's tests and `asman dev`:
# Debian's Docker engine (started here: there is no systemd), busybox-static (the base of the
# local job images, since no registry is reachable), Chromium for the browser tests, and
# debootstrap (the Snakemake image of the workflow-engine test is built from Debian packages).
# Idempotent: a second run only checks.
set -euo pipefail
need=()
for pkg in docker.io busybox-static chromium debootstrap; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "asman: missing Debian packages: ${need[*]}; run this script as root (sudo $0)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q "${need[@]}"
fi
bash "$(dirname "$0")/start-dockerd.sh"
