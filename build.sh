#!/usr/bin/env bash
# Build the grand-challenge image.
# Usage: ./build.sh [TAG] [extra docker build arguments, e.g. --build-arg TORCH_CUDA=cu130]
# TAG defaults to $CBCTSEG_TAG, else cbctseg.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tag="${1:-${CBCTSEG_TAG:-cbctseg}}"
shift $(( $# > 0 ? 1 : 0 ))
# grand-challenge runs linux/amd64; say so, for builds on ARM machines (Apple silicon).
docker build --platform linux/amd64 --tag "$tag" "$@" "$repo"
