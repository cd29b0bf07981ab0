"""Request bodies: read at most COLLECTOR_MAX_BODY_BYTES off the wire within
COLLECTOR_READ_TIMEOUT_SECONDS, then gunzip at most Segment's payload limit. Both bounds hold while
reading, so neither a huge body nor a gzip bomb (a few KB that inflate to gigabytes) ever sits in
memory, and a client that stops sending mid-body gets a 408 instead of holding the connection.

An unencoded body is the payload itself, so no more of it is read than the payload limit: a body
known (by its Content-Length) or found to be larger gets Segment's 400 without the rest being read.

aiohttp's own decompression is switched off for the collector (`auto_decompress=False` on the
runner) so that this module sees the bytes as sent and owns the bound.
"""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import ClientPayloadError, web
from aiohttp.http_exceptions import HttpProcessingError

from worker.collector.responses import (
    body_too_large,
    exceeds_payload_limit,
    malformed,
    request_timeout,
    unreadable_body,
    unsupported_encoding,
)

_CHUNK_BYTES = 64 * 1024
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # gzip header and trailer, not a raw or zlib stream

IDENTITY = "identity"
GZIP = "gzip"


def content_encoding(header: str | None) -> str:
    """`identity` or `gzip` for a Content-Encoding header; 415 for anything else. Checked before
    the body is read: a body we could not decode is not worth receiving."""
    encoding = (header or IDENTITY).strip().lower()
    if encoding in ("", IDENTITY):
        return IDENTITY
    if encoding in (GZIP, "x-gzip"):
        return GZIP
    raise unsupported_encoding(encoding)


def check_length(content_length: int | None, max_bytes: int, payload_limit: int | None = None) -> None:
    """Refuse by the announced length alone: 413 over `max_bytes`; Segment's 400 over `payload_limit`
    (given when the body is the payload, i.e. not compressed)."""
    if content_length is None:
        return
    if content_length > max_bytes:
        raise body_too_large(max_bytes)
    if payload_limit is not None and content_length > payload_limit:
        raise exceeds_payload_limit(f"request body is {content_length} bytes; the limit is {payload_limit} bytes")


async def read_wire_body(
    request: web.Request, max_bytes: int, timeout: float | None = None, payload_limit: int | None = None
) -> bytes:
    """The body as sent. 413 as soon as it is known to be larger than `max_bytes`; with
    `payload_limit` (an unencoded body), Segment's 400 as soon as it is known to be larger than that.
    408 when it has not all arrived `timeout` seconds after the request's headers; 400 when it
    breaks off or its framing (chunked encoding, Content-Length) is broken."""
    check_length(request.content_length, max_bytes, payload_limit)
    bound = max_bytes if payload_limit is None else min(max_bytes, payload_limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.content.iter_chunked(_CHUNK_BYTES):
                size += len(chunk)
                if size > bound:  # chunked bodies announce no length
                    if bound < max_bytes:
                        raise exceeds_payload_limit(f"request body is over the limit of {bound} bytes")
                    raise body_too_large(max_bytes)
                chunks.append(chunk)
    except TimeoutError:
        raise request_timeout(timeout or 0.0) from None
    except (HttpProcessingError, ClientPayloadError, ConnectionError, EOFError) as exc:
        raise unreadable_body(type(exc).__name__) from None
    return b"".join(chunks)


def decode_content(data: bytes, content_encoding_header: str | None, limit: int) -> bytes:
    """The payload: `data` itself, or `data` gunzipped. 400 when the payload is over `limit` bytes."""
    if content_encoding(content_encoding_header) == IDENTITY:
        if len(data) > limit:
            raise exceeds_payload_limit(f"request body is {len(data)} bytes; the limit is {limit} bytes")
        return data
    return gunzip_bounded(data, limit)


def gunzip_bounded(data: bytes, limit: int) -> bytes:
    """Inflate a gzip body (several members allowed, as RFC 1952 does), producing at most
    `limit` + 1 bytes before giving up, whatever the compression ratio."""
    out = bytearray()
    remaining = data
    while remaining:
        inflater = zlib.decompressobj(_GZIP_WBITS)
        try:
            out += inflater.decompress(remaining, limit + 1 - len(out))
        except zlib.error as exc:
            raise malformed(f"invalid gzip body: {exc}") from None
        if len(out) > limit:
            raise exceeds_payload_limit(f"decompressed body is larger than {limit} bytes")
        if not inflater.eof:
            raise malformed("invalid gzip body: truncated")
        remaining = inflater.unused_data
    return bytes(out)
