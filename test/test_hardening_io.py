"""What grand-challenge and users throw at the I/O: malformed inputs.json, unusable output or temporary space, invalid
budgets, SIGTERM mid-run, long names, shared output folders, FIFOs and headers that point outside the input."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cbctseg.io import gc_io, preflight
from conftest import REPO, WEIGHTS, run_process, write_phantom

OUT_DIR = "images/oral-pharyngeal-segmentation"
FAST = ("--folds", "0", "--no-mirroring", "--device", "cpu")


def _results(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())


def _temporary_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".") or "partial" in p.name]


# --- inputs.json of another shape -----------------------------------------------------------------------

def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


BAD_INPUTS_JSON = {
    "interface as a string": (json.dumps([{"interface": "cbct-image"}]).encode(), "interface is a string"),
    "slug as a list": (json.dumps([{"interface": {"slug": ["cbct-image"], "relative_path": "images/cbct"}}]).encode(),
                       "slug is a list"),
    "relative_path as a number": (json.dumps([{"interface": {"slug": "cbct-image", "relative_path": 3}}]).encode(),
                                  "relative_path is a number"),
    "not UTF-8": (b'[{"interface": {"slug": "cbct-image", "relative_path": "images/\xff\xfe"}}]', "not UTF-8"),
    "deep nesting": (_nested(200_000), "nested too deeply"),
    "an object": (json.dumps({"interface": {"slug": "cbct-image"}}).encode(), "expected a list"),
    "an entry that is a number": (b"[1]", "input 0 is a number"),
    "not JSON": (b"[{", "not valid JSON"),
    "relative_path ../": (json.dumps([{"interface": {"slug": "cbct-image", "relative_path": "../outside"}}]).encode(),
                          "leads outside"),
    "relative_path inner ../": (json.dumps([{"interface": {"slug": "cbct-image",
                                                           "relative_path": "images/../../outside"}}]).encode(),
                                "leads outside"),
    "relative_path absolute": (json.dumps([{"interface": {"slug": "cbct-image", "relative_path": "/etc"}}]).encode(),
                               "leads outside"),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS_JSON))
def test_inputs_json_of_another_shape_is_refused_with_a_message(tmp_path, kind):
    content, phrase = BAD_INPUTS_JSON[kind]
    root = tmp_path / "input"
    write_phantom(root / "images" / "cbct" / "a.mha", shape=(16, 24, 24))
    write_phantom(tmp_path / "outside" / "b.mha", shape=(16, 24, 24))
    (root / "inputs.json").write_bytes(content)
    with pytest.raises(gc_io.InputError) as e:
        gc_io.find_cases(root, tmp_path / "out")
    assert "inputs.json" in str(e.value) and phrase in str(e.value), str(e.value)


def test_inputs_json_inside_the_input_is_followed(tmp_path):
    root = tmp_path / "input"
    write_phantom(root / "elsewhere" / "a.mha", shape=(16, 24, 24))
    (root / "inputs.json").write_text(json.dumps([
        {"interface": {"slug": "age", "kind": "Integer", "relative_path": "age.json"}, "value": 3},
        {"interface": {"slug": "cbct-image", "kind": "Image", "relative_path": "elsewhere"}},
    ]))
    cases = gc_io.find_cases(root, tmp_path / "out")
    assert [c.path for c in cases] == [root / "elsewhere" / "a.mha"]


def test_inputs_json_that_is_a_fifo_is_refused_at_once(tmp_path):
    root = tmp_path / "input"
    write_phantom(root / "images" / "cbct" / "a.mha", shape=(16, 24, 24))
    os.mkfifo(root / "inputs.json")
    with pytest.raises(gc_io.InputError, match="not a regular file"):
        _finishes(lambda: gc_io.find_cases(root, tmp_path / "out"))


@pytest.mark.parametrize("kind", ["deep nesting", "not UTF-8", "interface as a string"])
def test_malformed_inputs_json_gives_results_json_and_non_zero_exit(tmp_path, kind):
    content, phrase = BAD_INPUTS_JSON[kind]
    root = tmp_path / "input"
    write_phantom(root / "images" / "cbct" / "a.mha", shape=(16, 24, 24))
    (root / "inputs.json").write_bytes(content)
    out = tmp_path / "output"
    r = run_process("--input", str(root), "--output", str(out), *FAST)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and phrase in r.stderr
    [entry] = _results(out)
    assert entry["outputs"] == [] and len(entry["error_messages"]) == 1
    assert "inputs.json" in entry["error_messages"][0] and phrase in entry["error_messages"][0]
    assert not list(out.rglob("*.mha"))


# --- preflight: output, temporary space, budget ----------------------------------------------------------

def test_check_output_refuses_a_file_and_an_unwritable_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(preflight.PreflightError, match="is not a folder"):
        preflight.check_output(tmp_path / "file", OUT_DIR)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "images").write_text("x")  # where the label-map folder must go
    with pytest.raises(preflight.PreflightError, match="cannot be made"):
        preflight.check_output(tmp_path / "out", OUT_DIR)
    # sysfs takes no new files, whoever runs the test (root included)
    with pytest.raises(preflight.PreflightError, match="cannot be made"):
        preflight.check_output(Path("/sys"), OUT_DIR)
    preflight.check_output(tmp_path / "new" / "out", OUT_DIR)
    assert (tmp_path / "new" / "out" / OUT_DIR).is_dir()
    assert not _temporary_files(tmp_path / "new")


def test_check_temp_refuses_an_unusable_temporary_directory(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.delenv("TMPDIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "file"))
    with pytest.raises(preflight.PreflightError, match="temporary directory .*file is not writable"):
        preflight.check_temp()
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "file"))
    with pytest.raises(preflight.PreflightError, match="TMPDIR=.*file is not a folder"):
        preflight.check_temp()
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert preflight.check_temp() == tmp_path
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]


@pytest.mark.parametrize("value, ok", [(None, None), ("0", 0.0), ("12.5", 12.5), (30, 30.0),
                                       ("-5", False), ("nan", False), ("inf", False), ("-inf", False),
                                       ("abc", False)])
def test_budget_is_a_finite_number_of_seconds_or_nothing(value, ok):
    if ok is False:
        with pytest.raises(preflight.PreflightError):
            preflight.budget_seconds(value)
    else:
        assert preflight.budget_seconds(value) == ok


@pytest.mark.parametrize("value", ["-5", "nan", "inf"])
def test_invalid_budget_is_refused_on_the_command_line(tmp_path, value):
    r = run_process("--input", str(tmp_path), "--output", str(tmp_path / "out"), "--time-budget", value)
    assert r.returncode == 2 and "--time-budget" in r.stderr and "finite" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_unusable_output_fails_at_once_without_a_traceback(tmp_path):
    inp = tmp_path / "in"
    write_phantom(inp / "a.mha", shape=(16, 24, 24))
    (tmp_path / "file").write_text("x")
    for out, phrase in ((tmp_path / "file", "is not a folder"), (Path("/sys"), "cannot be made")):
        r = run_process("--input", str(inp), "--output", str(out), *FAST)
        assert r.returncode == 2 and phrase in r.stderr, r.stderr[-3000:]
        assert "Traceback" not in r.stderr and "model loaded" not in r.stderr


def test_unusable_tmpdir_fails_before_the_model_loads_with_results_json(tmp_path):
    inp = tmp_path / "in"
    write_phantom(inp / "a.mha", shape=(16, 24, 24))
    (tmp_path / "file").write_text("x")
    out = tmp_path / "out"
    env = dict(os.environ, TMPDIR=str(tmp_path / "file"))
    r = subprocess.run([sys.executable, str(REPO / "process.py"), "--input", str(inp), "--output", str(out),
                        "--weights", str(WEIGHTS), *FAST], capture_output=True, text=True, timeout=600, cwd=REPO,
                       env=env)
    assert r.returncode == 2 and "TMPDIR" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "model loaded" not in r.stderr
    [entry] = _results(out)
    assert entry["inputs"][0]["filename"] == "a.mha" and "TMPDIR" in entry["error_messages"][0]
    assert not list(out.rglob("*.mha"))


def test_missing_model_still_writes_results_json(tmp_path):
    inp = tmp_path / "in"
    write_phantom(inp / "a.mha", shape=(16, 24, 24))
    write_phantom(inp / "b.mha", shape=(16, 24, 24))
    out = tmp_path / "out"
    r = run_process("--input", str(inp), "--output", str(out), "--weights", str(tmp_path / "nowhere"), *FAST)
    assert r.returncode == 2 and "cannot load the model" in r.stderr
    results = _results(out)
    assert [e["inputs"][0]["filename"] for e in results] == ["a.mha", "b.mha"]
    assert all(e["outputs"] == [] and "cannot load the model" in e["error_messages"][0] for e in results)


# --- SIGTERM ---------------------------------------------------------------------------------------------

@pytest.fixture
def start():
    """Start process.py in the background; killed at the end of the test if still running."""
    procs = []

    def _start(inp: Path, out: Path) -> subprocess.Popen:
        procs.append(subprocess.Popen([sys.executable, str(REPO / "process.py"), "--input", str(inp), "--output",
                                       str(out), "--weights", str(WEIGHTS), *FAST], stderr=subprocess.PIPE,
                                      text=True, cwd=REPO))
        return procs[-1]

    yield _start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _read_until(proc: subprocess.Popen, done) -> list[str]:
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if done(lines):
            return lines
    raise AssertionError("the run ended before the awaited point:\n" + "".join(lines[-40:]))


def test_sigterm_mid_run_reports_finished_cases_and_leaves_no_temporary_file(tmp_path, weights, start):
    inp, out = tmp_path / "in", tmp_path / "out"
    names = [f"case{i}.mha" for i in range(6)]
    images = {n: write_phantom(inp / n, shape=(16, 48, 48), seed=i)[0] for i, n in enumerate(names)}
    proc = start(inp, out)
    seen = _read_until(proc, lambda lines: sum(": ok in " in ln for ln in lines) >= 2)
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=300)
    stderr = "".join(seen) + rest
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "terminated by SIGTERM" in stderr
    results = {e["inputs"][0]["filename"]: e for e in _results(out)}
    assert sorted(results) == names
    finished = [n for n in names if not results[n]["error_messages"]]
    failed = [n for n in names if results[n]["error_messages"]]
    assert len(finished) >= 2 and failed, results
    assert finished == names[:len(finished)]  # cases run in order; everything after the stop failed
    for n in finished:
        assert results[n]["outputs"] == [{"type": "metaio_image", "filename": n}]
        label = sitk.ReadImage(str(out / OUT_DIR / n))  # complete and readable
        assert label.GetSize() == images[n].GetSize() and label.GetPixelID() == sitk.sitkUInt8
        assert np.any(sitk.GetArrayFromImage(label))
    for n in failed:
        assert results[n]["outputs"] == [] and "terminated by SIGTERM" in results[n]["error_messages"][0]
    assert sorted(p.name for p in (out / OUT_DIR).iterdir()) == finished
    assert sorted(p.name for p in out.iterdir()) == ["images", "results.json"]
    assert not _temporary_files(out)


def test_sigterm_before_the_first_case_reports_every_case(tmp_path, weights, start):
    inp, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        write_phantom(inp / f"case{i}.mha", shape=(16, 48, 48), seed=i)
    proc = start(inp, out)
    seen = _read_until(proc, lambda lines: "environment:" in lines[-1])
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=300)
    assert proc.returncode == 143, ("".join(seen) + rest)[-3000:]
    results = _results(out)
    assert len(results) == 3
    # the first case may have started before the signal came; none can have finished
    assert all(e["outputs"] == [] and "terminated by SIGTERM" in e["error_messages"][0] for e in results)
    assert not list(out.rglob("*.mha")) and not _temporary_files(out)


# --- temporary names -------------------------------------------------------------------------------------

def _label_case(tmp_path: Path, name: str = "x.mha") -> tuple[np.ndarray, gc_io.Volume]:
    image, label = write_phantom(tmp_path / "in" / name, shape=(16, 24, 24), seed=1)
    return sitk.GetArrayFromImage(label), gc_io.read_volume(tmp_path / "in" / name)


def test_a_255_byte_name_is_written(tmp_path):
    name = "n" * 251 + ".mha"
    assert len(name.encode()) == 255
    labels, vol = _label_case(tmp_path, name)
    gc_io.write_label_map(labels, vol, tmp_path / "out" / name)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / name))), labels)
    assert [p.name for p in (tmp_path / "out").iterdir()] == [name]


def test_label_map_is_written_without_a_system_temporary_directory_and_as_sitk_writes_it(tmp_path, monkeypatch):
    labels, vol = _label_case(tmp_path)
    reference = tmp_path / "reference.mha"
    img = sitk.GetImageFromArray(labels.astype(np.uint8))
    img.SetSpacing(vol.spacing)
    img.SetOrigin(vol.origin)
    img.SetDirection(vol.direction)
    sitk.WriteImage(img, str(reference), useCompression=True)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))  # any use of it would fail
    gc_io.write_label_map(labels, vol, tmp_path / "out" / "x.mha")
    written = tmp_path / "out" / "x.mha"
    assert written.read_bytes() == reference.read_bytes()
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.mha"]


def test_writers_sharing_an_output_folder_never_share_a_temporary_name(tmp_path):
    labels, vol = _label_case(tmp_path)
    names = {gc_io.temporary_file(tmp_path, ".partial.mha").name for _ in range(50)}
    assert len(names) == 50 and all(n.startswith(".cbctseg-") and len(n) < 40 for n in names)
    for n in names:
        gc_io.release_temporary_file(tmp_path / n)
    errors = []

    def writer():
        try:
            for _ in range(15):
                gc_io.write_label_map(labels, vol, tmp_path / "out" / "x.mha")
        except Exception as e:  # noqa: BLE001 - the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "x.mha"))), labels)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.mha"]


# --- input confinement -----------------------------------------------------------------------------------

def _finishes(fn, timeout: float = 60):
    """fn() run in a thread that must end (a read that blocks on a FIFO would not)."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "blocked (e.g. opened a FIFO)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


