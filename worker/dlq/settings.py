"""Dead-letter settings (DLQ_* variables), shared by the normaliser and every sink."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from worker.config_loader import Section


class DlqSettings(Section):
    env_prefix: ClassVar[str] = "DLQ_"

    # Stop the role after this many dead letters in a row with no success between them (0: never).
    # A bad mapping deploy then halts with its input uncommitted instead of dead-lettering everything.
    max_consecutive: int = Field(default=0, ge=0)
    # The largest dead letter written as it is; a larger one is truncated (header `truncated`).
    # Keep it at or below the producer's `message.max.bytes` and the topic's `max.message.bytes`.
    max_message_bytes: int = Field(default=1_000_000, ge=4096)
