"""Status codes and bodies, chosen to make Segment's SDKs do the right thing.

Segment's HTTP Tracking API "returns a 200 response for all API requests except errors caused by
large payloads and JSON errors (which return 400 responses)", and an event over 32 KB or a batch
over 500 KB gets "400 Bad Request"; its servers word that error "Exceed payload limit"
(https://segment.com/docs/connections/sources/catalog/libraries/server/http-api/#errors and
#max-request-size; segmentio/segment-docs PRs #1042, #6966, #7422).

Error bodies are `{"success": false, "code": ..., "message": ...}`: `code` and `message` are the
fields Segment's own SDKs read from an error response (analytics-python `request.post` raises
`APIError(status, payload["code"], payload["message"])`), `success` mirrors the `{"success": true}`
answer. Where Segment answers 200 and drops silently (unknown write key, missing userId) we answer
an error instead or pass the event on for the normaliser to dead-letter with a reason:

- 401 unknown or missing write key (Segment answers 200 and drops; Jitsu answers 401);
- 400 malformed JSON, wrong shape, over Segment's size limits (SDKs do not retry a 400);
- 408 headers or body not received within COLLECTOR_READ_TIMEOUT_SECONDS (the connection is closed);
- 413 a body larger than COLLECTOR_MAX_BODY_BYTES on the wire, refused unread;
- 415 a Content-Encoding other than gzip/identity;
- 503 the broker did not acknowledge in time, or too many requests are waiting for it
  (SDKs retry 5xx with backoff, so nothing is lost; a retry of a message the broker did store
  after all is a duplicate with the same messageId, which destinations dedupe);
- 500 a bug of ours (SDKs retry it too). Never an answer to a body, whatever its bytes: anything
  the collector cannot store unchanged is a 4xx.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

SEGMENT_OK: dict[str, Any] = {"success": True}
# Jitsu documents `{"status": "ok"}` for /api/v1/segment (docs/MAPPINGS.md#jitsu); its clients are Segment SDKs,
# which only look at the status code, so either body would do.
JITSU_OK: dict[str, Any] = {"status": "ok"}


class HttpError(Exception):
    """The request is answered with this status and error body; nothing was written."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def unauthorized() -> HttpError:
    # Never echo the key back: the body says only that it was missing or unknown.
    return HttpError(401, "unauthorized", "missing or unknown write key")


def malformed(message: str) -> HttpError:
    return HttpError(400, "invalid_request", message)


def invalid_json(detail: str) -> HttpError:
    return HttpError(400, "invalid_json", f"Invalid JSON: {detail}")


def exceeds_payload_limit(detail: str) -> HttpError:
    return HttpError(400, "payload_too_large", f"Exceed payload limit: {detail}")


def unreadable_body(detail: str) -> HttpError:
    # The body stopped early or broke its framing (chunked encoding, Content-Length): the client's doing.
    return HttpError(400, "invalid_request", f"request body could not be read: {detail}")


def request_timeout(seconds: float) -> HttpError:
    return HttpError(
        408, "request_timeout", f"request not received within {seconds:g}s", headers={"Connection": "close"}
    )


def body_too_large(limit: int) -> HttpError:
    return HttpError(413, "request_too_large", f"request body is larger than {limit} bytes")


def unsupported_encoding(encoding: str) -> HttpError:
    return HttpError(415, "unsupported_encoding", f"Content-Encoding {encoding[:40]!r} is not supported; use gzip")


def unavailable(message: str) -> HttpError:
    # No Retry-After: Segment SDKs then retry with their own exponential backoff.
    return HttpError(503, "unavailable", f"{message}; retry")


def internal_error() -> HttpError:
    return HttpError(500, "internal_error", "unexpected error; retry")


def json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def error_response(rejected: HttpError) -> web.Response:
    body = {"success": False, "code": rejected.code, "message": rejected.message}
    return json_response(rejected.status, body, rejected.headers)