HEADER = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
          "CompressedData = False\nElementSpacing = 1 1 1\nDimSize = {dims}\nElementType = MET_SHORT\n"
          "ElementDataFile = {data}\n")


def _raw_case(folder: Path, name: str, data: str, dims: str = "16 16 16", payload: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    body = HEADER.format(dims=dims, data=data).encode()
    path.write_bytes(body + (payload or b""))
    return path


def _secret(tmp_path: Path) -> Path:
    """A voxel file outside the input folder that a header must not reach."""
    secret = tmp_path / "secret.raw"
    secret.write_bytes(np.arange(16**3, dtype=np.int16).tobytes())
    return secret


@pytest.mark.parametrize("data, phrase", [
    ("../secret.raw", "outside the image's own folder"),
    ("ABSOLUTE", "outside the image's own folder"),
    ("sub/x.raw", "outside the image's own folder"),
    ("LIST", "LIST"),
    ("slice_%03d.raw 1 16 1", "file pattern"),
])
def test_header_data_outside_the_input_folder_is_refused(tmp_path, data, phrase):
    secret = _secret(tmp_path)
    data = str(secret) if data == "ABSOLUTE" else data
    path = _raw_case(tmp_path / "in", "x.mha", data)
    if data in ("../secret.raw", str(secret)):
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(path))).sum() > 0  # SimpleITK alone would read it
    with pytest.raises(gc_io.InputError) as e:
        gc_io.read_volume(path)
    assert "x.mha" in str(e.value) and phrase in str(e.value), str(e.value)


