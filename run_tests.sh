#!/usr/bin/env bash
# Set up, then run the test suite (arguments go to pytest).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${CBCTSEG_VENV:-$repo/.venv}"
"$repo/scripts/setup.sh"
cd "$repo"
export PATH="$venv/bin:$PATH"
exec "$venv/bin/python" -m pytest "$@"
