"""Stand-in for Amberflo: `POST /ingest` (meter records) and `PUT /customers` (create or update).

Faithful where Amberflo documents behaviour (https://docs.amberflo.io/reference/post_ingest,
https://docs.amberflo.io/docs/create-customers2): `X-API-KEY` auth, the record's required fields and
types (dimensions and traits are string-to-string maps, customerName is required), dedupe by
`uniqueId` (or by the whole record when it has none, as the official SDK notes). Amberflo documents
no error bodies and no request-size limit; the stand-in answers `{"message": ...}` (what its API
gateway sends) and rejects bodies over 10 MB with 413 (a common API-gateway cap) so SPLIT can be
exercised. A 400 rejects the whole request; it names the bad records' indexes to help debugging.
PUT /customers upserts, as Amberflo's Segment destination document says it does
(docs/MAPPINGS.md#amberflo).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from worker.standins.faults import StandinState

MAX_BODY_BYTES = 10 * 1024 * 1024
_REQUIRED_RECORD_FIELDS = {"customerId": str, "meterApiName": str, "meterTimeInMillis": int}

Answer = tuple[int, Any, dict[str, str]]
Handler = Callable[[Any, StandinState], Answer]


def register(app: web.Application, state: StandinState, api_key: str) -> None:
    async def ingest(request: web.Request) -> web.Response:
        return _respond(state, await _guarded(request, state, api_key, _ingest))

    async def put_customer(request: web.Request) -> web.Response:
        return _respond(state, await _guarded(request, state, api_key, _put_customer))

    app.router.add_post("/ingest", ingest)
    app.router.add_post("/ingest/", ingest)  # the official SDK posts to "/ingest/"
    app.router.add_put("/customers", put_customer)
    app.router.add_put("/customers/", put_customer)


def _respond(state: StandinState, answer: Answer) -> web.Response:
    status, body, headers = answer
    state.statuses[status] += 1
    return web.json_response(body, status=status, headers=headers)


async def _guarded(request: web.Request, state: StandinState, api_key: str, handler: Handler) -> Answer:
    """The checks every endpoint shares: injected faults, auth, size, JSON; then the handler."""
    failure = await state.injected_failure()
    if failure is not None:
        status, body, headers = failure
        return status, {"message": body.get("error", "error")}, headers
    if request.headers.get("X-API-KEY") != api_key or state.faults.reject_key:
        return 401, {"message": "Unauthorized"}, {}
    raw = await request.read()
    if len(raw) > MAX_BODY_BYTES:
        return 413, {"message": "Request Entity Too Large"}, {}
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return 400, {"message": "Invalid JSON body"}, {}
    return handler(payload, state)


def _ingest(payload: Any, state: StandinState) -> Answer:
    records = payload if isinstance(payload, list) else [payload]  # one record or an array
    errors = [
        {"index": index, "error": error}
        for index, record in enumerate(records)
        if (error := _record_error(record, state.faults.poison_ids)) is not None
    ]
    if errors:
        return 400, {"message": "Invalid meter records", "errors": errors}, {}
    for record in records:
        state.accept(_record_key(record), record)
    return 200, {"message": "ingested", "count": len(records)}, {}


def _record_error(record: Any, poison_ids: list[str]) -> str | None:
    if not isinstance(record, dict):
        return "record must be an object"
    for field, kind in _REQUIRED_RECORD_FIELDS.items():
        value = record.get(field)
        if not isinstance(value, kind) or isinstance(value, bool) or value in ("", 0):
            return f"{field} is required and must be a {kind.__name__}"
    value = record.get("meterValue")
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "meterValue is required and must be a number"
    if not _is_string_map(record.get("dimensions", {})):
        return "dimensions must map strings to strings"
    unique_id = record.get("uniqueId")
    if unique_id is not None and not isinstance(unique_id, str):
        return "uniqueId must be a string"
    if unique_id in poison_ids:
        return f"record {unique_id} rejected"
    return None


def _record_key(record: dict[str, Any]) -> str:
    # Without a uniqueId Amberflo dedupes on the full record.
    return record.get("uniqueId") or orjson.dumps(record, option=orjson.OPT_SORT_KEYS).decode()


def _put_customer(payload: Any, state: StandinState) -> Answer:
    error = _customer_error(payload, state.faults.poison_ids)
    if error is not None:
        return 400, {"message": error}, {}
    key = f"customer:{payload['customerId']}"
    previous = state.received.get(key)
    if previous is None or previous == payload:
        state.accept(key, payload)  # a repeat of the same customer counts as a duplicate
    else:
        state.received[key] = payload  # PUT replaces the customer
    now = int(time.time() * 1000)
    return 200, {**payload, "createTime": now, "updateTime": now, "enabled": True}, {}


def _customer_error(payload: Any, poison_ids: list[str]) -> str | None:
    if not isinstance(payload, dict):
        return "customer must be an object"
    for field in ("customerId", "customerName"):
        if not isinstance(payload.get(field), str) or not payload[field]:
            return f"{field} is required"
    email = payload.get("customerEmail")
    if email is not None and not isinstance(email, str):
        return "customerEmail must be a string"
    if not _is_string_map(payload.get("traits", {})):
        return "traits must map strings to strings"
    if payload["customerId"] in poison_ids:
        return f"customer {payload['customerId']} rejected"
    return None


def _is_string_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
