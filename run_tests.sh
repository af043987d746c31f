#!/usr/bin/env bash
# Set up, then run the test suite (arguments go to pytest).
# With 2 or more CPU cores the tests run in parallel streams (CBCTSEG_TEST_STREAMS, default 2; 1: one pytest
# process): each stream is a pytest process on the same selection that runs the test modules no other stream
# has taken (test/conftest.py), with torch's threads split between them. The first stream reports as it goes,
# the others when it is done.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${CBCTSEG_VENV:-$repo/.venv}"
"$repo/scripts/setup.sh"
cd "$repo"
export PATH="$venv/bin:$PATH"
cores="$(nproc)"
streams="${CBCTSEG_TEST_STREAMS:-$(( cores >= 2 ? 2 : 1 ))}"
if (( streams <= 1 )); then
  exec "$venv/bin/python" -m pytest "$@"
fi
claims="$(mktemp -d)"
pids=()
# the other streams end with this one, interrupted too
trap 'if (( ${#pids[@]} )); then kill "${pids[@]}" 2>/dev/null || true; fi; rm -rf "$claims"' EXIT
# each stream's threads on its share of the cores; threads beyond (nnU-Net's training takes every core) wait
# asleep rather than spinning, where they would take the cores from the other stream
export CBCTSEG_TEST_CLAIMS="$claims" OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / streams > 0 ? cores / streams : 1 ))}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
for (( k = 1; k < streams; k++ )); do
  "$venv/bin/python" -m pytest "$@" > "$claims/stream$k.log" 2>&1 &
  pids+=("$!")
done
rc=0
"$venv/bin/python" -m pytest "$@" || rc=$?
for (( k = 1; k < streams; k++ )); do
  status=0
  wait "${pids[k - 1]}" || status=$?
  echo "=== stream $((k + 1)) of $streams ==="
  cat "$claims/stream$k.log"
  if (( rc == 0 )); then rc=$status; fi
done
pids=()
exit "$rc"
