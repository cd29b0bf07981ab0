"""worker.members' pure parts: what a member is started with."""

from __future__ import annotations

import os

import pytest

from worker.members import MEMBER_ENV, SUPERVISOR_ENV, member_arguments, member_environment


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["sink", "amplitude", "--processes", "3"], ["sink", "amplitude"]),
        (["--log-level", "debug", "normalize", "--processes=2"], ["--log-level", "debug", "normalize"]),
        (["--config", "x.env", "sink", "--processes", "2", "brevo"], ["--config", "x.env", "sink", "brevo"]),
        (["normalize"], ["normalize"]),
    ],
)
def test_a_member_gets_the_same_arguments_without_processes(argv, expected):
    assert member_arguments(argv) == expected


def test_each_member_serves_on_its_own_port_and_knows_its_index_and_supervisor():
    env = member_environment({"METRICS_PORT": "9100", "OTHER": "kept"}, 2, 9100)
    assert env["METRICS_PORT"] == "9102"
    assert env[MEMBER_ENV] == "2"
    assert env[SUPERVISOR_ENV] == str(os.getpid())
    assert env["OTHER"] == "kept"


@pytest.mark.parametrize("port", [None, 0])
def test_without_a_fixed_metrics_port_members_do_not_get_one_made_up(port):
    env = member_environment({} if port is None else {"METRICS_PORT": "0"}, 1, port)
    assert env.get("METRICS_PORT") == (None if port is None else "0")
