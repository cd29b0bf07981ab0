"""Fixtures the sink and dead-letter tests share: one stand-in server per module, reset per test."""

from __future__ import annotations

import pytest

from tests.sink_helpers import Standins


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    running = Standins(tmp_path_factory.mktemp("standins"))
    yield running
    running.stop()


@pytest.fixture
def clean_standins(standins):
    standins.reset_all()
    return standins
