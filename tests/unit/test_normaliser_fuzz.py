"""Property tests: no input makes the normaliser raise, and what it routes is always well formed.

One bad record must never stop the normaliser (the next group member would crash on it too), so for
any bytes, and for JSON-ish payloads built to probe every step (unicode digits, huge numbers,
NaN/Infinity as raw text, nesting around and past the encoder's limit, timestamps of many shapes,
batch envelopes mixing good and bad items), `Normaliser.process`:

- returns a Result and never raises;
- accounts for every event exactly once (routed, rejected or filtered);
- rejects only for reasons it understood: a reason "<ExceptionType>: ..." is an exception caught by
  the last-resort containment, i.e. a bug whose cause still needs fixing;
- routes only values the Avro codec decodes back to the event, with canonical timestamps.

Examples per test: 300, or FUZZ_EXAMPLES. Failures hypothesis found are kept as plain tests in
tests/unit/test_segment_regressions.py. The strategies are shared with
tests/integration/test_normaliser_poison.py.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta, timezone

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.avro_codec import EventCodec
from worker.normalize.geo import GeoEnricher
from worker.normalize.identities import IdentityMap
from worker.normalize.pipeline import Normaliser, Result
from worker.normalize.user_agent import UserAgentEnricher
from worker.segment.event import EVENT_TYPES

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
ALL = ["amplitude", "amberflo", "reteno", "brevo"]
KAFKA_TS = 1_795_000_000_000
AT = ("t.segment.raw", 3, 1234)
CODEC = EventCodec()
# A reason of this shape comes from the containment's catch-all: an exception nobody expected.
UNEXPECTED = re.compile(r"^[A-Za-z_]\w*: ")
CANONICAL = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")


def js(value: object) -> str:
    return orjson.dumps(value).decode()


def obj(fields: dict[str, str] | list[tuple[str, str]]) -> str:
    """A JSON object from already-encoded values (so they can be raw text JSON cannot express)."""
    pairs = fields.items() if isinstance(fields, dict) else fields
    return "{" + ",".join(f"{js(k)}:{v}" for k, v in pairs) + "}"


# -- leaves ------------------------------------------------------------------------------------

# Characters str.isdigit() accepts besides 0-9: superscripts (int() refuses them), Arabic-Indic,
# Extended Arabic-Indic, Devanagari, Thai, NKo, mathematical and fullwidth digits (int() reads those).
UNICODE_DIGITS = "²³¹٠١٢٣٤٥٦٧٨٩۰۱۲०१२३๕߀𝟎𝟙𝟠０１２"
DIGITS = "0123456789" + UNICODE_DIGITS

texts = st.text(max_size=30)
digit_texts = st.text(alphabet=DIGITS, min_size=1, max_size=24)
raw_numbers = st.one_of(
    st.integers().map(str),
    st.integers(min_value=2**63 - 3, max_value=2**64 + 3).map(str),  # around int64/uint64
    st.integers(min_value=10**18, max_value=10**400).map(str),  # past a double
    st.floats(allow_nan=True, allow_infinity=True).map(repr),  # "nan", "inf": not JSON
    st.sampled_from(["NaN", "-NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "-0", "1E+2", "01", ".5"]),
    digit_texts,  # unicode digits as number text: not JSON
)

# Timestamps: canonical-looking with any digits, every ISO shape fromisoformat knows, the edges of
# the datetime range with offsets, garbage, and values that are not strings at all.
_TEMPLATE = "dddd-dd-ddTdd:dd:dd.dddZ"


def _fill(digits: list[str]) -> str:
    it = iter(digits)
    return "".join(next(it) if c == "d" else c for c in _TEMPLATE)


offsets = st.timedeltas(min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59))
datetimes = st.one_of(
    st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 12, 31), timezones=st.none()),
    st.datetimes(
        min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999), timezones=st.none()
    ),
)


def canonical(d: datetime) -> str:
    return f"{d.year:04d}-{d:%m-%dT%H:%M:%S}.{d.microsecond // 1000:03d}Z"


_DIGIT_AT = [i for i, c in enumerate(_TEMPLATE) if c == "d"]


@st.composite
def unicode_digit_timestamps(draw: st.DrawFn) -> str:
    """A canonical timestamp with a few of its digits swapped for other digits str.isdigit() accepts."""
    text = list(canonical(draw(datetimes)))
    for at in draw(st.lists(st.sampled_from(_DIGIT_AT), min_size=1, max_size=3, unique=True)):
        text[at] = draw(st.sampled_from(UNICODE_DIGITS))
    return "".join(text)


canonical_timestamps = datetimes.map(canonical)
timestamp_texts = st.one_of(
    canonical_timestamps,
    canonical_timestamps,
    unicode_digit_timestamps(),
    st.lists(st.sampled_from(DIGITS), min_size=17, max_size=17).map(_fill),
    st.tuples(datetimes, st.none() | offsets.map(timezone), st.sampled_from(["auto", "milliseconds", "seconds"])).map(
        lambda t: t[0].replace(tzinfo=t[1]).isoformat(timespec=t[2])
    ),
    datetimes.map(lambda d: d.isoformat(sep=" ")),
    datetimes.map(lambda d: f"{d.year:04d}{d:%m%dT%H%M%S}Z"),
    datetimes.map(lambda d: f"{d.isocalendar().year:04d}-W{d:%V-%uT%H:%M:%S}.000Z"),  # week date, canonical length
    datetimes.map(lambda d: d.date().isoformat()),
    st.sampled_from(
        [
            "0001-01-01T00:00:00+01:00",
            "0001-01-01T00:00:00.000Z",
            "9999-12-31T23:59:59-23:59",
            "9999-12-31T23:59:59.999Z",
            "0999-06-01T00:00:00.000Z",
            "2026-02-30T00:00:00.000Z",
            "2026-11-22T24:00:00.000Z",
            "",
        ]
    ),
    texts,
)
timestamp_values = st.one_of(
    timestamp_texts.map(js), timestamp_texts.map(js), raw_numbers, st.sampled_from(["null", "true", "[]", "{}"])
)

leaves = st.one_of(
    st.sampled_from(["null", "true", "false"]),
    raw_numbers,
    texts.map(js),
    digit_texts.map(js),
    timestamp_texts.map(js),
)
SEGMENT_KEYS = [
    "type",
    "messageId",
    "userId",
    "anonymousId",
    "event",
    "name",
    "groupId",
    "previousId",
    "properties",
    "traits",
    "context",
    "integrations",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "receivedAt",
    "batch",
    "ip",
    "userAgent",
    "device",
    "id",
    "location",
    "All",
    "Amplitude",
]
keys = st.one_of(st.sampled_from(SEGMENT_KEYS), texts)


def _containers(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.lists(children, max_size=5).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.lists(st.tuples(keys, children), max_size=5).map(obj),
    )


def _nest(depth: int, kind: str, leaf: str) -> str:
    if kind == "list":
        return "[" * depth + leaf + "]" * depth
    if kind == "dict":
        return '{"a":' * depth + leaf + "}" * depth
    return '[{"a":' * (depth // 2) + leaf + "}]" * (depth // 2)


# Around the encoder's limit (254 levels), and past it up to past the parser's (1024).
deep = st.builds(
    _nest,
    st.one_of(st.integers(248, 260), st.integers(261, 1030)),
    st.sampled_from(["list", "dict", "mixed"]),
    leaves,
)
json_texts = st.recursive(leaves, _containers, max_leaves=20)
values = st.one_of(json_texts, json_texts, json_texts, deep)

# -- event-shaped objects ----------------------------------------------------------------------

good_ids = st.one_of(st.sampled_from(["u1", "u2", "anon-1", "anon-2"]), st.text(min_size=1, max_size=20)).map(js)
bad_ids = st.one_of(
    raw_numbers,
    st.sampled_from(["null", "true", '""', "[]", "{}"]),
    st.text(min_size=1020, max_size=1030).map(js),  # around the id length limit
    values,
)
ids = st.one_of(good_ids, good_ids, bad_ids)
IPS = ["81.2.69.142", "8.8.8.8", "2a02:ff0::1", "::ffff:81.2.69.142", "10.0.0.1", "127.0.0.1", "fe80::1%eth0"]
ip_values = st.one_of(
    st.sampled_from(IPS).map(js),
    st.sampled_from(IPS).map(js),
    st.sampled_from([*IPS, ""]).map(lambda ip: js(ip + "\x00")),
    st.sampled_from(IPS).map(lambda ip: js(ip.translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")))),
    texts.map(js),
    st.text(min_size=60, max_size=2000).map(js),
    values,
)
USER_AGENTS = [
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.0.0 Safari/537.36",
    "Googlebot/2.1 (+http://www.google.com/bot.html)",
    "analytics-ios/4.1.8",
]
ua_values = st.one_of(
    st.sampled_from(USER_AGENTS).map(js),
    st.sampled_from(USER_AGENTS).map(js),
    texts.map(js),
    st.text(min_size=1000, max_size=3000).map(js),
    st.sampled_from(USER_AGENTS).map(lambda ua: js(ua + "\x00")),
    values,
)
devices = st.one_of(
    st.fixed_dictionaries({}, optional={"id": ids, "type": leaves, "model": leaves, "manufacturer": leaves}).map(obj),
    values,
)
contexts = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "ip": ip_values,
            "userAgent": ua_values,
            "device": devices,
            "location": values,
            "os": values,
            "browser": values,
            "library": values,
        },
    ).map(obj),
    st.fixed_dictionaries(
        {},
        optional={
            "ip": ip_values,
            "userAgent": ua_values,
            "device": devices,
            "location": values,
            "os": values,
            "browser": values,
            "library": values,
        },
    ).map(obj),
    values,
)
integrations = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={"All": leaves, "Amplitude": leaves, "amplitude": leaves, "Brevo": leaves, "reteno": values},
    ).map(obj),
    values,
)
names = st.one_of(texts.filter(bool).map(js), texts.filter(bool).map(js), values)
maps = st.one_of(st.lists(st.tuples(keys, json_texts), max_size=5).map(obj), values)
# Each present with about even odds; a damaged event gets one or two of any of them wrong.
OPTIONAL = {
    "messageId": ids,
    "timestamp": timestamp_values,
    "originalTimestamp": timestamp_values,
    "sentAt": timestamp_values,
    "receivedAt": timestamp_values,
    "properties": maps,
    "traits": maps,
    "context": contexts,
    "integrations": integrations,
    "name": names,
    "category": names,
    "channel": names,
    "writeKey": leaves,
    "version": leaves,
    "extraField": values,
}
ANY_FIELD = [*OPTIONAL, "type", "userId", "anonymousId", "event", "groupId", "previousId"]


def chance(percent: int) -> st.SearchStrategy[bool]:
    return st.integers(0, 99).map(lambda n: n < percent)


@st.composite
def events(draw: st.DrawFn) -> str:
    """One event as JSON text: valid for its type to begin with (so it reaches timestamps, identity,
    enrichment, routing and encoding), with optional fields of any shape, then sometimes damaged."""
    kind = draw(st.sampled_from(EVENT_TYPES))
    fields = {"type": js(kind)}
    if draw(chance(70)) or kind == "alias":
        fields["userId"] = draw(good_ids)
    if "userId" not in fields or draw(chance(50)):
        fields["anonymousId"] = draw(good_ids)
    if kind == "track":
        fields["event"] = draw(good_ids)
    if kind == "group":
        fields["groupId"] = draw(good_ids)
    if kind == "alias":
        fields["previousId"] = draw(good_ids)
    for name, strategy in OPTIONAL.items():
        if draw(chance(40)):
            fields[name] = draw(strategy)
    if draw(chance(25)):
        for name in draw(st.lists(st.sampled_from(ANY_FIELD), min_size=1, max_size=2, unique=True)):
            fields[name] = draw(st.one_of(values, bad_ids, timestamp_values))
    if draw(chance(10)):
        fields.pop(draw(st.sampled_from(sorted(fields))))
    return obj(fields)


@st.composite
def batches(draw: st.DrawFn) -> str:
    """A batch envelope mixing events, non-objects and deep items, with repeated items and the
    shared fields every event inherits."""
    items = draw(st.lists(st.one_of(events(), events(), values), max_size=6))
    if items and draw(st.booleans()):
        items += [draw(st.sampled_from(items))] * draw(st.integers(1, 3))  # identical items
    fields = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "context": contexts,
                "sentAt": timestamp_values,
                "receivedAt": timestamp_values,
                "integrations": integrations,
                "channel": leaves,
            },
        )
    )
    return obj({"batch": "[" + ",".join(items) + "]", **fields})


@st.composite
def mutated(draw: st.DrawFn, texts_: st.SearchStrategy[str]) -> bytes:
    """Valid-ish JSON with bytes cut, flipped or spliced in: every way a parser can trip."""
    data = bytearray(draw(texts_).encode())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["cut", "flip", "insert"]))
        if how == "cut":
            del data[at:]
        elif how == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


json_payloads = st.one_of(events(), events(), batches(), batches(), values).map(str.encode)
payloads = st.one_of(json_payloads, json_payloads, st.binary(max_size=300), mutated(st.one_of(events(), batches())))


# -- the properties ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def normaliser():
    return Normaliser(ALL, IdentityMap(10_000), [GeoEnricher(), UserAgentEnricher()])


def check(payload: bytes, result: Result) -> None:
    assert isinstance(result, Result)
    for rejected in result.rejected:
        assert isinstance(rejected.reason, str) and rejected.reason
        assert not UNEXPECTED.match(rejected.reason), f"an exception nobody expected: {rejected.reason}"
        rejected.reason.encode()  # it becomes a header value
        assert isinstance(rejected.value, bytes)
    for routed in result.routed:
        decoded, _extra = CODEC.decode(routed.value)
        assert decoded == routed.event
        for name in ("timestamp", "originalTimestamp", "receivedAt", *(["sentAt"] if "sentAt" in decoded else [])):
            assert CANONICAL.fullmatch(decoded[name]), (name, decoded[name])
        assert isinstance(decoded["messageId"], str) and decoded["messageId"]
        assert isinstance(decoded["anonymousId"], str) and decoded["anonymousId"]
        assert routed.key == (decoded.get("userId") or decoded["anonymousId"])
        assert routed.destinations and set(routed.destinations) <= set(ALL)
    for link in result.links:
        assert all(isinstance(part, str) and part for part in link)
    # Every event comes out exactly once: a whole payload is one rejection; otherwise each batch item
    # (or the one event) is routed, rejected or filtered.
    outcomes = len(result.routed) + len(result.rejected) + len(result.filtered)
    if any(r.index is None for r in result.rejected):
        assert outcomes == len(result.rejected) == 1
        return
    document = orjson.loads(payload)  # it parsed, or the whole payload would have been rejected
    if isinstance(document.get("batch"), list):
        assert outcomes == len(document["batch"])
        indexes = [r.index for r in result.rejected]
        assert len(set(indexes)) == len(indexes) and all(0 <= i < len(document["batch"]) for i in indexes)
    else:
        assert outcomes == 1


@FUZZ
@given(st.binary(max_size=2000))
def test_any_bytes(normaliser, payload):
    check(payload, normaliser.process(payload, KAFKA_TS, *AT))


@FUZZ
@given(payloads)
def test_any_json_ish_payload(normaliser, payload):
    check(payload, normaliser.process(payload, KAFKA_TS, *AT))


@FUZZ
@given(st.one_of(events(), batches()).map(str.encode), st.integers(-(2**63), 2**63 - 1))
def test_any_kafka_timestamp(normaliser, payload, kafka_timestamp_ms):
    """A producer sets the record's CreateTime to anything; it is receivedAt when the event has none."""
    check(payload, normaliser.process(payload, kafka_timestamp_ms, *AT))


