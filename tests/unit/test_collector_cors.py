"""CORS, the short and Jitsu SDK paths, and the type check at the door: over real sockets against
CollectorThread on the real broker (no mocks). The browser itself is in
tests/integration/test_sdk_clients.py."""

from __future__ import annotations

import base64
import gzip
import socket
import time
from collections.abc import Iterator

import orjson
import pytest
import requests

from tests.kafka_helpers import read_count, settings_for, settle, setup_topics
from worker.collector.app import ROUTES
from worker.collector.payloads import EVENT_TYPES, Shape
from worker.collector.server import CollectorThread
from worker.collector.settings import CollectorSettings
from worker.config import Config
from worker.kafka.broker import LoopbackBroker

KEY = "wk_cors"
PAGE = "https://shop.example"
OTHER_PAGE = "https://evil.example"
READ_TIMEOUT = 1.0
# What analytics-next's preflight asks for (X-Retry-Count only when it resends), and more.
REQUESTED = "authorization, content-type, x-retry-count"


@pytest.fixture
def settings(broker: LoopbackBroker, prefix: str) -> Config:
    settings = settings_for(broker, prefix, partitions=1)
    setup_topics(settings)
    return settings


def running(settings: Config, **values: object) -> CollectorThread:
    collector_settings = CollectorSettings(write_keys=[KEY], read_timeout_seconds=READ_TIMEOUT, **values)  # type: ignore[arg-type, list-item]
    return CollectorThread(settings, collector_settings)


@pytest.fixture
def collector(settings: Config) -> Iterator[CollectorThread]:
    with running(settings) as collector:
        yield collector


@pytest.fixture
def listed(settings: Config) -> Iterator[CollectorThread]:
    with running(settings, cors_origins=f"{PAGE},http://127.0.0.1:8000") as collector:
        yield collector


def basic(key: str = KEY) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def preflight(url: str, origin: str = PAGE, requested: str | None = REQUESTED) -> requests.Response:
    headers = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    if requested is not None:
        headers["Access-Control-Request-Headers"] = requested
    return requests.options(url, headers=headers, timeout=10)


# -- preflights ----------------------------------------------------------------------------------


def test_every_route_answers_a_preflight_without_a_key(collector: CollectorThread, settings: Config) -> None:
    for route in ROUTES:
        answer = preflight(collector.url + route.path)
        assert answer.status_code == 204, (route.path, answer.status_code, answer.text)
        assert answer.headers["Access-Control-Allow-Origin"] == "*"
        assert answer.headers["Access-Control-Allow-Methods"] == "POST, OPTIONS"
        assert answer.headers["Access-Control-Allow-Headers"] == REQUESTED  # echoed: `*` would not cover Authorization
        assert int(answer.headers["Access-Control-Max-Age"]) > 0
        assert answer.content == b""
    assert settle(settings, "raw", timeout=1) == []  # a preflight writes nothing


def test_a_preflight_echoes_only_header_names(collector: CollectorThread) -> None:
    answer = preflight(f"{collector.url}/v1/t", requested="Authorization, X-Retry-Count,  , bad header, é")
    assert answer.headers["Access-Control-Allow-Headers"] == "authorization, x-retry-count"
    without = preflight(f"{collector.url}/v1/t", requested=None)
    assert without.status_code == 204 and "Access-Control-Allow-Headers" not in without.headers


def test_preflights_are_counted_by_endpoint_and_origin(listed: CollectorThread) -> None:
    def count(allowed: str) -> float:
        text = requests.get(f"{listed.url}/metrics", timeout=5).text
        line = f'segment_worker_collector_preflights_total{{allowed="{allowed}",endpoint="/v1/b"}}'
        return next((float(row.split()[-1]) for row in text.splitlines() if row.startswith(line)), 0.0)

    before = count("true"), count("false")
    preflight(f"{listed.url}/v1/b")
    preflight(f"{listed.url}/v1/b", origin=OTHER_PAGE)
    assert (count("true"), count("false")) == (before[0] + 1, before[1] + 1)


# -- the origin header on every answer -------------------------------------------------------------


