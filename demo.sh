#!/usr/bin/env bash
# Set up, then segment the bundled sample case (test/input) with the bundled demo weights (weights/).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${CBCTSEG_VENV:-$repo/.venv}"
out="${1:-$repo/out/demo}"
"$repo/scripts/setup.sh"
"$venv/bin/python" "$repo/process.py" --input "$repo/test/input" --output "$out" --report "$out/report.json"
echo "label maps: $out/images/oral-pharyngeal-segmentation/"
echo "results.json: $out/results.json, per-case report: $out/report.json"
