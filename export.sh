#!/usr/bin/env bash
# Write the files to upload to grand-challenge.
# Usage: ./export.sh [all|image|model] [TAG]
#   image: cbctseg.tar.gz, the saved image (build it first with ./build.sh)
#   model: model.tar.gz, the contents of weights/ at the archive root: grand-challenge unpacks a model
#          tarball at /opt/ml/model, where process.py looks before its own weights/
# Files go to $CBCTSEG_EXPORT_DIR (default: the repository root). TAG defaults to $CBCTSEG_TAG, else cbctseg.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
what="${1:-all}"
tag="${2:-${CBCTSEG_TAG:-cbctseg}}"
dest="${CBCTSEG_EXPORT_DIR:-$repo}"
case "$what" in
  all|image|model) ;;
  *) echo "usage: $0 [all|image|model] [TAG]" >&2; exit 2 ;;
esac
mkdir -p "$dest"

if [[ "$what" != model ]]; then
  # Written under a temporary name first, so an interrupted export never looks complete.
  docker save "$tag" | gzip -c > "$dest/cbctseg.tar.gz.part"
  mv "$dest/cbctseg.tar.gz.part" "$dest/cbctseg.tar.gz"
  echo "image: $dest/cbctseg.tar.gz ($(du -h "$dest/cbctseg.tar.gz" | cut -f1))"
fi
if [[ "$what" != image ]]; then
  if [[ ! -f "$repo/weights/plans.json" ]]; then
    echo "export: $repo/weights holds no model (plans.json missing)" >&2
    exit 1
  fi
  tar -C "$repo/weights" --exclude '__pycache__' -czf "$dest/model.tar.gz.part" .
  mv "$dest/model.tar.gz.part" "$dest/model.tar.gz"
  echo "model: $dest/model.tar.gz ($(du -h "$dest/model.tar.gz" | cut -f1))"
fi
