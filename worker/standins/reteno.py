"""Stand-in for Reteno's device, contact and event endpoints (see worker/destinations/reteno.py).

Behaviour, as far as Reteno documents it:
- every request needs the `X-Reteno-Access-Key` header; a missing or wrong key gets 401;
- `POST /api/v1/device`: `deviceId` and `category` (MOBILE | TABLET) are required, `osType` is IOS
  or ANDROID when given. Answers 200. A device is an upsert keyed by deviceId + externalUserId
  (registering the same device for the same user again updates it);
- `POST /api/v1/contact`: `channels` is required (each `{"type", "value"}`), custom `fields` are
  `{"id": int, "value"}`. Answers 200 `{"id": <contact id>}`. A contact is an upsert keyed by
  externalCustomerId (else its email): the stored contact is replaced by the newest one;
- `POST /api/v2/event`: `eventTypeKey` is required (<= 100 characters, none of
  `< ; ' \\ / | " ` ^ ? ! , >`), `keyValue` <= 300 characters, `params` a list of
  `{"name", "value"}` holding a contact identifier, content <= 20 KB. Answers 200. Events are
  deduplicated by keyValue, which the destination fills with the Segment messageId, so the dedupe
  id an event is recorded under is its messageId.
- A keyValue listed in `faults.poison_ids` is refused with the 400 Reteno documents for an event
  type whose parameter validation fails ("The event should have the following params: [...]",
  https://docs.reteno.com/docs/validating-event-parameters). Reteno documents no general error
  body, so other errors answer `{"message": ...}`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from worker.standins.faults import StandinState

ACCESS_KEY_HEADER = "X-Reteno-Access-Key"
DEVICE_CATEGORIES = ("MOBILE", "TABLET")
OS_TYPES = ("IOS", "ANDROID")
CONTACT_IDENTIFIERS = ("externalCustomerId", "contactId", "email", "phone", "pushToken")
EVENT_CONTENT_MAX = 20 * 1024
EVENT_TYPE_KEY_MAX = 100
KEY_VALUE_MAX = 300
_FORBIDDEN_KEY_CHARS = re.compile(r"[<;\u2019'\\/|\"`^?!,>]")


class RetenoApiError(Exception):
    """A request the API refuses, with the status and body it answers."""

    def __init__(self, status: int, body: dict[str, Any] | str) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def register(app: web.Application, state: StandinState, api_key: str) -> None:
    contact_ids: dict[str, int] = {}

    async def device(request: web.Request) -> web.StreamResponse:
        async def accept(body: dict[str, Any]) -> web.StreamResponse:
            _validate_device(body)
            _reject_poison(state, body.get("deviceId"), body.get("externalUserId"))
            key = f"device:{body['deviceId']}:{body.get('externalUserId') or ''}"
            upsert(state, key, body)
            return _respond(state, 200, None)

        return await _serve(request, state, api_key, accept)

    async def contact(request: web.Request) -> web.StreamResponse:
        async def accept(body: dict[str, Any]) -> web.StreamResponse:
            identity = _validate_contact(body)
            _reject_poison(state, body.get("externalCustomerId"), identity)
            key = f"contact:{identity}"
            upsert(state, key, body)
            contact_id = contact_ids.setdefault(key, len(contact_ids) + 1)
            return _respond(state, 200, {"id": contact_id})

        return await _serve(request, state, api_key, accept)

    async def event(request: web.Request) -> web.StreamResponse:
        async def accept(body: dict[str, Any]) -> web.StreamResponse:
            key_value = _validate_event(body)
            if key_value in state.faults.poison_ids:
                raise RetenoApiError(400, _required_params_body(["orderId"]))
            state.accept(key_value, body)
            return _respond(state, 200, None)

        return await _serve(request, state, api_key, accept, max_bytes=EVENT_CONTENT_MAX)

    app.router.add_post("/api/v1/device", device)
    app.router.add_post("/api/v1/contact", contact)
    app.router.add_post("/api/v2/event", event)


def upsert(state: StandinState, key: str, item: dict[str, Any]) -> None:
    """Record an upsert: an identical repeat is a duplicate, a changed one replaces the stored item."""
    if state.received.get(key) == item:
        state.accept(key, item)
    else:
        state.received[key] = item


async def _serve(
    request: web.Request,
    state: StandinState,
    api_key: str,
    accept: Callable[[dict[str, Any]], Awaitable[web.StreamResponse]],
    max_bytes: int | None = None,
) -> web.StreamResponse:
    failure = await state.injected_failure()
    if failure is not None:
        status, body, headers = failure
        return _respond(state, status, {"message": next(iter(body.values()), "error")}, headers)
    if request.headers.get(ACCESS_KEY_HEADER) != api_key or state.faults.reject_key:
        return _respond(state, 401, {"message": "Unauthorized: invalid or missing access key"})
    raw = await request.read()
    try:
        if max_bytes is not None and len(raw) > max_bytes:
            raise RetenoApiError(400, {"message": f"content exceeds {max_bytes} bytes"})
        body = _parse_object(raw)
        return await accept(body)
    except RetenoApiError as rejected:
        return _respond(state, rejected.status, rejected.body)


def _respond(
    state: StandinState, status: int, body: dict[str, Any] | str | None, headers: dict[str, str] | None = None
) -> web.StreamResponse:
    state.statuses[status] += 1
    if body is None:
        return web.Response(status=status, headers=headers)
    if isinstance(body, str):
        return web.Response(status=status, text=body, headers=headers)
    return web.json_response(body, status=status, headers=headers)


def _parse_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise RetenoApiError(400, {"message": "request body is not valid JSON"}) from None
    if not isinstance(body, dict):
        raise RetenoApiError(400, {"message": "request body must be a JSON object"})
    return body


def _validate_device(body: dict[str, Any]) -> None:
    if not _non_empty_str(body.get("deviceId")):
        raise RetenoApiError(400, {"message": "deviceId is required"})
    if body.get("category") not in DEVICE_CATEGORIES:
        raise RetenoApiError(400, {"message": f"category must be one of {list(DEVICE_CATEGORIES)}"})
    if "osType" in body and body["osType"] not in OS_TYPES:
        raise RetenoApiError(400, {"message": f"osType must be one of {list(OS_TYPES)}"})


def _validate_contact(body: dict[str, Any]) -> str:
    """Checks a contact and returns the identity it is stored under."""
    channels = body.get("channels")
    if not isinstance(channels, list) or not channels:
        raise RetenoApiError(400, {"message": "channels is required"})
    for channel in channels:
        if not isinstance(channel, dict) or not _non_empty_str(channel.get("type")):
            raise RetenoApiError(400, {"message": "each channel needs a type"})
        if not _non_empty_str(channel.get("value")):
            raise RetenoApiError(400, {"message": f"channel {channel.get('type')} needs a value"})
    for custom in body.get("fields") or []:
        if not isinstance(custom, dict) or not isinstance(custom.get("id"), int) or "value" not in custom:
            raise RetenoApiError(400, {"message": "each field needs an integer id and a value"})
    external_id = body.get("externalCustomerId")
    if _non_empty_str(external_id):
        return str(external_id)
    return str(channels[0]["value"])


def _validate_event(body: dict[str, Any]) -> str:
    """Checks an event and returns its dedupe key (keyValue)."""
    type_key = body.get("eventTypeKey")
    if not _non_empty_str(type_key):
        raise RetenoApiError(400, {"message": "eventTypeKey is required"})
    if len(type_key) > EVENT_TYPE_KEY_MAX or _FORBIDDEN_KEY_CHARS.search(type_key):
        raise RetenoApiError(400, {"message": "eventTypeKey has a forbidden character or is too long"})
    params = body.get("params", [])
    if not isinstance(params, list) or not all(
        isinstance(p, dict) and _non_empty_str(p.get("name")) and "value" in p for p in params
    ):
        raise RetenoApiError(400, {"message": "params must be a list of {name, value}"})
    identifiers = {p["name"]: p["value"] for p in params if p["name"] in CONTACT_IDENTIFIERS}
    if not any(_non_empty_str(v) for v in identifiers.values()):
        raise RetenoApiError(400, _required_params_body(["externalCustomerId"]))
    key_value = body.get("keyValue")
    if key_value is None:
        # The API falls back to the contact identifier, which makes every event of a contact
        # one and the same; the destination always sends keyValue, so this is only for fidelity.
        return str(next(v for v in identifiers.values() if _non_empty_str(v)))
    if not _non_empty_str(key_value) or len(key_value) > KEY_VALUE_MAX or _FORBIDDEN_KEY_CHARS.search(key_value):
        raise RetenoApiError(400, {"message": "keyValue has a forbidden character or is too long"})
    return key_value


def _required_params_body(required: list[str]) -> str:
    params = [{"name": name, "required": True} for name in required]
    return f"The event should have the following params: {json.dumps(params)}"


def _reject_poison(state: StandinState, *identities: Any) -> None:
    for identity in identities:
        if identity and identity in state.faults.poison_ids:
            raise RetenoApiError(400, {"message": f"invalid contact data: {identity}"})


def _non_empty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value)
