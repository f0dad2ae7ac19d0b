#!/usr/bin/env bash
# Builds a Docker image with Snakemake inside, from Debian packages, with no registry: the
# image the jobs of Snakemake's TES executor run in (docs/guide.md, "Workflow engines (TES)").
#
#   scripts/snakemake-image.sh TAG [ROOT]
#
# debootstraps a minimal Debian root into ROOT (default: a new temp folder), installs the
# packages below into /opt/tool inside it with pip, puts the wheels of the storage plugin that
# the executor makes every job `pip install` into /opt/wheels (jobs then install offline), and
# `docker import`s the root as TAG. A ROOT that a run completed is imported again as it is.
# Needs root, debootstrap, and network to Debian and PyPI; about two minutes on two cores.
# tests/workflow_engines.py runs it (its cache key is this file's sha256) and installs the
# same PIP_PACKAGES on the host, for the host's Snakemake must match the jobs'.
set -euo pipefail
SUITE=bookworm
DEBS=python3,python3-venv,python3-pip,ca-certificates
PIP_PACKAGES="snakemake==9.27.1 snakemake-executor-plugin-tes==0.1.3 snakemake-storage-plugin-s3==0.3.6"
JOB_WHEELS="snakemake-storage-plugin-s3==0.3.6"

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 TAG [ROOT]  (e.g. $0 snakemake:local /var/tmp/snakemake-root)" >&2
  exit 2
fi
tag=$1
root=${2:-$(mktemp -d)/root}
if [ "$(id -u)" != 0 ]; then
  echo "$0: building the root needs root (debootstrap, chroot): run it with sudo" >&2
  exit 1
fi
command -v debootstrap >/dev/null || {
  echo "$0: debootstrap is missing: apt-get install debootstrap" >&2
  exit 1
}

mkdir -p "$(dirname "$root")"
if [ ! -e "$root/.complete" ]; then
  if [ ! -e "$root/.debootstrap-done" ]; then # else: resume after a failed pip step
    rm -rf "$root"
    debootstrap --variant=minbase --include="$DEBS" "$SUITE" "$root" >"$root.debootstrap.log" 2>&1 || {
      tail -20 "$root.debootstrap.log" >&2
      exit 1
    }
    touch "$root/.debootstrap-done"
  fi
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  # the host's CA bundle: pip reaches PyPI through whatever the host trusts
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  # a clean environment: the host's PIP_* settings name host folders
  env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    /usr/sbin/chroot "$root" sh -ec "
      rm -rf /opt/tool /opt/wheels
      python3 -m venv /opt/tool
      /opt/tool/bin/pip install -q --no-cache-dir $PIP_PACKAGES
      /opt/tool/bin/pip freeze > /opt/tool/constraints.txt
      /opt/tool/bin/pip wheel -q --no-cache-dir -c /opt/tool/constraints.txt -w /opt/wheels $JOB_WHEELS"
  rm -f "$root"/var/cache/apt/archives/*.deb "$root/.debootstrap-done"
  : >"$root/etc/resolv.conf" # Docker writes each container's own
  touch "$root/.complete"
fi

tar -C "$root" --exclude=./.complete -c . | docker import \
  -c 'ENV PATH=/opt/tool/bin:/usr/local/bin:/usr/bin:/bin' -c 'ENV HOME=/tmp' \
  -c 'ENV PIP_NO_INDEX=1' -c 'ENV PIP_FIND_LINKS=/opt/wheels' -c 'ENV PIP_DISABLE_PIP_VERSION_CHECK=1' \
  -c "LABEL asman.content=${ASMAN_CONTENT:-}" - "$tag" >/dev/null
echo "$tag"
