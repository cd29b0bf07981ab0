"""Stand-in for Brevo's events and contacts endpoints (see worker/destinations/brevo.py).

Behaviour, from Brevo's API reference:
- every request needs the `api-key` header; a missing or wrong key gets 401
  `{"code": "unauthorized", "message": "Key not found"}`; every error body is `{"code", "message"}`;
- 429 carries `x-sib-ratelimit-limit`, `x-sib-ratelimit-remaining`, `x-sib-ratelimit-reset`
  (seconds) and no Retry-After (https://developers.brevo.com/docs/limit-headers);
- `POST /v3/events`: `event_name` (letters, digits, `-`, `_`, <= 255) and `identifiers` (at least
  one of email_id, ext_id, phone_id, contact_id, whatsapp_id, landline_number_id) are required;
  `event_properties` keys follow the event_name rule and the properties are <= 50 KB;
  `contact_properties` values are strings, numbers or booleans. Answers 204 with no body.
  Brevo has no event id, so "dedupe" here means: an event whose `event_properties.messageId` was
  already accepted is counted as a duplicate (the real API would store it twice). The dedupe id an
  event is recorded under is therefore its Segment messageId; one without it is always new.
- `POST /v3/contacts`: one of `email`, `ext_id` or `attributes.SMS` is required. A contact that
  already exists (same email or ext_id) gets 400 `duplicate_parameter` "Contact already exist"
  unless `updateEnabled` is true, in which case it is replaced by the new one and the answer is
  204; if the email and the ext_id belong to two different contacts the answer is 400
  `duplicate_parameter`. A new contact answers 201 `{"id": <n>}`. Contacts are recorded under
  `contact:<email, else ext_id, else SMS>` of the contact they first created.
- A messageId, email or ext_id listed in `faults.poison_ids` is refused with 400
  `invalid_parameter`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from worker.standins.faults import StandinState

API_KEY_HEADER = "api-key"
EVENT_IDENTIFIERS = ("email_id", "ext_id", "phone_id", "contact_id", "whatsapp_id", "landline_number_id")
EVENT_PROPERTIES_MAX = 50 * 1024
RATE_LIMIT = 10  # POST /v3/events, general tier: 10 requests per second
_VALID_NAME = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
# Brevo's error codes for the statuses a fault can inject (other statuses: internal_error).
_ERROR_CODES = {401: "unauthorized", 403: "permission_denied"}


class BrevoApiError(Exception):
    """A request the API refuses, with the status and `{"code", "message"}` body it answers."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"code": code, "message": message}


def register(app: web.Application, state: StandinState, api_key: str) -> None:
    # email / ext_id -> the key its contact is recorded under in state.received.
    contact_index: dict[str, str] = {}
    contact_ids: dict[str, int] = {}

    async def events(request: web.Request) -> web.StreamResponse:
        async def accept(body: dict[str, Any]) -> web.StreamResponse:
            message_id = _validate_event(body)
            if message_id is None:
                state.accept(f"event#{state.requests}", body)
            else:
                _reject_poison(state, message_id)
                state.accept(message_id, body)
            return _respond(state, 204, None)

        return await _serve(request, state, api_key, accept)

    async def contacts(request: web.Request) -> web.StreamResponse:
        async def accept(body: dict[str, Any]) -> web.StreamResponse:
            identities = _validate_contact(body)
            _reject_poison(state, *identities.values())
            existing = _existing_contact(state, contact_index, identities)
            if existing is not None and not body.get("updateEnabled"):
                raise BrevoApiError(400, "duplicate_parameter", "Contact already exist")
            key = existing or f"contact:{next(iter(identities.values()))}"
            for identity in identities.values():
                contact_index[identity] = key
            created = existing is None
            if created:
                state.received[key] = body
                contact_ids[key] = len(contact_ids) + 1
                return _respond(state, 201, {"id": contact_ids[key]})
            _upsert(state, key, body)
            return _respond(state, 204, None)

        return await _serve(request, state, api_key, accept)

    app.router.add_post("/v3/events", events)
    app.router.add_post("/v3/contacts", contacts)


