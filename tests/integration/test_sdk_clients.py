"""Real Segment SDKs against the collector as a process (`segment-worker collect`), on a real broker:

- analytics.js (`@segment/analytics-next`) in a page served from another loopback port, in Debian's
  headless Chromium driven by playwright-core (tests/clients/browser.mjs): cross-origin, so the
  browser's CORS rules apply, preflights included; followed through the normaliser to
  `dest.amplitude`;
- the Node.js SDKs, current (`@segment/analytics-node`) and legacy (`analytics-node` v6), run by
  node (tests/clients/node_sdk.cjs), at Segment's root and at Jitsu's `/api/v1/segment`;
- analytics-python at Jitsu's `/api/v1/segment`, plain and gzip.

The JavaScript packages are pinned in tests/clients/package.json (`make clients` installs them and
Chromium). Without node, node_modules or Chromium the JavaScript tests are skipped with the reason.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
from confluent_kafka import Message
from prometheus_client.parser import text_string_to_metric_families
from segment import analytics

from tests.integration.test_collector import CollectorProcess
from tests.kafka_helpers import read, role_env, settings_for, settle, setup_topics, start_role
from worker.avro_codec import EventCodec
from worker.config import Config
from worker.kafka.broker import LoopbackBroker, free_port

pytestmark = pytest.mark.integration
# What the SDKs send and the collector answers does not depend on the broker (the collector's
# writes are tested on both in test_collector.py and test_collector_keys.py): the first broker is enough.
FIRST_BROKER_ONLY = True

KEY = "wk_sdk_clients"
CLIENTS = Path(__file__).resolve().parents[1] / "clients"
NODE_MODULES = CLIENTS / "node_modules"
UMD_BUNDLES = NODE_MODULES / "@segment" / "analytics-next" / "dist" / "umd"
CHROMIUM_PATHS = ("/usr/bin/chromium",)
JITSU = "/api/v1/segment"


# -- what the JavaScript tests need ------------------------------------------------------------------


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (`make clients` needs it; Debian: apt-get install nodejs npm)")
    if not (NODE_MODULES / "@segment" / "analytics-node").is_dir() or not (NODE_MODULES / "analytics-node").is_dir():
        pytest.skip(f"{NODE_MODULES} is missing or incomplete: run `make clients`")
    return node


def _chromium() -> str:
    for path in CHROMIUM_PATHS:
        if Path(path).is_file():
            return path
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("Chromium is not installed (no /usr/bin/chromium): run `make clients`")
    return found


def _run_node(node: str, script: str, *args: str, timeout: float = 90) -> dict[str, Any]:
    done = subprocess.run(
        [node, str(CLIENTS / script), *args], cwd=CLIENTS, capture_output=True, text=True, timeout=timeout
    )
    try:
        output: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"{script} exited {done.returncode}: {done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        ) from None
    output["exit_code"] = done.returncode
    output["stderr"] = done.stderr[-4000:]
    return output


# -- the collector, one per module and broker ----------------------------------------------------------


@pytest.fixture(scope="module")
def settings(broker: LoopbackBroker) -> Config:
    settings = settings_for(broker, f"sdk{uuid.uuid4().hex[:8]}.", partitions=2)
    setup_topics(settings)
    return settings


@pytest.fixture(scope="module")
def collector(settings: Config, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CollectorProcess]:
    log = tmp_path_factory.mktemp("collector") / "collect.log"
    running = CollectorProcess(role_env(settings, COLLECTOR_WRITE_KEYS=KEY), log)
    try:
        yield running
    finally:
        assert running.terminate() == 0, running.log_path.read_text()


def raw_events_of(settings: Config, user_ids: set[str], count: int, timeout: float = 30) -> list[dict[str, Any]]:
    """The events on segment.raw of these users (one a message: bare from a typed path, in a
    one-event batch envelope from a batch)."""

    def event_of(message: Message) -> dict[str, Any]:
        document = orjson.loads(message.value())
        return document["batch"][0] if "batch" in document else document

    def mine(messages: list[Message]) -> list[dict[str, Any]]:
        events = [event_of(m) for m in messages]
        return [e for e in events if e.get("userId") in user_ids or e.get("anonymousId") in user_ids]

    return mine(read(settings, "raw", lambda seen: len(mine(seen)) >= count, timeout))


def counter(url: str, name: str, **labels: str) -> float:
    """A collector counter's value from its /metrics (0 when it has not counted yet)."""
    text = requests.get(f"{url}/metrics", timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def requests_to(url: str, endpoint: str) -> float:
    return counter(url, "segment_worker_collector_requests_total", endpoint=endpoint, status="200")


# -- the browser: analytics.js in a page of another origin -------------------------------------------


PAGE = """<!doctype html>
<html>
<head><meta charset="utf-8"><title>segment-worker SDK test page</title></head>
<body>
<script src="/analytics-next/bundles/index.js"></script>
<script>
(async () => {
  const config = %(config)s;
  const result = { calls: {}, error: null };
  try {
    // No Segment CDN: the settings it would serve are given here, the write key among them
    // (the Segment.io plugin reads it from its own settings, `apiKey`), and the collector as apiHost.
    const [analytics] = await AnalyticsNext.AnalyticsBrowser.load(
      {
        writeKey: config.writeKey,
        cdnSettings: { integrations: { "Segment.io": { apiKey: config.writeKey } } },
      },
      { integrations: { "Segment.io": { apiHost: config.apiHost, protocol: "http" } } },
    );
    const calls = [
      ["page", () => analytics.page("Docs", "Getting Started", { section: "sdk" })],
      ["track", () => analytics.track("Button Clicked", { button: "signup" })],
      ["identify", () => analytics.identify(config.userId, { plan: "pro" })],
    ];
    for (const [name, call] of calls) {
      const ctx = await call();
      const failed = ctx.failedDelivery();
      result.calls[name] = {
        messageId: ctx.event.messageId,
        anonymousId: ctx.event.anonymousId,
        failed: failed ? String(failed.reason) : null,
      };
    }
  } catch (error) {
    result.error = String((error && error.stack) || error);
  }
  window.__result = result;
})();
</script>
</body>
</html>
"""


class PageServer:
    """The test page and analytics-next's UMD bundles (from node_modules) on a loopback port of
    their own: the page's origin differs from the collector's, as on a real site."""

    def __init__(self, config: dict[str, str]) -> None:
        page = (PAGE % {"config": json.dumps(config)}).encode()
        self.served: list[str] = []
        handler = functools.partial(_PageHandler, page, self.served)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, name="page-server", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


class _PageHandler(http.server.BaseHTTPRequestHandler):
    def __init__(self, page: bytes, served: list[str], *args: Any) -> None:
        self.page = page
        self.served = served
        super().__init__(*args)

    def do_GET(self) -> None:
        self.served.append(self.path)
        if self.path == "/":
            self._answer(200, "text/html; charset=utf-8", self.page)
            return
        if self.path == "/favicon.ico":  # asked for by every page; a 404 would be an error in the console
            self._answer(204, "image/x-icon", b"")
            return
        prefix = "/analytics-next/bundles/"
        name = self.path[len(prefix) :] if self.path.startswith(prefix) else ""
        bundle = UMD_BUNDLES / name
        # Only the bundles' own files, by name: nothing else of the machine is served.
        if name and "/" not in name and bundle.is_file():
            self._answer(200, "application/javascript", bundle.read_bytes())
            return
        self._answer(404, "text/plain", b"not found\n")

    def _answer(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return  # the test records what it served; stderr stays quiet


def test_analytics_js_in_chromium_reaches_the_destination_topic(
    collector: CollectorProcess, settings: Config, tmp_path: Path
) -> None:
    node = _node()
    chromium = _chromium()
    if not (UMD_BUNDLES / "index.js").is_file() or not (NODE_MODULES / "playwright-core").is_dir():
        pytest.skip(f"analytics-next's bundle or playwright-core is missing from {NODE_MODULES}: run `make clients`")
    user_id = f"browser-{uuid.uuid4().hex[:8]}"
    api_host = f"127.0.0.1:{collector.port}/v1"  # analytics.js's own default is `api.segment.io/v1`
    preflights_before = counter(collector.url, "segment_worker_collector_preflights_total", allowed="true")
    page = PageServer({"writeKey": KEY, "apiHost": api_host, "userId": user_id})
    try:
        browser = _run_node(node, "browser.mjs", page.url, chromium)
    finally:
        page.stop()
    report = json.dumps({k: browser[k] for k in ("result", "console", "errors", "stderr")}, indent=1)[:6000]
    assert browser["exit_code"] == 0 and not browser["errors"], report
    result = browser["result"]
    assert result["error"] is None, report
    assert set(result["calls"]) == {"page", "track", "identify"}, report
    assert all(call["failed"] is None for call in result["calls"].values()), report
    assert "Chrome/" in browser["userAgent"]
    # The page came from the page server only: no Segment CDN, no lazily loaded chunk from elsewhere.
    elsewhere = [r["url"] for r in browser["requests"] if not r["url"].startswith(("http://127.0.0.1:", "data:"))]
    assert elsewhere == [], elsewhere

    # What the browser sent: a preflight (OPTIONS, it asks for `authorization`) per path, answered
    # 204 with the page's origin allowed; then one POST per call, never resent.
    to_collector = [r for r in browser["requests"] if r["url"].startswith(collector.url)]
    posts = [r for r in to_collector if r["method"] == "POST"]
    preflights = [r for r in to_collector if r["method"] == "OPTIONS"]
    assert sorted(r["url"].removeprefix(collector.url) for r in posts) == ["/v1/i", "/v1/p", "/v1/t"], to_collector
    for post in posts:
        assert post["status"] == 200, post
        assert post["responseHeaders"].get("access-control-allow-origin") == "*", post
        assert not any(name.lower() == "x-retry-count" for name in post["headers"]), post
        assert post["failed"] is None, post
    assert preflights, f"the browser reported no preflight: {to_collector}"
    for preflight in preflights:
        assert preflight["status"] == 204, preflight
        assert preflight["responseHeaders"].get("access-control-allow-origin") == "*", preflight
        assert "authorization" in preflight["responseHeaders"].get("access-control-allow-headers", ""), preflight
    # The collector's side of it: it answered the preflights (at least one; the browser reports
    # each it sent, and caches the answer per URL).
    preflights_after = counter(collector.url, "segment_worker_collector_preflights_total", allowed="true")
    assert preflights_after - preflights_before >= 3, (preflights_before, preflights_after)

    # segment.raw: exactly one event per call (no retry wrote a second copy), stamped.
    anonymous_id = result["calls"]["page"]["anonymousId"]
    raw = raw_events_of(settings, {user_id, anonymous_id}, 3)
    time.sleep(1)  # anything more (a resend) would have arrived with them
    raw = raw_events_of(settings, {user_id, anonymous_id}, 3)
    assert sorted(e["type"] for e in raw) == ["identify", "page", "track"], raw
    assert {e["messageId"] for e in raw} == {c["messageId"] for c in result["calls"].values()}
    for event in raw:
        assert event["context"]["ip"] == "127.0.0.1"
        assert "writeKey" not in event

    # Through the normaliser to the destination topic, enriched from the browser's context.
    normaliser = start_role(settings, ["normalize"], tmp_path, DESTINATIONS="amplitude")
    try:
        codec = EventCodec()
        wanted = {c["messageId"] for c in result["calls"].values()}

        def ours(messages: list[Message]) -> list[dict[str, Any]]:
            decoded = [codec.decode(m.value())[0] for m in messages]
            return [e for e in decoded if e["messageId"] in wanted]

        delivered = ours(read(settings, "dest.amplitude", lambda seen: len(ours(seen)) >= 3, timeout=60))
    finally:
        assert normaliser.terminate() == 0, normaliser.log_path.read_text() if normaliser.log_path else ""
    assert sorted(e["type"] for e in delivered) == ["identify", "page", "track"], delivered
    by_type = {e["type"]: e for e in delivered}
    for event in delivered:
        context = event["context"]
        assert context["userAgent"] == browser["userAgent"]
        assert "Chrome/" in context["userAgent"]
        assert context["page"]["url"] == page.url
        assert context["ip"] == "127.0.0.1"
        assert context["library"]["name"] == "analytics.js"
        assert context["browser"]["name"] and context["os"]["name"]  # enriched from the user agent
    assert by_type["track"]["event"] == "Button Clicked"
    assert by_type["page"]["name"] == "Getting Started"
    assert by_type["identify"]["userId"] == user_id
    assert by_type["identify"]["traits"] == {"plan": "pro"}


# -- the Node.js SDKs --------------------------------------------------------------------------------

# (package, host suffix, path option, the path it posts to). @segment/analytics-node joins host and
# path with `new URL(path, host)`, so a host's own path (Jitsu's `/api/v1/segment`) is dropped and
# it posts to `/v1/batch`; to reach the Jitsu path it needs `path`. The legacy analytics-node v6
# appends its path to the host as text, which is what Jitsu documents.
NODE_CASES = [
    ("@segment/analytics-node", "", None, "/v1/batch"),
    ("@segment/analytics-node", JITSU, None, "/v1/batch"),
    ("@segment/analytics-node", "", f"{JITSU}/v1/batch", f"{JITSU}/v1/batch"),
    ("analytics-node", "", None, "/v1/batch"),
    ("analytics-node", JITSU, None, f"{JITSU}/v1/batch"),
    ("analytics-node", f"{JITSU}/compat", None, f"{JITSU}/compat/v1/batch"),
]


@pytest.mark.parametrize(
    ("package", "host_suffix", "path", "posted_to"),
    NODE_CASES,
    ids=[f"{p}-host{h or '/'}-path{o or '(default)'}" for p, h, o, _ in NODE_CASES],
)
def test_node_sdks_land_on_raw(
    collector: CollectorProcess, settings: Config, package: str, host_suffix: str, path: str | None, posted_to: str
) -> None:
    node = _node()
    user_id = f"node-{uuid.uuid4().hex[:8]}"
    before = requests_to(collector.url, posted_to)
    args = [package, collector.url + host_suffix, KEY, user_id, *([path] if path else [])]
    output = _run_node(node, "node_sdk.cjs", *args)
    assert output["exit_code"] == 0 and not output["errors"], output
    assert {r["url"] for r in output["requests"]} == {collector.url + posted_to}, output
    assert requests_to(collector.url, posted_to) - before == len(output["requests"])

    events = raw_events_of(settings, {user_id}, 2)
    assert sorted(e["type"] for e in events) == ["identify", "track"]
    library = "analytics-node" if package == "analytics-node" else "@segment/analytics-node"
    for event in events:
        assert event["context"]["library"]["name"] == library
        assert event["context"]["ip"] == "127.0.0.1"


# -- analytics-python at Jitsu's path ---------------------------------------------------------------


@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
def test_analytics_python_at_the_jitsu_path(collector: CollectorProcess, settings: Config, gzip: bool) -> None:
    user_id = f"python-{uuid.uuid4().hex[:8]}"
    before = requests_to(collector.url, f"{JITSU}/v1/batch")
    client = analytics.Client(write_key=KEY, host=collector.url + JITSU, sync_mode=True, max_retries=0, gzip=gzip)
    assert client.track(user_id, "Python SDK Track", {"gzip": gzip})[0]
    assert client.identify(user_id, {"plan": "pro"})[0]
    assert requests_to(collector.url, f"{JITSU}/v1/batch") - before == 2  # sync mode: a request a call
    events = raw_events_of(settings, {user_id}, 2)
    assert sorted(e["type"] for e in events) == ["identify", "track"]
    assert all(e["context"]["library"]["name"] == "analytics-python" for e in events)


# -- the collector refuses at the door what the normaliser could not route ----------------------------


def test_a_jitsu_body_without_a_type_is_refused_and_nothing_is_written(
    collector: CollectorProcess, settings: Config
) -> None:
    user_id = f"untyped-{uuid.uuid4().hex[:8]}"
    for path in (JITSU, f"{JITSU}/compat", f"{JITSU}/v1/batch", "/v1/batch", "/v1/b"):
        body: dict[str, Any] = {"userId": user_id, "event": "No Type"}
        if path != JITSU:
            body = {"batch": [{"type": "track", "userId": user_id, "event": "Fine"}, body]}
        answer = requests.post(collector.url + path, json=body, auth=(KEY, ""), timeout=10)
        assert answer.status_code == 400, (path, answer.text)
        assert "`type` must be one of" in answer.json()["message"], answer.text
        assert answer.headers["Access-Control-Allow-Origin"] == "*"
    assert [m for m in settle(settings, "raw", timeout=2) if user_id.encode() in m.value()] == []
    # The same body with its type is taken.
    typed = requests.post(
        f"{collector.url}{JITSU}", json={"type": "track", "userId": user_id, "event": "Typed"}, auth=(KEY, "")
    )
    assert typed.status_code == 200 and typed.json() == {"status": "ok"}
    assert [e["event"] for e in raw_events_of(settings, {user_id}, 1)] == ["Typed"]
