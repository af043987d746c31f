#!/usr/bin/env bash
# Build the grand-challenge image, with Docker or podman (container/engine.sh: Docker where its daemon
# answers, else podman; CBCTSEG_ENGINE=docker|podman chooses).
# Usage: ./build.sh [TAG] [extra build arguments, e.g. --build-arg TORCH_CUDA=cu130]
# TAG defaults to $CBCTSEG_TAG, else cbctseg.
# CBCTSEG_BUILD_CA=FILE (podman only): a CA bundle mounted over the image's during the build's RUN steps,
# for networks whose HTTPS proxy re-signs traffic with a CA only the host knows; it is not kept in the image.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=container/engine.sh
source "$repo/container/engine.sh"
engine_setup
tag="${1:-${CBCTSEG_TAG:-cbctseg}}"
shift $(( $# > 0 ? 1 : 0 ))

# grand-challenge runs linux/amd64; say so, for builds on ARM machines (Apple silicon).
args=(--platform linux/amd64 --tag "$tag")
if [[ "$CBCTSEG_ENGINE" == podman ]]; then
  # podman's default OCI format has no SHELL instruction (the Dockerfile's pipefail would be dropped)
  args+=(--format docker)
  if [[ -n "${CBCTSEG_BUILD_CA:-}" ]]; then
    [[ -r "$CBCTSEG_BUILD_CA" ]] || { echo "build: CBCTSEG_BUILD_CA=$CBCTSEG_BUILD_CA not readable" >&2; exit 1; }
    args+=(--volume "$(realpath "$CBCTSEG_BUILD_CA"):/etc/ssl/certs/ca-certificates.crt:ro")
  fi
elif [[ -n "${CBCTSEG_BUILD_CA:-}" ]]; then
  echo "build: CBCTSEG_BUILD_CA needs podman (docker build mounts no volumes)" >&2
  exit 1
fi
start=$SECONDS
engine build "${args[@]}" "$@" "$repo"
echo "build: $tag built with $CBCTSEG_ENGINE in $((SECONDS - start)) s" >&2
