"""Avro encoding of the dest-topic records with fastavro, in Avro single-object encoding.

Single-object encoding (https://avro.apache.org/docs/1.11.1/specification/#single-object-encoding)
prefixes each body with 0xC3 0x01 and the schema's 8-byte CRC-64-AVRO fingerprint, so a reader
knows exactly which schema wrote a record without a schema registry.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import orjson
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from worker.segment.event import SegmentEvent

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
MAGIC = b"\xc3\x01"
JSON_FIELDS = ("properties", "traits", "context", "integrations", "extra")


class UnknownSchema(ValueError):
    pass


def load_schema(name: str = "segment_event") -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())


class SingleObjectCodec:
    """Single-object encoding around fastavro's schemaless reader and writer."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = parse_schema(schema)
        self.fingerprint = bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))
        # The spec stores the fingerprint little-endian; fastavro's hex is big-endian.
        self.header = MAGIC + self.fingerprint[::-1]

    def encode(self, record: dict[str, Any]) -> bytes:
        buffer = io.BytesIO()
        buffer.write(self.header)
        schemaless_writer(buffer, self.schema, record)
        return buffer.getvalue()

    def body(self, data: bytes) -> bytes:
        if data[:2] != MAGIC:
            raise UnknownSchema("not Avro single-object encoded (no C3 01 marker)")
        if data[2:10] != self.header[2:]:
            fp = struct.unpack("<Q", data[2:10])[0]
            raise UnknownSchema(f"written with schema fingerprint {fp:016x}, which this reader does not know")
        return data[10:]

    def decode(self, data: bytes) -> dict[str, Any]:
        return schemaless_reader(io.BytesIO(self.body(data)), self.schema, None)  # type: ignore[return-value]


# -- a specialised codec for flat records of strings, nullable strings and enums -----------------
#
# fastavro's generic writer costs ~17 us a record of this schema, more than all of the
# normaliser's other work together. These records are flat, so the codec below compiles the schema
# into one straight-line function and writes the same Avro binary encoding in a few microseconds.
# Fields named in `json_fields` are Avro strings holding JSON: the encoder takes the Python object
# and writes orjson's bytes directly (no str round trip), the decoder returns the parsed object.
# Tests check both directions byte for byte against fastavro.

_STRING, _NULLABLE_STRING, _ENUM, _JSON = 0, 1, 2, 3
_SMALL = 2048  # longs below this are encoded once, at import
_VARINT_CACHE = [b""] * _SMALL


def _varint(n: int) -> bytes:
    """Avro `long`: zig-zag, then base-128 varint."""
    if 0 <= n < _SMALL:
        return _VARINT_CACHE[n]
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z & ~0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _fill_varint_cache() -> None:
    for n in range(_SMALL):
        z, out = n << 1, bytearray()
        while z & ~0x7F:
            out.append((z & 0x7F) | 0x80)
            z >>= 7
        out.append(z)
        _VARINT_CACHE[n] = bytes(out)


_fill_varint_cache()


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = z = 0
    while True:
        byte = data[pos]
        pos += 1
        z |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (z >> 1) ^ -(z & 1), pos
        shift += 7


