"""The GPU session's one prepared call (bench/gpu_session.sh), run as its CPU smoke run.

A session lent a GPU gets one call of at most 10 minutes, so the script has to work before device time is spent
on it: the probe's comparison of compiled passes, then the recorded benchmark run (AOT package, cold starts, both
engines side by side) in the layout the probe found faster, with what comes back fitting the device tool's
limits on $OUT.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from conftest import REPO

# what a device call brings back from $OUT (/work/.library/device/README.md): at most 8 files, no more than two
# folders down, named in letters, digits, '.', '_' and '-'
MAX_FILES, MAX_DEPTH = 8, 3
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def test_the_gpu_session_script_runs_end_to_end_within_a_device_calls_limits(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "GPU_SESSION_SMOKE": "1", "GPU_SESSION_PYTHON": sys.executable, "OUT": str(out)}
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_session.sh")], env=env, capture_output=True, text=True,
                       timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "bench: exit 0" in r.stdout and "probe: exit 0" in r.stdout, r.stdout[-3000:]

    # the probe compared the compiled passes and profiled them, without an error
    probe = json.loads((out / "probe" / "probe.json").read_text())
    assert {"compiled_b1", "compiled_channels_last_b1", "profile_compiled",
            "profile_compiled_channels_last"} <= probe.keys()
    assert not [k for k in probe if k.endswith("_error")], {k: v for k, v in probe.items() if k.endswith("_error")}
    channels_last = probe["channels_last_faster"]

    # the recorded run finished (no partial.json) with the AOT package in the faster layout, and measured both
    # engines
    [path] = (out / "results").glob("*.json")
    result = json.loads(path.read_text())
    assert path.name.endswith("-compile-aot-channels-last.json" if channels_last else "-compile-aot.json")
    assert result["complete"] and result["settings"]["channels_last"] == channels_last
    assert result["settings"]["compile"] == "aot" and "aot_package" in result
    assert set(result["cold_start"]) == {"ours", "ours_eager", "nnunet"}
    assert len(result["cases"]) == 2
    for case in result["cases"]:
        assert case["ours"]["compile"]["kind"] == "aot"
        assert case["ours"]["end_to_end"] > 0 and case["nnunet"]["end_to_end"] > 0
        assert 0.99 <= case["agreement"] <= 1.0
    assert "| run |" in (out / "results" / "README.md").read_text()

    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert len(files) <= MAX_FILES, files
    assert all(len(f.parts) <= MAX_DEPTH and all(NAME.match(part) for part in f.parts) for f in files), files
