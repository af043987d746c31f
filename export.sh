#!/usr/bin/env bash
# Write the files to upload to grand-challenge.
# Usage: ./export.sh [all|image|model] [TAG]
#   image: cbctseg.tar.gz, the saved image (build it first with ./build.sh), a docker-archive that
#          `docker load` and `podman load` accept; Docker or podman as container/engine.sh chooses,
#          compressed with pigz (parallel) when installed, else gzip
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
trap 'rm -f "$dest/cbctseg.tar.gz.part" "$dest/model.tar.gz.part"' EXIT

if [[ "$what" != model ]]; then
  # shellcheck source=container/engine.sh
  source "$repo/container/engine.sh"
  engine_setup
  save=(save)
  [[ "$CBCTSEG_ENGINE" == podman ]] && save+=(--format docker-archive)
  if command -v pigz >/dev/null; then gz=(pigz -c); else gz=(gzip -c); fi
  start=$SECONDS
  # Written under a temporary name first, so an interrupted export never looks complete.
  engine "${save[@]}" "$tag" | "${gz[@]}" > "$dest/cbctseg.tar.gz.part"
  mv "$dest/cbctseg.tar.gz.part" "$dest/cbctseg.tar.gz"
  echo "image: $dest/cbctseg.tar.gz ($(du -h "$dest/cbctseg.tar.gz" | cut -f1), $CBCTSEG_ENGINE save | ${gz[0]}," \
       "$((SECONDS - start)) s)"
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