class FlatRecordCodec(SingleObjectCodec):
    """Single-object codec for a record whose fields are all string, ["null","string"] or enum.

    `omit_nulls`: the decoder leaves a null field out of the record instead of setting it to None.
    """

    def __init__(self, schema: dict[str, Any], json_fields: tuple[str, ...] = (), omit_nulls: bool = False) -> None:
        super().__init__(schema)
        self.omit_nulls = omit_nulls
        self.plan: list[tuple[str, int, dict[str, int] | None]] = []
        for f in schema["fields"]:
            t = f["type"]
            if t == "string":
                self.plan.append((f["name"], _JSON if f["name"] in json_fields else _STRING, None))
            elif t == ["null", "string"]:
                self.plan.append((f["name"], _NULLABLE_STRING, None))
            elif isinstance(t, dict) and t.get("type") == "enum":
                self.plan.append((f["name"], _ENUM, {s: i for i, s in enumerate(t["symbols"])}))
            else:
                raise ValueError(f"field {f['name']!r}: type {t!r} is not flat; use SingleObjectCodec")
        self.encode = self._compile_encoder()  # type: ignore[method-assign]
        self._decode = self._compile_decoder()

    def _compile_encoder(self) -> Any:
        """Generate one straight-line function for this schema: no per-field dispatch at run time.

        The generated code only indexes the record by the schema's own field names (validated
        identifiers from the .avsc we ship), so nothing from the data ever reaches `exec`.
        """

        def length(i: int, indent: str) -> str:
            # Most lengths are small: a list lookup inline, not a call (this runs ~15 times a record).
            return f"{indent}n = len(r{i}); l{i} = small[n] if n < {_SMALL} else varint(n)"

        lines = ["def encode(record):", "    get = record.get"]
        pieces = ["header"]
        for i, (name, kind, _index) in enumerate(self.plan):
            lines.append(f"    v{i} = get({name!r})")
            if kind == _ENUM:
                lines.append(f"    e{i} = varint(enum{i}[v{i}])")
                pieces.append(f"e{i}")
                continue
            if kind == _NULLABLE_STRING:
                lines += [
                    f"    if v{i} is None:",
                    f"        t{i} = b'\\x00'; l{i} = r{i} = b''",
                    "    else:",
                    f"        t{i} = b'\\x02'; r{i} = v{i}.encode()",
                    length(i, "        "),
                ]
                pieces += [f"t{i}", f"l{i}", f"r{i}"]
                continue
            if kind == _JSON:
                lines.append(f"    r{i} = dumps(v{i}) if v{i} else b'{{}}'")
            else:
                lines += [f"    if v{i} is None:", f"        raise ValueError('field {name} is required')"]
                lines.append(f"    r{i} = v{i}.encode()")
            lines.append(length(i, "    "))
            pieces += [f"l{i}", f"r{i}"]
        lines.append(f"    return b''.join(({', '.join(pieces)}))")
        namespace: dict[str, Any] = {
            "header": self.header,
            "varint": _varint,
            "small": _VARINT_CACHE,
            "dumps": orjson.dumps,
        }
        for i, (_name, kind, index) in enumerate(self.plan):
            if kind == _ENUM:
                namespace[f"enum{i}"] = index
        exec("\n".join(lines), namespace)
        return namespace["encode"]

    def _compile_decoder(self) -> Any:
        """The decoder's twin of `_compile_encoder`: straight-line reads, a one-byte fast path for the
        varints (lengths under 64 and union/enum indexes), the rest through `read_varint`."""

        def read(target: str, indent: str) -> list[str]:
            return [
                f"{indent}b = body[pos]",
                f"{indent}if b < 0x80:",
                f"{indent}    {target} = (b >> 1) ^ -(b & 1); pos += 1",
                f"{indent}else:",
                f"{indent}    {target}, pos = read_varint(body, pos)",
            ]

        lines = ["def decode(body):", "    pos = 0", "    record = {}"]
        for i, (name, kind, _index) in enumerate(self.plan):
            indent = "    "
            if kind == _ENUM:
                lines += read("n", indent)
                lines.append(f"    record[{name!r}] = symbols{i}[n]")
                continue
            if kind == _NULLABLE_STRING:
                lines += read("n", indent)
                absent = "pass" if self.omit_nulls else f"record[{name!r}] = None"
                lines += ["    if n == 0:", f"        {absent}", "    else:"]
                indent = "        "
            lines += read("n", indent)
            value = "loads(body[pos:pos + n])" if kind == _JSON else "body[pos:pos + n].decode()"
            lines += [f"{indent}record[{name!r}] = {value}", f"{indent}pos += n"]
        lines.append("    return record")
        namespace: dict[str, Any] = {"read_varint": _read_varint, "loads": orjson.loads}
        for i, (_name, kind, index) in enumerate(self.plan):
            if kind == _ENUM:
                namespace[f"symbols{i}"] = list(index)  # type: ignore[arg-type]
        exec("\n".join(lines), namespace)
        return namespace["decode"]

    def decode(self, data: bytes) -> dict[str, Any]:
        return self._decode(self.body(data))


class EventCodec:
    """SegmentEvent <-> Avro record: the free-form maps travel as JSON strings; `extra` holds the
    top-level fields outside the spec."""

    def __init__(self) -> None:
        # Null fields are left out when decoding: a SegmentEvent has no None values.
        self.codec = FlatRecordCodec(load_schema(), json_fields=JSON_FIELDS, omit_nulls=True)

    def encode(self, event: SegmentEvent, extra: dict[str, Any] | None = None) -> bytes:
        if extra:
            return self.codec.encode({**event, "extra": extra})
        return self.codec.encode(event)  # type: ignore[arg-type]

    def decode(self, data: bytes) -> tuple[SegmentEvent, dict[str, Any]]:
        record = self.codec.decode(data)
        extra = record.pop("extra")
        return record, extra  # type: ignore[return-value]