def test_header_data_beside_the_file_is_read(tmp_path):
    arr = (np.arange(16**3) % 300).astype(np.int16)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.raw").write_bytes(arr.tobytes())
    vol = gc_io.read_volume(_raw_case(tmp_path / "in", "x.mha", "x.raw"))
    np.testing.assert_array_equal(vol.array.ravel(), arr.astype(np.float32))


def test_fifos_are_refused_at_once(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    os.mkfifo(folder / "fifo.mha")
    (folder / "link.mha").symlink_to(folder / "fifo.mha")
    os.mkfifo(folder / "data.raw")
    _raw_case(folder, "fifo_data.mha", "data.raw")
    (folder / "folder.mha").mkdir()
    for name, phrase in (("fifo.mha", "a FIFO"), ("link.mha", "a FIFO"), ("fifo_data.mha", "a FIFO"),
                         ("folder.mha", "a folder")):
        with pytest.raises(gc_io.InputError) as e:
            _finishes(lambda: gc_io.read_volume(folder / name))
        assert name in str(e.value) and "not a regular file" in str(e.value) and phrase in str(e.value)


@pytest.mark.parametrize("dims", ["2097152 2097152 2097152", "4294967296 4294967296 4294967296",
                                  "18446744073709551616 16 16"])
def test_sizes_that_overflow_int64_are_refused(tmp_path, dims):
    path = _raw_case(tmp_path, "big.mha", "LOCAL", dims=dims, payload=b"\0" * 64)
    if dims.startswith("2097152"):
        assert np.prod(np.full(3, 2097152, dtype=np.int64)) < 0  # what an int64 product makes of 2**63
    with pytest.raises(gc_io.InputError, match="big.mha: size .* is not a plausible CBCT volume"):
        gc_io.read_volume(path)


@pytest.mark.parametrize("layout", ["local", "beside", "compressed"])
def test_data_smaller_than_the_header_says_is_refused_before_reading(tmp_path, layout):
    arr = np.ones((16, 16, 16), np.int16)
    folder = tmp_path / "in"
    if layout == "local":
        path = _raw_case(folder, "x.mha", "LOCAL", payload=arr.tobytes()[:-2])
    elif layout == "beside":
        path = _raw_case(folder, "x.mha", "x.raw")
        (folder / "x.raw").write_bytes(arr.tobytes()[:100])
    else:
        folder.mkdir()
        path = folder / "x.mha"
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(path), useCompression=True)
        path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(gc_io.InputError) as e:
        gc_io.read_volume(path)
    assert "x.mha" in str(e.value) and "truncated" in str(e.value), str(e.value)