good_events = st.fixed_dictionaries(
    {"type": st.just("track"), "userId": st.sampled_from(["u1", "u2"]), "event": st.sampled_from(["Billed", "Used"])},
    optional={
        "properties": st.dictionaries(st.text(max_size=4), st.integers(0, 3), max_size=2),
        "timestamp": st.just("2026-11-22T10:00:00.000Z"),
        "sentAt": st.just("2026-11-22T10:00:01.000Z"),
        "messageId": st.just(""),  # empty is absent
    },
)


@FUZZ
@given(
    st.lists(good_events, min_size=1, max_size=6),
    st.integers(0, 63),
    st.integers(0, 2**40),
)
def test_missing_message_ids_are_one_per_call_and_stable_per_record(normaliser, bodies, partition, offset):
    bodies = bodies + bodies  # every body twice, as two client calls
    batch = orjson.dumps({"batch": bodies})

    def ids(value: bytes, at_offset: int, at_partition: int = partition, topic: str = "t.segment.raw") -> list[str]:
        result = normaliser.process(value, KAFKA_TS, topic, at_partition, at_offset)
        assert not result.rejected, result.rejected
        return [r.event["messageId"] for r in result.routed]

    first = ids(batch, offset)
    assert len(first) == len(set(first)) == len(bodies)  # identical batch items: distinct ids
    assert ids(batch, offset) == first  # the same record again: the same ids
    assert set(ids(batch, offset + 1)).isdisjoint(first)  # the same body at another offset: another call
    singles = [ids(orjson.dumps(body), offset + 2 + i)[0] for i, body in enumerate(bodies)]
    assert len(set(singles)) == len(bodies) and set(singles).isdisjoint(first)
    single = orjson.dumps(bodies[0])
    elsewhere = {*ids(single, offset + 2, partition + 1), *ids(single, offset + 2, partition, "t.other")}
    assert len(elsewhere) == 2 and singles[0] not in elsewhere  # another partition or topic: another record
