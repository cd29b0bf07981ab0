"""Request bodies: read at most COLLECTOR_MAX_BODY_BYTES off the wire, then gunzip at most Segment's
payload limit. Both bounds hold while reading, so neither a huge body nor a gzip bomb (a few KB
that inflate to gigabytes) ever sits in memory.

aiohttp's own decompression is switched off for the collector (`auto_decompress=False` on the
runner) so that this module sees the bytes as sent and owns the bound.
"""

from __future__ import annotations

import zlib

from aiohttp import web

from worker.collector.responses import body_too_large, exceeds_payload_limit, malformed, unsupported_encoding

_CHUNK_BYTES = 64 * 1024
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # gzip header and trailer, not a raw or zlib stream


async def read_wire_body(request: web.Request, max_bytes: int) -> bytes:
    """The body as sent. 413 as soon as it is known to be larger than `max_bytes`."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise body_too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(_CHUNK_BYTES):
        size += len(chunk)
        if size > max_bytes:  # chunked bodies announce no length
            raise body_too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def decode_content(data: bytes, content_encoding: str | None, limit: int) -> bytes:
    """The payload: `data` itself, or `data` gunzipped. 400 when the payload is over `limit` bytes."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        if len(data) > limit:
            raise exceeds_payload_limit(f"request body is {len(data)} bytes; the limit is {limit} bytes")
        return data
    if encoding in ("gzip", "x-gzip"):
        return gunzip_bounded(data, limit)
    raise unsupported_encoding(encoding)


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
