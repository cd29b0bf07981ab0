"""`segment-worker dlq inspect DEST|raw`: what is in a dead-letter topic, by kind and reason, with samples."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from worker.avro_codec import EventCodec
from worker.config import Config
from worker.dlq.headers import header_map
from worker.kafka.reading import assign_all, read_until_quiet
from worker.tail import decode_value

IDLE_SECONDS = 2.0  # a dead-letter topic quiet this long has been read to its end


@dataclass
class Inspection:
    topic: str
    total: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    by_reason: Counter[str] = field(default_factory=Counter)
    oldest: str | None = None
    newest: str | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "total": self.total,
            "by_kind": dict(self.by_kind.most_common()),
            "by_reason": dict(self.by_reason.most_common()),
            "oldest": self.oldest,
            "newest": self.newest,
            "samples": self.samples,
        }


def inspect(config: Config, destination: str, samples: int = 3, timeout: float = 60.0) -> Inspection:
    topic = config.names.dlq(destination)
    consumer = config.kafka.reader("dlq-inspect")
    result = Inspection(topic)
    codec = EventCodec()
    try:
        assign_all(consumer, [topic])
        for message in read_until_quiet(consumer, IDLE_SECONDS, time.monotonic() + timeout):
            headers = header_map(message.headers())
            result.total += 1
            result.by_kind[headers.get("error_kind", "?")] += 1
            result.by_reason[headers.get("error", "?")[:200]] += 1
            failed_at = headers.get("failed_at")
            if failed_at:
                result.oldest = min(result.oldest or failed_at, failed_at)
                result.newest = max(result.newest or failed_at, failed_at)
            if len(result.samples) < samples:
                result.samples.append(
                    {
                        "partition": message.partition(),
                        "offset": message.offset(),
                        "key": message.key().decode("utf-8", "replace") if message.key() else None,
                        "headers": headers,
                        "value": decode_value(message.value(), codec),
                    }
                )
    finally:
        consumer.close()
    return result


def print_inspection(result: Inspection, out: IO[str]) -> None:
    out.write(f"{result.topic}: {result.total} dead letters")
    if result.total:
        out.write(f" (failed between {result.oldest} and {result.newest})")
    out.write("\n\nby kind:\n")
    for kind, count in result.by_kind.most_common():
        out.write(f"  {count:>8}  {kind}\n")
    out.write("\nby reason:\n")
    for reason, count in result.by_reason.most_common(20):
        out.write(f"  {count:>8}  {reason}\n")
    if len(result.by_reason) > 20:
        out.write(f"  ... and {len(result.by_reason) - 20} more reasons (--json lists all)\n")
    for sample in result.samples:
        out.write("\n" + orjson.dumps(sample, option=orjson.OPT_INDENT_2).decode() + "\n")
