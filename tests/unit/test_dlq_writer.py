"""The one dead-letter writer: oversized letters are truncated, never dropped; the consecutive limit."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, Message

from tests.kafka_helpers import produce, read_count, settings_for, setup_topics
from worker.dlq.headers import Kind, header_map
from worker.dlq.settings import DlqSettings
from worker.dlq.writer import DeadLetterLimitExceeded, DeadLetterWriter
from worker.names import RAW


@pytest.fixture
def config(broker, prefix):
    config = settings_for(broker, prefix, partitions=1)
    setup_topics(config)
    return config


def _consumed(config, values: list[bytes]) -> list[Message]:
    produce(config, "raw", [("user-1", v) for v in values])
    return read_count(config, "raw", len(values))


def _write_all(config, writer: DeadLetterWriter, originals: list[Message], reason: str) -> None:
    failures: list[KafkaError] = []
    for original in originals:
        writer.write(original, Kind.INVALID, reason, on_delivery=lambda e, _m: failures.append(e) if e else None)
    assert writer.producer.flush(30) == 0 and failures == []


def test_a_dead_letter_too_large_to_produce_is_truncated_with_a_header_not_dropped(config) -> None:
    near_the_limit = b"x" * 999_000  # fits the broker as a raw message; plus dead-letter headers it would not
    [original] = _consumed(config, [near_the_limit])
    writer = DeadLetterWriter(config.kafka.producer(), config.names.dlq(RAW), RAW, config.dlq())
    _write_all(config, writer, [original], "reason " * 200)
    [letter] = read_count(config, "dlq.raw", 1)
    headers = header_map(letter.headers())
    assert headers["truncated"] == str(len(near_the_limit))
    assert (headers["original_topic"], headers["original_offset"]) == (config.names.raw, str(original.offset()))
    assert 0 < len(letter.value()) < len(near_the_limit) and near_the_limit.startswith(letter.value())


def test_a_dead_letter_that_fits_is_kept_whole(config) -> None:
    [original] = _consumed(config, [b'{"not": "an event"'])
    writer = DeadLetterWriter(config.kafka.producer(), config.names.dlq(RAW), RAW)
    _write_all(config, writer, [original], "malformed JSON")
    [letter] = read_count(config, "dlq.raw", 1)
    assert letter.value() == original.value() and "truncated" not in header_map(letter.headers())


def test_the_consecutive_limit_stops_the_writer_until_a_success(config) -> None:
    originals = _consumed(config, [b"bad-%d" % i for i in range(4)])
    writer = DeadLetterWriter(config.kafka.producer(), config.names.dlq(RAW), RAW, DlqSettings(max_consecutive=2))
    _write_all(config, writer, originals[:2], "bad")
    with pytest.raises(DeadLetterLimitExceeded, match="2 dead letters in a row"):
        writer.write(originals[2], Kind.INVALID, "bad")
    writer.note_success()
    _write_all(config, writer, originals[2:], "bad")
    assert len(read_count(config, "dlq.raw", 4)) == 4


def test_the_limit_is_off_by_default() -> None:
    assert DlqSettings.from_sources({}).max_consecutive == 0
