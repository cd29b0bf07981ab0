"""Shared fixtures. Integration tests run against one real embedded broker (Tansu) per session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.kafka.broker import EmbeddedBroker, free_port


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log_path = Path(tmp_path_factory.mktemp("broker")) / "tansu.log"
    with EmbeddedBroker(free_port(), log_path=log_path) as running:
        yield running


@pytest.fixture
def prefix() -> str:
    """A topic and group namespace of this test's own, so tests sharing the broker never see each other."""
    return f"t{uuid.uuid4().hex[:8]}."


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the environment; tests start from none of ours."""
    for name in list(os.environ):
        if name.startswith(("KAFKA_", "TOPIC_", "DESTINATIONS", "AMPLITUDE_", "AMBERFLO_", "RETENO_", "BREVO_")):
            monkeypatch.delenv(name, raising=False)