def test_every_answer_carries_the_origin_header_errors_included(collector: CollectorThread) -> None:
    event = {"type": "track", "userId": "u1", "event": "E"}
    origin = {"Origin": PAGE}
    answers = {
        200: requests.post(f"{collector.url}/v1/t", json=event, headers={**origin, **basic()}),
        401: requests.post(f"{collector.url}/v1/t", json=event, headers={**origin, **basic("wrong")}),
        400: requests.post(f"{collector.url}/v1/t", data=b"{not json", headers={**origin, **basic()}),
        413: requests.post(f"{collector.url}/v1/b", data=b"x" * (1024 * 1024 + 1), headers={**origin, **basic()}),
        415: requests.post(
            f"{collector.url}/v1/t", data=b"{}", headers={**origin, **basic(), "Content-Encoding": "br"}
        ),
        404: requests.post(f"{collector.url}/v2/nothing", json=event, headers=origin),
        405: requests.get(f"{collector.url}/v1/t", headers=origin),
    }
    for status, answer in answers.items():
        assert answer.status_code == status, (status, answer.text)
        assert answer.headers.get("Access-Control-Allow-Origin") == "*", (status, answer.headers)
    # Also to a request with no Origin (curl, a server SDK): `*` depends on nothing.
    assert requests.post(f"{collector.url}/v1/t", json=event, headers=basic()).headers["Access-Control-Allow-Origin"]


def test_the_operations_endpoints_have_no_cors(collector: CollectorThread) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        answer = requests.get(collector.url + path, headers={"Origin": PAGE}, timeout=10)
        assert answer.status_code == 200 and "Access-Control-Allow-Origin" not in answer.headers, path


def test_a_refusal_before_the_body_carries_it(collector: CollectorThread) -> None:
    """`Expect: 100-continue` with a wrong key: answered from the headers alone, with the CORS headers."""
    with socket.create_connection((collector.host, collector.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/t HTTP/1.1\r\nHost: c\r\nOrigin: https://shop.example\r\nContent-Length: 2\r\n"
            b"Expect: 100-continue\r\nAuthorization: Basic d3Jvbmc6\r\n\r\n"
        )
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"\r\nAccess-Control-Allow-Origin: *\r\n" in answer, answer[:500]


def test_the_header_timeout_answer_carries_it(collector: CollectorThread) -> None:
    """The 408 written outside aiohttp, for headers that never completed."""
    with socket.create_connection((collector.host, collector.port), timeout=READ_TIMEOUT + 5) as sock:
        sock.sendall(b"POST /v1/t HTTP/1.1\r\nHost: c\r\n")
        answer = b""
        deadline = time.monotonic() + READ_TIMEOUT + 5
        while time.monotonic() < deadline and (chunk := sock.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"\r\nAccess-Control-Allow-Origin: *\r\n" in answer, answer[:500]


def test_listed_origins_are_echoed_with_vary_and_others_get_none(listed: CollectorThread) -> None:
    event = {"type": "track", "userId": "u1", "event": "E"}
    mine = requests.post(f"{listed.url}/v1/t", json=event, headers={"Origin": PAGE, **basic()})
    assert mine.status_code == 200
    assert mine.headers["Access-Control-Allow-Origin"] == PAGE and mine.headers["Vary"] == "Origin"
    refused = requests.post(f"{listed.url}/v1/t", json=event, headers={"Origin": PAGE, **basic("wrong")})
    assert refused.status_code == 401 and refused.headers["Access-Control-Allow-Origin"] == PAGE
    # An unlisted page: no CORS headers, so its browser shows the page nothing; the answer still
    # varies by Origin, for caches.
    theirs = requests.post(f"{listed.url}/v1/t", json=event, headers={"Origin": OTHER_PAGE, **basic()})
    assert "Access-Control-Allow-Origin" not in theirs.headers and theirs.headers["Vary"] == "Origin"
    no_origin = requests.post(f"{listed.url}/v1/t", json=event, headers=basic())
    assert "Access-Control-Allow-Origin" not in no_origin.headers
    assert preflight(f"{listed.url}/v1/t").headers["Access-Control-Allow-Origin"] == PAGE
    unlisted = preflight(f"{listed.url}/v1/t", origin=OTHER_PAGE)
    assert unlisted.status_code == 204
    assert not [name for name in unlisted.headers if name.lower().startswith("access-control-")]


def test_an_empty_origin_list_allows_no_page(settings: Config) -> None:
    with running(settings, cors_origins="") as collector:
        answer = preflight(f"{collector.url}/v1/t")
        assert answer.status_code == 204
        assert not [name for name in answer.headers if name.lower().startswith("access-control-")]


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("*", ["*"]),
        ("", []),
        ("https://shop.example, http://127.0.0.1:8080", ["https://shop.example", "http://127.0.0.1:8080"]),
        ("https://shop.example/", None),  # a trailing slash: never what a browser sends
        ("shop.example", None),
        ("https://Shop.example", None),
        ("*,https://shop.example", None),
        ("https://shop.example:70000", None),
    ],
)
def test_cors_origins_setting(value: str, accepted: list[str] | None) -> None:
    if accepted is None:
        with pytest.raises(ValueError, match="cors_origins"):
            CollectorSettings(cors_origins=value)  # type: ignore[arg-type]
    else:
        assert CollectorSettings(cors_origins=value).cors_origins == accepted  # type: ignore[arg-type]


# -- the SDKs' paths ---------------------------------------------------------------------------------


