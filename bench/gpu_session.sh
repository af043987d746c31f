#!/usr/bin/env bash
# A GPU session's measurements for issue "Fast path" as one `device` call, sized for a session's 15 minutes of
# device time (the machine's start included): the probe's comparison of compiled passes first, then the recorded
# benchmark run with the faster layout.
# Prepare here (pip reaches PyPI; about 3 minutes): bench/device_bundle.sh
# then call the device tool with
#   run(command="bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
# Everything lands in $OUT as it comes (at most 8 files come back): gpu.txt, probe.log, probe/probe.json,
# bench.log, the result JSON (results/<date>-<gpu>-compile-<mode>[-channels-last].json, or results/partial.json
# from a run cut short) and results/README.md (its tables). Copy the result JSON into bench/results/ and the
# probe's into bench/results/probes/, then `bench.py table`.
#
# GPU_SESSION_SECONDS (default 580) is the script's own deadline, below the call's 600 s; PROBE_SECONDS,
# PROBE_STEPS and BENCH_ARGS change what runs (defaults below). Smoke runs on the CPU, with the project's venv,
# or with the bundle and a Python 3.12 that has the device's torch (what the device machine will run):
#   GPU_SESSION_SMOKE=1 OUT=/tmp/gpu-session bench/gpu_session.sh
#   GPU_SESSION_SMOKE=1 GPU_SESSION_BUNDLE=1 GPU_SESSION_PYTHON=/tmp/py312/bin/python OUT=/tmp/gs bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
start=$SECONDS
deadline=${GPU_SESSION_SECONDS:-580}
out=${OUT:?OUT: the folder for the results}
mkdir -p "$out/results" "$out/probe"
left() { echo $((deadline - (SECONDS - start))); }

smoke=${GPU_SESSION_SMOKE:-}
if [[ -n "$smoke" ]]; then
  device=(--device cpu --configuration 3d_fullres_torchres_tiny)
  bench_shapes=(--shapes "48x80x80,56x96x90")
  probe_shapes=(--largest 64x100x110 --median 48x80x80)
else
  # the largest case first: its targets (6x, 12 GB) are the nearest, and a run cut short keeps what came first
  device=() bench_shapes=(--shapes "298x512x512,169x347x371") probe_shapes=()
fi
# the carried packages (GPU_SESSION_BUNDLE=1 in a smoke run tries the bundle with a Python 3.12 here)
if [[ "${GPU_SESSION_BUNDLE:-${smoke:+0}}" != 0 ]]; then
  # shellcheck source=/dev/null
  source .whl/env.sh || { echo "gpu_session: no .whl/env.sh: run bench/device_bundle.sh here and carry .whl" >&2; exit 2; }
fi
python=${GPU_SESSION_PYTHON:-$([[ -n "$smoke" ]] && echo .venv/bin/python || echo python3)}
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu \
    --format=csv 2>&1 || true
  "$python" -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda,
torch.backends.cudnn.version(), torch.cuda.is_available())"
} > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

# 1. The probe (165 s at most): is a compiled channels_last_3d pass faster than the contiguous one
# (inductor keeps a 3-D convolution's layout as it finds it), and where does a pass's time go (profile: kernels by
# kind for the eager, compiled and channels-last compiled pass, as TFLOP/s). The eager variants (forward, cudnn)
# were measured on the H100 already; PROBE_STEPS adds them.
steps=${PROBE_STEPS:-layout,compile,profile}
budget=${PROBE_SECONDS:-150}
timeout --signal=INT --kill-after=10 $((budget + 15)) "$python" bench/probe.py "${device[@]}" "${probe_shapes[@]}" \
  --out "$out/probe" --only "$steps" --budget "$budget" > "$out/probe.log" 2>&1
echo "probe: exit $? after $((SECONDS - start)) s" | tee -a "$out/probe.log"
grep -E "tflops_per_window|_b1\"?:|first_call|profile_|error|done_s" "$out/probe.log" | cut -c1-300 | tail -n 30

# 2. The recorded run: our engine as a user runs it (AOT package; torch.compile if the package cannot be
# built), channels-last where the probe found that pass at least 3 % faster, side by side with nnUNetPredictor,
# both shapes, one timed run each. About 6 minutes, estimated from the H100's 407 s compiled run (fit 83 s, then
# the package, three cold starts, a one-window warm-up per engine, both shapes); results/partial.json keeps what
# a run cut short measured.
layout=$("$python" -c '
import json, sys
try:
    faster = json.load(open(sys.argv[1])).get("channels_last_faster")  # noted by the probe once both are timed
except (OSError, ValueError):
    faster = False
print("--channels-last" if faster else "")' "$out/probe/probe.json")
echo "layout for the recorded run: ${layout:-contiguous}"
read -r -a bench_args <<< "${BENCH_ARGS:---compile aot --aot-fallback --repeats 1 --cold-repeats 1} $layout"
timeout --signal=INT --kill-after=10 $(( $(left) - 5 )) "$python" bench/bench.py "${device[@]}" \
  "${bench_shapes[@]}" "${bench_args[@]}" --out "$out/results" --readme "$out/results/README.md" \
  > "$out/bench.log" 2>&1
echo "bench: exit $? after $((SECONDS - start)) s" | tee -a "$out/bench.log"
tail -n 25 "$out/bench.log"
echo "gpu_session: done in $((SECONDS - start)) s"