async def _serve(
    request: web.Request,
    state: StandinState,
    api_key: str,
    accept: Callable[[dict[str, Any]], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    failure = await state.injected_failure()
    if failure is not None:
        return _injected(state, *failure)
    if request.headers.get(API_KEY_HEADER) != api_key or state.faults.reject_key:
        return _respond(state, 401, {"code": "unauthorized", "message": "Key not found"})
    try:
        return await accept(_parse_object(await request.read()))
    except BrevoApiError as rejected:
        return _respond(state, rejected.status, rejected.body)


def _injected(state: StandinState, status: int, body: dict[str, Any], headers: dict[str, str]) -> web.StreamResponse:
    """An injected fault in Brevo's own shape: `{"code", "message"}`, rate limits in x-sib headers."""
    if status == 429:
        reset = headers.get("Retry-After", "1")
        sib_headers = {
            "x-sib-ratelimit-limit": str(RATE_LIMIT),
            "x-sib-ratelimit-remaining": "0",
            "x-sib-ratelimit-reset": reset,
        }
        return _respond(state, 429, {"code": "too_many_requests", "message": "Too many requests"}, sib_headers)
    message = str(next(iter(body.values()), "error"))
    return _respond(state, status, {"code": _ERROR_CODES.get(status, "internal_error"), "message": message}, headers)


def _respond(
    state: StandinState, status: int, body: dict[str, Any] | None, headers: dict[str, str] | None = None
) -> web.StreamResponse:
    state.statuses[status] += 1
    if body is None:
        return web.Response(status=status, headers=headers)
    return web.json_response(body, status=status, headers=headers)


def _parse_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BrevoApiError(400, "bad_request", "Invalid JSON in request body") from None
    if not isinstance(body, dict):
        raise BrevoApiError(400, "bad_request", "Request body must be a JSON object")
    return body


def _validate_event(body: dict[str, Any]) -> str | None:
    """Checks an event and returns the messageId it carries (its dedupe id), if any."""
    name = body.get("event_name")
    if not isinstance(name, str) or not name:
        raise BrevoApiError(400, "missing_parameter", "event_name is required")
    if not _VALID_NAME.match(name):
        raise BrevoApiError(400, "invalid_parameter", "event_name must be alphanumeric, - or _ (max 255)")
    identifiers = body.get("identifiers")
    if not isinstance(identifiers, dict) or not any(identifiers.get(k) for k in EVENT_IDENTIFIERS):
        raise BrevoApiError(400, "missing_parameter", "identifiers must hold at least one identifier")
    properties = body.get("event_properties", {})
    if not isinstance(properties, dict):
        raise BrevoApiError(400, "invalid_parameter", "event_properties must be an object")
    if bad := _invalid_keys(properties):
        raise BrevoApiError(400, "invalid_parameter", f"event_properties key {bad!r} is invalid")
    if len(json.dumps(properties).encode()) > EVENT_PROPERTIES_MAX:
        raise BrevoApiError(400, "invalid_parameter", "event_properties is larger than 50KB")
    contact_properties = body.get("contact_properties", {})
    if not isinstance(contact_properties, dict) or not all(
        isinstance(v, str | int | float | bool) for v in contact_properties.values()
    ):
        raise BrevoApiError(400, "invalid_parameter", "contact_properties values must be string, number or boolean")
    if "event_date" in body and not _is_iso_datetime(body["event_date"]):
        raise BrevoApiError(400, "invalid_parameter", "event_date must be an ISO 8601 timestamp")
    message_id = properties.get("messageId")
    return message_id if isinstance(message_id, str) and message_id else None


def _validate_contact(body: dict[str, Any]) -> dict[str, str]:
    """Checks a contact and returns its identities (email, ext_id, SMS) in lookup order."""
    attributes = body.get("attributes", {})
    if not isinstance(attributes, dict):
        raise BrevoApiError(400, "invalid_parameter", "attributes must be an object")
    email = body.get("email")
    if email is not None and (not isinstance(email, str) or "@" not in email):
        raise BrevoApiError(400, "invalid_parameter", "Invalid email address")
    list_ids = body.get("listIds", [])
    if not isinstance(list_ids, list) or not all(isinstance(i, int) and i > 0 for i in list_ids):
        raise BrevoApiError(400, "invalid_parameter", "listIds must be a list of list ids")
    if "updateEnabled" in body and not isinstance(body["updateEnabled"], bool):
        raise BrevoApiError(400, "invalid_parameter", "updateEnabled must be a boolean")
    candidates = {"email": email, "ext_id": body.get("ext_id"), "SMS": attributes.get("SMS")}
    identities = {kind: str(value) for kind, value in candidates.items() if value not in (None, "")}
    if not identities:
        raise BrevoApiError(400, "missing_parameter", "email, ext_id or attributes.SMS is required")
    return identities


def _existing_contact(state: StandinState, index: dict[str, str], identities: dict[str, str]) -> str | None:
    """The key of the stored contact these identities name; two different ones are a conflict."""
    keys = {index[i] for i in identities.values() if i in index and index[i] in state.received}
    if len(keys) > 1:
        message = "Unable to update contact, identifiers belong to different contacts"
        raise BrevoApiError(400, "duplicate_parameter", message)
    return next(iter(keys), None)


def _upsert(state: StandinState, key: str, item: dict[str, Any]) -> None:
    """An identical repeat is a duplicate; a changed contact replaces the stored one."""
    if state.received.get(key) == item:
        state.accept(key, item)
    else:
        state.received[key] = item


def _invalid_keys(properties: dict[str, Any]) -> str | None:
    for key, value in properties.items():
        if not _VALID_NAME.match(str(key)):
            return str(key)
        if isinstance(value, dict) and (bad := _invalid_keys(value)):
            return bad
    return None


def _is_iso_datetime(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _reject_poison(state: StandinState, *identities: str) -> None:
    for identity in identities:
        if identity in state.faults.poison_ids:
            raise BrevoApiError(400, "invalid_parameter", f"Invalid value for {identity}")