def stored(settings: Config, count: int) -> list[dict]:
    events = []
    for message in read_count(settings, "raw", count, timeout=20):
        document = orjson.loads(message.value())
        events.extend(document.get("batch", [document]))
    return events


def test_the_route_table_has_every_sdk_path() -> None:
    by_path = {route.path: route for route in ROUTES}
    assert len(by_path) == len(ROUTES)
    for prefix in ("/v1", ""):
        for letter, kind in zip("tipsga", ("track", "identify", "page", "screen", "group", "alias"), strict=True):
            assert (by_path[f"{prefix}/{letter}"].shape, by_path[f"{prefix}/{letter}"].event_type) == (
                Shape.EVENT,
                kind,
            )
        assert by_path[f"{prefix}/b"].shape is Shape.BATCH
    for base in ("/api/v1/segment", "/api/v1/segment/compat"):
        assert by_path[base].shape is by_path[f"{base}/v1/batch"].shape is Shape.EITHER
        for kind in EVENT_TYPES:
            assert by_path[f"{base}/v1/{kind}"].event_type == kind


def test_short_paths_set_the_type_and_b_takes_a_batch(collector: CollectorThread, settings: Config) -> None:
    sent = 0
    for prefix in ("/v1", ""):
        for letter, kind in (("t", "track"), ("p", "page"), ("i", "identify")):
            body = {"type": kind, "anonymousId": "a1", "event": "E", "writeKey": KEY}
            # analytics.js's own request: text/plain, key in the header and the body.
            answer = requests.post(
                f"{collector.url}{prefix}/{letter}",
                data=orjson.dumps(body),
                headers={"Content-Type": "text/plain", **basic()},
            )
            assert answer.status_code == 200 and answer.json() == {"success": True}, answer.text
            sent += 1
        batch = {"batch": [{"type": "screen", "userId": "u1", "name": "Home"}], "writeKey": KEY}
        assert requests.post(f"{collector.url}{prefix}/b", json=batch).status_code == 200
        sent += 1
    events = stored(settings, sent)
    assert [e["type"] for e in events] == ["track", "page", "identify", "screen"] * 2


def test_jitsu_sdk_paths(collector: CollectorThread, settings: Config) -> None:
    single = {"type": "track", "userId": "u1", "event": "One"}
    answers = [
        # analytics-python, the legacy analytics-node, analytics-go at host `.../api/v1/segment`.
        requests.post(f"{collector.url}/api/v1/segment/v1/batch", json={"batch": [single]}, headers=basic()),
        requests.post(
            f"{collector.url}/api/v1/segment/compat/v1/batch",
            data=gzip.compress(orjson.dumps({"batch": [single]})),
            headers={"Content-Encoding": "gzip", "X-Auth-Token": KEY},
        ),
        # Jitsu takes one event on its batch path too.
        requests.post(f"{collector.url}/api/v1/segment/v1/batch", json=single, params={"token": KEY}),
        # Segment's typed path under the Jitsu base: the path decides the type.
        requests.post(f"{collector.url}/api/v1/segment/v1/identify", json={"userId": "u1"}, headers=basic()),
    ]
    assert [(a.status_code, a.json()) for a in answers] == [(200, {"status": "ok"})] * 4
    assert [e["type"] for e in stored(settings, 4)] == ["track", "track", "track", "identify"]


# -- what the normaliser could not route is refused at the door -------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        ("/api/v1/segment", {"userId": "u1", "event": "E"}, "`type` must be one of"),
        ("/api/v1/segment/compat", {"type": "Track", "userId": "u1"}, "got 'Track'"),
        ("/api/v1/segment/v1/batch", {"userId": "u1"}, "`type` must be one of"),
        ("/api/v1/segment", {"type": None, "userId": "u1"}, "got 'None'"),
        ("/v1/batch", {"batch": [{"type": "track", "userId": "u", "event": "E"}, {"userId": "u"}]}, "batch[1]: `type`"),
        ("/v1/b", {"batch": [{"type": ["track"], "userId": "u"}]}, "batch[0]: `type`"),
        ("/api/v1/segment", {"batch": [{"type": "bogus", "userId": "u"}]}, "batch[0]: `type`"),
    ],
)
def test_an_event_without_a_known_type_is_400_and_nothing_is_written(
    collector: CollectorThread, settings: Config, path: str, body: dict, reason: str
) -> None:
    answer = requests.post(collector.url + path, json=body, headers={"Origin": PAGE, **basic()})
    assert answer.status_code == 400, answer.text
    assert answer.json()["code"] == "invalid_request" and reason in answer.json()["message"], answer.text
    assert answer.headers["Access-Control-Allow-Origin"] == "*"
    assert settle(settings, "raw", timeout=1) == []
