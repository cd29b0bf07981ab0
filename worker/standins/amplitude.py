"""Stand-in for Amplitude's HTTP V2 API: `POST /2/httpapi`.

Behaves as the reference describes (https://amplitude.com/docs/apis/analytics/http-v2, response
bodies from the "Response Format" section): the API key travels in the body, a 400 rejects the whole
request and names the bad events by index, a request over 1 MB or over the event limit gets 413, a
throttled user gets 429 with `throttled_users`, and `insert_id` dedupes. One liberty: per-user 429s
carry `Retry-After` (from `Faults.retry_after`) so tests need not wait Amplitude's 30 s.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from worker.standins.faults import StandinState

MAX_BODY_BYTES = 1_000_000
# The API takes fewer than 2000 events a request; the limit we enforce is the one our sender keeps.
MAX_EVENTS = 1000
DEFAULT_MIN_ID_LENGTH = 5
THROTTLE_ERROR = "Too many requests for some devices and users"
EPS_THRESHOLD = 30  # per user/device events per second (reference, "Upload limit")


def register(app: web.Application, state: StandinState, api_key: str) -> None:
    async def upload(request: web.Request) -> web.Response:
        status, body, headers = await _handle(request, state, api_key)
        state.statuses[status] += 1
        return web.json_response(body, status=status, headers=headers)

    app.router.add_post("/2/httpapi", upload)


async def _handle(
    request: web.Request, state: StandinState, api_key: str
) -> tuple[int, dict[str, Any], dict[str, str]]:
    failure = await state.injected_failure()
    if failure is not None:
        status, body, headers = failure
        if status == 429:  # the documented throttle body, naming nobody: a project-wide throttle
            body = _throttle_body({}, [])
        return status, body, headers
    raw = await request.read()
    if len(raw) > MAX_BODY_BYTES:
        return 413, {"code": 413, "error": "Payload too large"}, {}
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return 400, {"code": 400, "error": "Invalid JSON request body"}, {}
    if not isinstance(payload, dict):
        return 400, {"code": 400, "error": "Invalid JSON request body"}, {}
    return _upload(payload, len(raw), state, api_key)


def _upload(
    payload: dict[str, Any], size: int, state: StandinState, api_key: str
) -> tuple[int, dict[str, Any], dict[str, str]]:
    for field in ("api_key", "events"):
        if not payload.get(field):
            return 400, {"code": 400, "error": "Request missing required field", "missing_field": field}, {}
    if payload["api_key"] != api_key or state.faults.reject_key:
        return 400, {"code": 400, "error": f"Invalid API key: {payload['api_key']}"}, {}
    events = payload["events"]
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        return 400, {"code": 400, "error": "Invalid event JSON"}, {}
    if len(events) > MAX_EVENTS:
        return 413, {"code": 413, "error": "Payload too large"}, {}
    rejection = _rejection(events, _min_id_length(payload), state.faults.poison_ids)
    if rejection is not None:
        return 400, rejection, {}
    throttled = _throttled(events, state.faults.throttled_users)
    if throttled is not None:
        return 429, throttled, {"Retry-After": f"{state.faults.retry_after:g}"}
    for index, event in enumerate(events):
        # Without an insert_id Amplitude does not dedupe, so every such event counts as new.
        key = event.get("insert_id") or f"no-insert-id:{state.requests}:{index}"
        state.accept(str(key), event)
    return (
        200,
        {
            "code": 200,
            "events_ingested": len(events),
            "payload_size_bytes": size,
            "server_upload_time": int(time.time() * 1000),
        },
        {},
    )


def _min_id_length(payload: Mapping[str, Any]) -> int:
    options = payload.get("options")
    value = options.get("min_id_length") if isinstance(options, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else DEFAULT_MIN_ID_LENGTH


def _rejection(events: list[dict[str, Any]], min_id_length: int, poison_ids: list[str]) -> dict[str, Any] | None:
    """The documented 400 body for events the API refuses, or None when every event is valid."""
    missing: dict[str, list[int]] = {}
    invalid: dict[str, list[int]] = {}
    short_ids: dict[str, list[int]] = {}
    poison = set(poison_ids)
    for index, event in enumerate(events):
        if not event.get("event_type"):
            missing.setdefault("event_type", []).append(index)
        if not event.get("user_id") and not event.get("device_id"):
            missing.setdefault("device_id", []).append(index)
        for id_field in ("user_id", "device_id"):
            value = event.get(id_field)
            if isinstance(value, str) and value and len(value) < min_id_length:
                short_ids.setdefault(id_field, []).append(index)
        time_value = event.get("time")
        if time_value is not None and (not isinstance(time_value, int) or isinstance(time_value, bool)):
            invalid.setdefault("time", []).append(index)
        if event.get("insert_id") in poison:
            invalid.setdefault("insert_id", []).append(index)
    if not (missing or invalid or short_ids):
        return None
    body: dict[str, Any] = {"code": 400}
    if missing:
        body["error"] = "Request missing required field"
        body["events_with_missing_fields"] = missing
    elif invalid:
        body["error"] = "Invalid field values on some events"
    else:
        body["error"] = "Invalid id length for user_id or device_id"
    if invalid:
        body["events_with_invalid_fields"] = invalid
    if short_ids:
        body["events_with_invalid_id_lengths"] = short_ids
    return body


def _throttled(events: list[dict[str, Any]], throttled_users: list[str]) -> dict[str, Any] | None:
    """A 429 naming the throttled users among this request's events; nothing of it is ingested."""
    wanted = set(throttled_users)
    indexes = [i for i, event in enumerate(events) if event.get("user_id") in wanted]
    if not indexes:
        return None
    users = {str(events[i]["user_id"]): EPS_THRESHOLD + 1 for i in indexes}
    return _throttle_body(users, indexes)


def _throttle_body(users: dict[str, int], indexes: list[int]) -> dict[str, Any]:
    return {
        "code": 429,
        "error": THROTTLE_ERROR,
        "eps_threshold": EPS_THRESHOLD,
        "throttled_devices": {},
        "throttled_users": users,
        "exceeded_daily_quota_users": {},
        "exceeded_daily_quota_devices": {},
        "throttled_events": indexes,
    }
