"""The `trol` console script and the options every job shares (no Ray started here)."""

from __future__ import annotations

import ast
import importlib.util

import pytest

from jobs import cli
from jobs.job_args import spec_job_parser
from jobs.ray_session import RaySession


def test_trol_help_lists_every_job_and_convert_with_its_own_one_line_description(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for command in ("caption", "finetune", "prepare", "demo", "convert", "tiny"):
        line = next((ln for ln in lines if ln.split()[:1] == [command]), None)
        assert line is not None, f"{command} missing from:\n{out}"
        description = line.split(None, 1)[1]
        assert len(description) > 20 and description.endswith((".", ")")), line
    # Derived from each entry point's docstring, so editing the docstring edits the list.
    origin = importlib.util.find_spec("jobs.finetune").origin
    doc = ast.get_docstring(ast.parse(open(origin).read()))
    assert doc.split(".")[0] in out
    assert "folder" in cli.describe("trol.convert.__main__")  # "python -m ...: what" keeps the what


def test_unknown_command_names_the_commands_and_exits_2(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "finetune" in capsys.readouterr().err


def test_job_parsers_share_address_and_stall_options(capsys):
    parser = spec_job_parser("finetune", "Fine-tune.\n\nmore", "x.yaml")
    args = parser.parse_args(["spec.yaml", "--address", "auto", "--stall-after", "90", "--set", "lr=1"])
    assert (args.address, args.stall_after, args.overrides) == ("auto", 90.0, ["lr=1"])
    assert parser.parse_args(["spec.yaml"]).address is None  # private local Ray unless told
    with pytest.raises(SystemExit):
        parser.parse_args(["spec.yaml", "--stall-after", "0"])
    assert "must be more than 0 seconds" in capsys.readouterr().err
    assert "private local Ray" in parser.format_help()


@pytest.mark.parametrize("command", ["caption", "finetune"])
def test_each_ray_job_takes_address(command, capsys):
    assert cli.main([command, "--help"]) == 0  # the console script's path into each job
    out = capsys.readouterr().out
    assert "--address" in out and "RAY_ADDRESS" in out


def test_session_description_says_where_the_job_runs():
    private = RaySession("private", "10.0.0.1:6379", 2.0, "127.0.0.1:8265").describe()
    assert private == "a private local Ray (2 CPUs, dashboard http://127.0.0.1:8265)"
    assert "cluster at 10.0.0.1:6379" in RaySession("cluster", "10.0.0.1:6379", 64.0, None).describe()
