"""The deployment files in docs/deploy: systemd units that start real commands with real
options (``systemd-analyze verify`` where it exists), a SLURM batch script, and a logrotate
rule logrotate reads."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.cli import app as coordinator_app
from node.cli import app as node_app

DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "deploy"
UNITS = {"atom-node.service": (node_app, "atom-node"),
         "atom-coordinator.service": (coordinator_app, "atom-coordinator")}


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read(DEPLOY / name)
    return parser


@pytest.mark.parametrize("name", sorted(UNITS))
def test_a_unit_runs_a_real_command_with_real_options(name: str) -> None:
    unit = _unit(name)
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    assert unit["Service"]["Restart"] == "on-failure"
    argv = shlex.split(unit["Service"]["ExecStart"])
    app, program = UNITS[name]
    assert Path(argv[0]).name == program
    command, options = argv[1], [a for a in argv[2:] if a.startswith("--")]
    help_text = CliRunner().invoke(app, [command, "--help"], terminal_width=200).output
    for option in options:
        assert option in help_text, (name, option)


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_accepts_the_unit(name: str, tmp_path: Path) -> None:
    verify = shutil.which("systemd-analyze")
    if verify is None:
        pytest.skip("systemd-analyze is not installed (the unit was parsed above)")
    # the unit as installed here: its program from this environment
    program = Path(sys.executable).parent / UNITS[name][1]
    text = (DEPLOY / name).read_text().replace(f"/opt/atom/.venv/bin/{UNITS[name][1]}",
                                               str(program))
    (tmp_path / name).write_text(text)
    out = subprocess.run([verify, "verify", str(tmp_path / name)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_the_sbatch_template_runs_join_and_leaves_before_the_time_limit() -> None:
    text = (DEPLOY / "atom-node.sbatch").read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    sbatch = dict(line.removeprefix("#SBATCH ").partition("=")[::2]
                  for line in lines if line.startswith("#SBATCH "))
    assert {"--job-name", "--gres", "--time", "--signal"} <= set(sbatch), sbatch
    assert sbatch["--gres"].startswith("gpu:")
    # to the batch shell only (the SuperNode must live until the hand-back went out), early
    # enough for a step, the hand-back and the SuperNode's send (node.supervisor._LEAVE_S)
    when, _, lead = sbatch["--signal"].partition("@")
    assert when == "B:USR1" and int(lead) >= 60
    # the script becomes atom-node (exec): the signal reaches it, its exit is the job's
    [command] = [line for line in lines if line.startswith("exec ")]
    argv = shlex.split(command)[1:]
    assert Path(argv[0]).name == "atom-node" and argv[1] == "join"
    assert "--home" in argv and "--token" not in argv  # the enrolled home, no new token
    help_text = CliRunner().invoke(node_app, ["join", "--help"], terminal_width=200).output
    for option in (a for a in argv[2:] if a.startswith("--")):
        assert option in help_text, option
    bash = shutil.which("bash")
    if bash is not None:  # the script parses
        out = subprocess.run([bash, "-n", str(DEPLOY / "atom-node.sbatch")], check=False,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr


def test_logrotate_reads_the_rule(tmp_path: Path) -> None:
    rotate = shutil.which("logrotate") or (
        "/usr/sbin/logrotate" if Path("/usr/sbin/logrotate").exists() else None)
    if rotate is None:
        pytest.skip("logrotate is not installed")
    out = subprocess.run([rotate, "-d", "-s", str(tmp_path / "state"),
                          str(DEPLOY / "atom.logrotate")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "error" not in out.stderr.lower(), out.stderr
