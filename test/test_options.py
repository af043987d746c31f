"""Per-case options: bad values are refused where they enter (command line or code), never run."""
from __future__ import annotations

import pytest

from cbctseg.cli import build_parser
from cbctseg.options import CaseOptions


@pytest.mark.parametrize("command", ["predict", "cohort"])
@pytest.mark.parametrize("option, value", [("--step-size", "0"), ("--step-size", "nan"), ("--step-size", "1.5"),
                                           ("--batch-size", "0"), ("--batch-size", "two")])
def test_the_command_line_refuses_bad_case_options(command, option, value, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--input", "in", "--output", "out", option, value])
    assert e.value.code == 2
    assert option in capsys.readouterr().err


def test_predict_and_cohort_give_the_same_options_for_the_same_flags():
    flags = ["--input", "in", "--output", "out", "--step-size", "0.25", "--no-mirroring", "--batch-size", "3",
             "--accumulate", "cpu"]
    predict = CaseOptions.from_args(build_parser().parse_args(["predict", *flags]), progress=False)
    cohort = CaseOptions.from_args(build_parser().parse_args(["cohort", *flags]), progress=False)
    assert predict == cohort == CaseOptions(step_size=0.25, mirroring=False, batch_size=3, accumulate="cpu")


@pytest.mark.parametrize("bad", [{"step_size": 0.0}, {"step_size": float("nan")}, {"batch_size": 0},
                                 {"accumulate": "gpu"}, {"compile": "yes"}, {"in_flight": 0}])
def test_options_made_in_code_are_checked_too(bad):
    with pytest.raises(ValueError):
        CaseOptions(**bad)
