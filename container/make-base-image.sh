#!/usr/bin/env bash
# A local stand-in for the Dockerfile's base image, python:3.11-slim-bookworm, for machines that cannot
# pull from Docker Hub: Debian bookworm (minbase, from the host's Debian mirror through mmdebstrap) with
# Python 3.11 in a venv at /opt/venv, a current pip, PATH and LANG as the official image sets them. It is
# tagged with the name the Dockerfile's FROM asks for, so builds on this machine use it without pulling.
# The official image differs in details (its Python is built from source in /usr/local); the app runs on
# either. Nothing is done when an image of that name exists already (CBCTSEG_BASE_REBUILD=1 rebuilds).
#
# Usage: container/make-base-image.sh        (as root on Debian: apt-get install mmdebstrap podman)
# Needs podman (or docker) and mmdebstrap; the host's CA bundle is used to upgrade pip during the bootstrap
# (where outgoing HTTPS is re-signed by a proxy, only the host's bundle knows its CA), never kept.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=container/engine.sh
source "$repo/container/engine.sh"
engine_setup

base="$(sed -n 's/^FROM \([^ ]*\).*/\1/p' "$repo/Dockerfile" | head -1)"
[[ "$base" == python:3.11-slim-bookworm ]] || {
  echo "make-base-image: the Dockerfile's base is '$base'; this script makes python:3.11-slim-bookworm only" >&2
  exit 1
}
name="docker.io/library/$base"
if [[ "${CBCTSEG_BASE_REBUILD:-0}" != 1 ]] && engine image inspect "$name" >/dev/null 2>&1; then
  echo "make-base-image: $name exists, nothing to do" >&2
  exit 0
fi
command -v mmdebstrap >/dev/null || { echo "make-base-image: mmdebstrap not found (apt-get install mmdebstrap)" >&2; exit 1; }

# The host's bookworm mirror (deb822 sources first, then the classic list), else Debian's own.
mirror="$(awk '/^URIs:/ {u=$2} /^Suites:/ {for (i = 2; i <= NF; i++) if ($i == "bookworm") {print u; exit}}' \
  /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
if [[ -z "$mirror" ]]; then
  mirror="$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"
ca="${CBCTSEG_BUILD_CA:-/etc/ssl/certs/ca-certificates.crt}"
[[ -r "$ca" ]] || { echo "make-base-image: CA bundle $ca not readable (set CBCTSEG_BUILD_CA)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$SECONDS
echo "make-base-image: bootstrapping bookworm from $mirror (a few minutes)" >&2
# No man pages, docs or locales, as in the official slim images; copyright files stay. The hooks' "$1" is
# mmdebstrap's root folder, expanded by mmdebstrap, not here.
# shellcheck disable=SC2016
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates,netbase,tzdata \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --customize-hook='chroot "$1" python3 -m venv /opt/venv' \
  --customize-hook="cp '$ca' \"\$1/tmp/host-ca.crt\"" \
  --customize-hook='chroot "$1" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin /opt/venv/bin/python -m pip install -q --no-cache-dir --cert /tmp/host-ca.crt --upgrade pip' \
  --customize-hook='rm -f "$1/tmp/host-ca.crt"' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
  bookworm "$work/rootfs.tar" "$mirror"
engine import \
  --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
  "$work/rootfs.tar" "$name" >/dev/null
echo "make-base-image: $name ready in $((SECONDS - start)) s" >&2