def test_confinement_failures_are_reported_per_case_while_good_cases_run(tmp_path, weights):
    inp = tmp_path / "input" / "images" / "cbct"
    _raw_case(inp, "escape.mha", "../../secret.raw")
    _secret(tmp_path / "input")
    _raw_case(inp, "list.mha", "LIST")
    _raw_case(inp, "huge.mha", "LOCAL", dims="2097152 2097152 2097152", payload=b"\0" * 64)
    os.mkfifo(inp / "fifo.mha")
    write_phantom(inp / "good.mha", shape=(16, 48, 48), seed=3)
    out = tmp_path / "output"
    r = run_process("--input", str(tmp_path / "input"), "--output", str(out), *FAST, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = {e["inputs"][0]["filename"]: e for e in _results(out)}
    expected = {"escape.mha": "outside the image's own folder", "list.mha": "LIST", "huge.mha": "size",
                "fifo.mha": "not a regular file"}
    for name, phrase in expected.items():
        msg = results[name]["error_messages"][0]
        assert name in msg and phrase in msg and name in r.stderr, msg
    assert results["good.mha"]["error_messages"] == []
    assert sorted(p.name for p in (out / OUT_DIR).iterdir()) == ["good.mha"]


def test_a_case_stopped_after_its_label_map_was_written_is_failed_without_the_file(tmp_path):
    """The stop may come between the rename and the case's report: results.json and the folder must agree."""
    from cbctseg.run import RunRecord, _file_id
    from cbctseg.termination import Terminated

    labels, vol = _label_case(tmp_path)
    cases = [gc_io.Case(n, tmp_path / "in" / "x.mha", tmp_path / "out" / OUT_DIR / n) for n in ("a.mha", "b.mha")]
    run = RunRecord(tmp_path / "out")
    run.cases = cases
    # b.mha: a label map from an earlier run, untouched by this one, is not this run's to remove
    gc_io.write_label_map(labels, vol, cases[1].output_path)
    run.current, run.current_output_before = cases[0], _file_id(cases[0].output_path)
    gc_io.write_label_map(labels, vol, cases[0].output_path)
    run.terminated(Terminated(signal.SIGTERM))
    run.write(None)
    results = _results(tmp_path / "out")
    assert [e["outputs"] for e in results] == [[], []]
    assert "terminated by SIGTERM while" in results[0]["error_messages"][0]
    assert "not started" in results[1]["error_messages"][0]
    assert not cases[0].output_path.exists() and cases[1].output_path.exists()
