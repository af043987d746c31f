"""The ensemble file: which models a run uses, each with its folds and weight, and everything refused before a case.

`ensemble.json` in a model tarball or folder lists its models (folders below it, folds, weights); a malformed
file, a folder that leads outside the ensemble, a bad weight, a model listed twice or models that label
differently are a clear ModelError, and `process.py ensemble` builds a checked ensemble folder or leaves nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from cbctseg.model.ensemble import (ENSEMBLE, Member, check_member_labels, check_same_labels, members_for,
                                    normalised_weights, read_ensemble, write_ensemble)
from cbctseg.model.ensemble_build import MemberSpec, build_ensemble
from cbctseg.model.layout import MODEL_DIR_ENV
from cbctseg.model.manifest import MANIFEST, ModelError, build_manifest, read_manifest, write_manifest
from conftest import REPO


def model_copy(weights: Path, dest: Path) -> Path:
    """The bundled weights as another model folder with its own manifest."""
    shutil.copytree(weights, dest, ignore=shutil.ignore_patterns("compile_cache"))
    write_manifest(dest, build_manifest(dest, ["0", "1"], demo=True))
    return dest


@pytest.fixture
def two_models(tmp_path, weights) -> Path:
    """An ensemble folder holding two model folders (a and b) and no ensemble file yet."""
    root = tmp_path / "ens"
    model_copy(weights, root / "a")
    model_copy(weights, root / "b")
    return root


def write_file(root: Path, data) -> Path:
    path = root / ENSEMBLE
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "process.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=env)


def test_no_ensemble_file_is_none(weights):
    assert read_ensemble(weights) is None


def test_members_with_folds_and_weights(two_models):
    write_file(two_models, {"format": 1, "models": [{"folder": "a", "folds": ["1"], "weight": 3},
                                                    {"folder": "b"}]})
    a, b = read_ensemble(two_models)
    assert a == Member(two_models / "a", ("1",), 3.0, "a")
    assert b == Member(two_models / "b", None, 1.0, "b")
    assert normalised_weights([a, b]) == [0.75, 0.25]


def test_member_in_nnunet_results_layout_is_located(tmp_path, weights):
    root = tmp_path / "ens"
    inner = root / "m2" / "Dataset119_ToothFairy2" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    model_copy(weights, root / "m1")
    model_copy(weights, inner)
    write_file(root, {"models": [{"folder": "m1"}, {"folder": "m2", "folds": [0]}]})
    members = read_ensemble(root)
    assert [m.folder for m in members] == [root / "m1", inner]
    assert members[1].folds == ("0",)  # a number is taken as the fold name


def test_write_then_read_round_trip(two_models):
    members = [Member(two_models / "b", ("0", "1"), 0.5), Member(two_models / "a")]
    path = write_ensemble(two_models, members)
    data = json.loads(path.read_text())
    assert data == {"format": 1, "models": [{"folder": "b", "folds": ["0", "1"], "weight": 0.5},
                                            {"folder": "a", "weight": 1.0}]}
    assert [(m.folder, m.folds, m.weight) for m in read_ensemble(two_models)] == \
        [(m.folder, m.folds, m.weight) for m in members]


def test_write_refuses_a_member_outside_the_folder(two_models, weights):
    with pytest.raises(ModelError, match="absolute"):
        write_ensemble(two_models, [Member(two_models / "a"), Member(weights.resolve())])
    assert not (two_models / ENSEMBLE).exists()


BAD_FILES = [
    ("{not json", "unreadable as JSON"),
    ("[]", "not a JSON object"),
    ({"models": []}, "non-empty list"),
    ({"models": "a"}, "non-empty list"),
    ({}, "non-empty list"),
    ({"format": 2, "models": [{"folder": "a"}]}, "format 2"),
    ({"models": [{"folder": "a"}], "wieghts": [1]}, "unknown key 'wieghts'"),
    ({"models": [{"folder": "a", "wieght": 2}]}, r"models\[0\]: unknown key 'wieght'"),
    ({"models": ["a"]}, r"models\[0\] must be an object"),
    ({"models": [{"folds": ["0"]}]}, "no 'folder'"),
    ({"models": [{"folder": "a"}, {"folder": "c"}]}, r"models\[1\]: folder 'c' does not exist"),
    ({"models": [{"folder": ""}]}, "must be a path"),
    ({"models": [{"folder": "."}]}, "the ensemble folder itself"),
    ({"models": [{"folder": "/etc"}]}, "absolute"),
    ({"models": [{"folder": "../ens/a"}]}, "leads outside"),
    ({"models": [{"folder": "a/../b"}]}, "leads outside"),
    ({"models": [{"folder": "a", "weight": 0}]}, "finite number > 0"),
    ({"models": [{"folder": "a", "weight": -1.5}]}, "finite number > 0"),
    ('{"models": [{"folder": "a", "weight": NaN}]}', "finite number > 0"),
    ('{"models": [{"folder": "a", "weight": Infinity}]}', "finite number > 0"),
    ({"models": [{"folder": "a", "weight": "2"}]}, "must be a number"),
    ({"models": [{"folder": "a", "weight": True}]}, "must be a number"),
    ({"models": [{"folder": "a", "folds": []}]}, "non-empty list of fold names"),
    ({"models": [{"folder": "a", "folds": "0"}]}, "non-empty list of fold names"),
    ({"models": [{"folder": "a", "folds": ["0", "0"]}]}, "listed twice"),
    ({"models": [{"folder": "a", "folds": ["../0"]}]}, "not a fold name"),
    ({"models": [{"folder": "a"}, {"folder": "b"}, {"folder": "a/"}]}, r"models\[2\]: .* same model as 'a'"),
]


@pytest.mark.parametrize("data,message", BAD_FILES, ids=[m for _, m in BAD_FILES])
def test_bad_ensemble_file_is_refused(two_models, data, message):
    write_file(two_models, data)
    with pytest.raises(ModelError, match=message) as e:
        read_ensemble(two_models)
    assert ENSEMBLE in str(e.value)


def test_symlink_leading_out_is_refused(two_models, weights):
    (two_models / "outside").symlink_to(weights.resolve(), target_is_directory=True)
    write_file(two_models, {"models": [{"folder": "a"}, {"folder": "outside"}]})
    with pytest.raises(ModelError, match="leads outside .* symbolic link"):
        read_ensemble(two_models)


def test_symlink_to_a_member_is_the_same_model(two_models):
    (two_models / "again").symlink_to("a", target_is_directory=True)
    write_file(two_models, {"models": [{"folder": "a"}, {"folder": "again"}]})
    with pytest.raises(ModelError, match="same model as 'a'"):
        read_ensemble(two_models)


def test_member_without_a_model_says_what_it_holds(two_models):
    (two_models / "empty" / "notes").mkdir(parents=True)
    write_file(two_models, {"models": [{"folder": "a"}, {"folder": "empty"}]})
    with pytest.raises(ModelError, match="holds no model: found notes/"):
        read_ensemble(two_models)


def test_nested_ensemble_is_refused(two_models, weights):
    write_file(two_models / "b", {"models": [{"folder": "x"}]})
    write_file(two_models, {"models": [{"folder": "a"}, {"folder": "b"}]})
    with pytest.raises(ModelError, match="'b' is an ensemble itself"):
        read_ensemble(two_models)
    # an ensemble folder of its own (two models, no model files at its root) as a member
    inner = two_models / "inner"
    model_copy(weights, inner / "x")
    model_copy(weights, inner / "y")
    write_file(inner, {"models": [{"folder": "x"}, {"folder": "y"}]})
    write_file(two_models, {"models": [{"folder": "a"}, {"folder": "inner"}]})
    with pytest.raises(ModelError, match="'inner' is an ensemble itself"):
        read_ensemble(two_models)


def test_models_that_label_differently_are_refused_naming_both(two_models):
    dataset = json.loads((two_models / "b" / "dataset.json").read_text())
    labels = dataset["labels"]
    # left and right swapped in one model: each label still a structure, but not the same one
    swapped = {"Left Maxillary Sinus": "Right Maxillary Sinus", "Right Maxillary Sinus": "Left Maxillary Sinus"}
    dataset["labels"] = {swapped.get(name, name): v for name, v in labels.items()}
    (two_models / "b" / "dataset.json").write_text(json.dumps(dataset))
    members = [Member(two_models / "a"), Member(two_models / "b")]
    with pytest.raises(ModelError) as e:
        check_member_labels(members)
    assert str(e.value) == (
        f"the ensemble's models label differently: label {labels['Left Maxillary Sinus']} is 'Left Maxillary Sinus' "
        f"in {two_models / 'a' / 'dataset.json'} but 'Right Maxillary Sinus' in {two_models / 'b' / 'dataset.json'}; "
        f"all must have the same labels")
    # the same labels with other case and spacing, and nnU-Net's ignore label (no output channel), agree
    dataset["labels"] = {("  ".join(n.upper().split()) if n != "background" else n): v for n, v in labels.items()}
    dataset["labels"]["ignore"] = len(labels)
    (two_models / "b" / "dataset.json").write_text(json.dumps(dataset))
    check_member_labels(members)


def test_missing_label_is_named():
    a = {"labels": {"background": 0, "Lower Jawbone": 1, "Upper Jawbone": 2}}
    b = {"labels": {"background": 0, "lower  jawbone": 1}}
    with pytest.raises(ModelError, match=r"label 2 \('Upper Jawbone'\) is in A but not in B"):
        check_same_labels([("A", a), ("B", b)])
    with pytest.raises(ModelError, match="regions_class_order"):
        check_same_labels([("A", a), ("B", {**a, "regions_class_order": [1, 2]})])


# --- which models a run uses ---

def test_several_weights_are_members_with_weight_one(two_models):
    members = members_for([two_models / "a", two_models / "b"], REPO / "weights", folds=["1"])
    assert members == [Member(two_models / "a", ("1",)), Member(two_models / "b", ("1",))]


def test_the_same_weights_twice_are_refused(two_models):
    with pytest.raises(ModelError, match="same model"):
        members_for([two_models / "a", two_models / "a" / "."], REPO / "weights")


def test_one_folder_with_an_ensemble_file_gives_its_members(two_models):
    write_file(two_models, {"models": [{"folder": "a", "weight": 2}, {"folder": "b", "folds": ["0"]}]})
    assert [(m.name, m.folds, m.weight) for m in members_for(two_models, REPO / "weights")] == \
        [("a", None, 2.0), ("b", ("0",), 1.0)]
    with pytest.raises(ModelError, match="--folds applies to model folders"):
        members_for([two_models], REPO / "weights", folds=["0"])
    with pytest.raises(ModelError, match="cannot be one model of another"):
        members_for([two_models, two_models / "a"], REPO / "weights")


def test_a_single_model_is_one_member(weights, monkeypatch, tmp_path):
    monkeypatch.setenv(MODEL_DIR_ENV, str(tmp_path / "absent"))
    assert members_for(None, weights) == [Member(weights)]
    assert members_for([weights], weights, folds=["0"]) == [Member(weights, ("0",))]


def test_ensemble_tarball_is_found_where_grand_challenge_unpacks_it(two_models, monkeypatch, tmp_path, weights):
    write_file(two_models, {"models": [{"folder": "a"}, {"folder": "b", "weight": 0.5}]})
    for arcname, prefix in ((".", ""), ("myensemble", "myensemble/")):  # files at the root, or in one folder
        tarball = tmp_path / "model.tar.gz"
        with tarfile.open(tarball, "w:gz") as tar:
            tar.add(two_models, arcname=arcname)
        place = tmp_path / f"opt_ml_model_{bool(prefix)}"
        place.mkdir()
        with tarfile.open(tarball) as tar:
            tar.extractall(place, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        monkeypatch.setenv(MODEL_DIR_ENV, str(place))
        members = members_for(None, weights)
        assert [(m.folder, m.weight) for m in members] == [(place / prefix / "a", 1.0), (place / prefix / "b", 0.5)]


# --- process.py ensemble ---

def test_process_ensemble_builds_a_checked_folder(tmp_path, weights):
    out = tmp_path / "built"
    r = run("ensemble", "--out", str(out), "--member", str(weights), "--folds", "1", "--weight", "2",
            "--member", str(model_copy(weights, tmp_path / "other")))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert [m["weight"] for m in summary["models"]] == [2.0, 1.0]
    members = read_ensemble(out)
    assert [(m.name, m.folds, m.weight) for m in members] == [("weights", ("1",), 2.0), ("other", ("0", "1"), 1.0)]
    # only the chosen fold is copied, and the copy's manifest declares just that one, with the same sha256
    assert sorted(p.name for p in (out / "weights").glob("fold_*")) == ["fold_1"]
    copied, source = read_manifest(out / "weights"), read_manifest(weights)
    assert copied.folds == ["1"] and copied.demo == source.demo
    assert copied.files["fold_1/checkpoint_final.pth"] == source.files["fold_1/checkpoint_final.pth"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    check = subprocess.run([sys.executable, "-m", "cbctseg.model.ensemble", str(out)], capture_output=True,
                           text=True, cwd=REPO, timeout=120)
    assert check.returncode == 0, check.stderr
    assert "2 models" in check.stderr and "labels agree" in check.stderr


def test_process_ensemble_refuses_and_leaves_nothing(tmp_path, weights):
    damaged = model_copy(weights, tmp_path / "damaged")
    with open(damaged / "fold_0" / "checkpoint_final.pth", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02\x03")
    out = tmp_path / "built"
    r = run("ensemble", "--out", str(out), "--member", str(weights), "--member", str(damaged))
    assert r.returncode == 2
    assert "fold_0/checkpoint_final.pth does not match" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("args,message", [
    (["--folds", "0", "--member", "M"], "--folds belongs to a --member"),
    (["--member", "M", "--weight", "0"], "must be a finite number > 0"),
    (["--member", "M", "--weight", "nan"], "must be a finite number > 0"),
    (["--member", "M", "--member", "M"], "same model"),
    (["--member", "M/nothing"], "does not exist|holds no model|cannot be read"),
])
def test_process_ensemble_bad_arguments(tmp_path, weights, args, message):
    out = tmp_path / "built"
    args = [a.replace("M", str(weights)) for a in args]
    r = run("ensemble", "--out", str(out), *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert any(part in r.stderr for part in message.split("|")), r.stderr
    assert not out.exists()


def test_build_into_a_folder_with_files_is_refused(tmp_path, weights):
    out = tmp_path / "built"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="not an empty folder"):
        build_ensemble(out, [MemberSpec(weights)])
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_build_refuses_an_ensemble_as_member(two_models, tmp_path, weights):
    write_file(two_models, {"models": [{"folder": "a"}, {"folder": "b"}]})
    with pytest.raises(ModelError, match="is an ensemble"):
        build_ensemble(tmp_path / "built", [MemberSpec(weights), MemberSpec(two_models)])
    assert not (tmp_path / "built").exists()


def test_manifest_of_a_copy_still_holds_every_declared_fold(tmp_path, weights):
    out = tmp_path / "built"
    members = build_ensemble(out, [MemberSpec(weights), MemberSpec(model_copy(weights, tmp_path / "m"), ["0"])])
    assert [m.folds for m in members] == [("0", "1"), ("0",)]
    assert read_manifest(out / "m").folds == ["0"] and not (out / "m" / "fold_1").exists()
    assert os.path.getsize(out / "weights" / MANIFEST) > 0
