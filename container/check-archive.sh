#!/usr/bin/env bash
# Check that an exported image archive (export.sh's cbctseg.tar.gz) loads, and holds the image TAG: what is
# loaded must have TAG's image ID (the digest of its configuration, which names every layer's digest).
# With podman the archive is loaded into a throwaway storage, so every layer is really read and unpacked
# even though TAG is present (that storage needs about the image's size on disk while it lasts); with Docker
# it is loaded into the daemon, where it only re-tags TAG.
# The archive is decompressed on the way in (pigz or gzip): Debian 12's podman 4.3 cannot load a gzipped
# archive itself ("loading tar component manifest.json: archive/tar: invalid tar header"), Docker can.
# Usage: container/check-archive.sh ARCHIVE TAG
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=container/engine.sh
source "$repo/container/engine.sh"
engine_setup
archive="${1:?usage: $0 ARCHIVE TAG}"
tag="${2:?usage: $0 ARCHIVE TAG}"

[[ -r "$archive" ]] || { echo "check-archive: $archive not readable" >&2; exit 1; }
if command -v pigz >/dev/null; then unzip=(pigz -dc); else unzip=(gzip -dc); fi
want="$(engine image inspect --format '{{.Id}}' "$tag")"
want="${want#sha256:}"
start=$SECONDS
if [[ "$CBCTSEG_ENGINE" == podman ]]; then
  store="$(mktemp -d "${TMPDIR:-/var/tmp}/cbctseg-load.XXXXXX")"
  throwaway=(--root "$store/root" --runroot "$store/run")
  cleanup() { podman "${throwaway[@]}" rmi --all --force >/dev/null 2>&1 || true; rm -rf "$store"; }
  trap cleanup EXIT
  loaded="$("${unzip[@]}" "$archive" | podman "${throwaway[@]}" load --quiet)"
  got="$(podman "${throwaway[@]}" images --no-trunc --format '{{.ID}}' | head -1)"
else
  loaded="$("${unzip[@]}" "$archive" | docker load --quiet)"
  got="$(docker image inspect --format '{{.Id}}' "$tag")"
fi
got="${got#sha256:}"
echo "check-archive: $loaded" >&2
if [[ "$got" != "$want" ]]; then
  echo "check-archive: $archive holds image ${got:-none}, not $tag ($want)" >&2
  exit 1
fi
echo "check-archive: $archive loads as $tag (${want:0:12}) in $((SECONDS - start)) s" >&2
