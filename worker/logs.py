"""structlog JSON logs on stderr. Secrets are never passed to a logger: settings hold them as SecretStr,
and `redact` masks any value under a key that looks like a credential, as a second line of defence."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from pydantic import SecretStr

_SECRET_WORDS = ("key", "secret", "password", "token", "authorization", "sasl")


def redact(_logger: object, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name in list(event_dict):
        if name != "event" and any(word in name.lower() for word in _SECRET_WORDS):
            event_dict[name] = "***"
    return event_dict


def secret_values(settings: object) -> list[str]:
    """The values of a pydantic settings object's SecretStr fields (to scrub from text we did not write)."""
    values = []
    for name in getattr(type(settings), "model_fields", {}):
        value = getattr(settings, name, None)
        if isinstance(value, SecretStr) and value.get_secret_value():
            values.append(value.get_secret_value())
    return values


def scrub(text: str, secrets: list[str]) -> str:
    """APIs echo credentials in error bodies ("Invalid API key: ..."); those bodies become dead-letter
    reasons and log lines, so the secret is masked first."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def configure(level: str = "INFO", member: str | None = None) -> None:
    """`member`: which of a `--processes N` role's members this process is, on every line it logs."""
    logging.basicConfig(stream=sys.stderr, level=level, format="%(message)s")

    def add_member(_logger: object, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event_dict["member"] = member
        return event_dict

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *([add_member] if member is not None else []),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def get(name: str) -> Any:
    return structlog.get_logger(name)
