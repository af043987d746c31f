#!/usr/bin/env bash
# Build the image, run it on test/input the way grand-challenge runs an algorithm, and compare the
# result with test/expected_output (test/compare_outputs.py, run inside the image: only the container
# engine is needed on the host). Docker or podman: container/engine.sh (CBCTSEG_ENGINE=docker|podman).
# Usage: ./test.sh [TAG]     (TAG defaults to $CBCTSEG_TAG, else cbctseg)
# Environment: CBCTSEG_TEST_MEMORY (8g), CBCTSEG_TEST_SHM (128m), CBCTSEG_TEST_PIDS (256),
#   CBCTSEG_MIN_DICE (0.9), CBCTSEG_TEST_KEEP=DIR (copy /output there), CBCTSEG_TEST_NO_BUILD=1 (reuse).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=container/engine.sh
source "$repo/container/engine.sh"
engine_setup
tag="${1:-${CBCTSEG_TAG:-cbctseg}}"
memory="${CBCTSEG_TEST_MEMORY:-8g}"

if [[ "${CBCTSEG_TEST_NO_BUILD:-0}" != 1 ]]; then
  "$repo/build.sh" "$tag"
fi

# The restrictions of grand-challenge's own algorithm test script; swap as large as memory = none.
limits=(--network none --cap-drop ALL --security-opt no-new-privileges
        --shm-size "${CBCTSEG_TEST_SHM:-128m}" --pids-limit "${CBCTSEG_TEST_PIDS:-256}"
        --memory "$memory" --memory-swap "$memory")
gpus=()
if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
  # podman reaches GPUs through CDI (nvidia-ctk cdi generate, from the NVIDIA container toolkit)
  if [[ "$CBCTSEG_ENGINE" == podman ]]; then gpus=(--device nvidia.com/gpu=all); else gpus=(--gpus all); fi
else
  echo "test: no working nvidia-smi, running on the CPU" >&2
fi

# /output is a fresh volume, as on grand-challenge: it starts owned by the image's user.
volume="cbctseg-output-$$-$RANDOM"
engine volume create "$volume" >/dev/null
trap 'engine volume rm -f "$volume" >/dev/null' EXIT

start=$SECONDS
# ${a[@]+...}: an empty array under `set -u` on bash 3.2 (macOS).
engine run --rm "${limits[@]}" ${gpus[@]+"${gpus[@]}"} \
  --volume "$repo/test/input:/input:ro" --volume "$volume:/output" \
  "$tag"
echo "test: algorithm ran in $((SECONDS - start)) s ($CBCTSEG_ENGINE)" >&2

if [[ -n "${CBCTSEG_TEST_KEEP:-}" ]]; then
  mkdir -p "$CBCTSEG_TEST_KEEP"
  helper="$(engine create --volume "$volume:/output" "$tag")"
  engine cp "$helper:/output/." "$CBCTSEG_TEST_KEEP"
  engine rm "$helper" >/dev/null
  echo "test: output copied to $CBCTSEG_TEST_KEEP" >&2
fi

engine run --rm --network none --cap-drop ALL --security-opt no-new-privileges \
  --volume "$volume:/output:ro" \
  --volume "$repo/test/expected_output:/expected:ro" \
  --volume "$repo/test/compare_outputs.py:/tmp/compare_outputs.py:ro" \
  --entrypoint python "$tag" \
  /tmp/compare_outputs.py --output /output --expected /expected --min-dice "${CBCTSEG_MIN_DICE:-0.9}"
echo "test: passed" >&2
