"""AMF0, the encoding of RTMP commands and FLV metadata (Adobe's "Action Message Format AMF 0").

Values map to Python as: number -> float, boolean -> bool, string/long string -> str, object -> dict,
null -> None, undefined -> UNDEFINED, ECMA array -> EcmaArray (a dict), strict array -> list,
date -> AmfDate, XML document -> XmlDocument, typed object -> TypedObject.

Decoding is bounded: nesting depth, string length and entries per container all have limits, and
anything malformed or over a limit raises AmfError. Strings that are not valid UTF-8 decode with
surrogateescape, so that encode(decode(b)) gives the same bytes back.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

NUMBER, BOOLEAN, STRING, OBJECT, MOVIECLIP, NULL, UNDEFINED_MARKER, REFERENCE = range(8)
ECMA_ARRAY, OBJECT_END, STRICT_ARRAY, DATE, LONG_STRING, UNSUPPORTED, RECORDSET, XML_DOCUMENT = range(8, 16)
TYPED_OBJECT, AVMPLUS = 16, 17

_DOUBLE = struct.Struct(">d")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_DATE_TZ = struct.Struct(">h")


class AmfError(ValueError):
    """Malformed AMF0, or AMF0 over a decoding limit."""


class _Undefined:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNDEFINED"


UNDEFINED = _Undefined()


class EcmaArray(dict[str, Any]):
    """An associative array (marker 0x08); FLV onMetaData is usually one."""


@dataclass(frozen=True, slots=True)
class AmfDate:
    milliseconds: float
    timezone: int = 0


@dataclass(frozen=True, slots=True)
class XmlDocument:
    text: str


@dataclass(slots=True)
class TypedObject:
    class_name: str
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AmfLimits:
    max_depth: int = 32
    max_string: int = 1 << 20
    max_entries: int = 4096


DEFAULT_LIMITS = AmfLimits()


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class _Decoder:
    __slots__ = ("data", "limits", "pos")

    def __init__(self, data: bytes, limits: AmfLimits) -> None:
        self.data = data
        self.pos = 0
        self.limits = limits

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise AmfError(f"truncated AMF0: need {n} bytes at offset {self.pos}, have {len(self.data) - self.pos}")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def string(self, size_struct: struct.Struct) -> str:
        (n,) = size_struct.unpack(self.take(size_struct.size))
        if n > self.limits.max_string:
            raise AmfError(f"AMF0 string of {n} bytes is over the limit of {self.limits.max_string}")
        return _text(self.take(n))

    def properties(self, depth: int) -> dict[str, Any]:
        props: dict[str, Any] = {}
        while True:
            key = self.string(_U16)
            if key == "" and self.data[self.pos : self.pos + 1] == bytes([OBJECT_END]):
                self.pos += 1
                return props
            if len(props) >= self.limits.max_entries:
                raise AmfError(f"AMF0 object has more than {self.limits.max_entries} entries")
            props[key] = self.value(depth + 1)

    def value(self, depth: int = 0) -> Any:
        if depth > self.limits.max_depth:
            raise AmfError(f"AMF0 nesting deeper than {self.limits.max_depth}")
        marker = self.take(1)[0]
        if marker == NUMBER:
            return _DOUBLE.unpack(self.take(8))[0]
        if marker == BOOLEAN:
            return self.take(1)[0] != 0
        if marker == STRING:
            return self.string(_U16)
        if marker == OBJECT:
            return self.properties(depth)
        if marker == NULL:
            return None
        if marker == UNDEFINED_MARKER:
            return UNDEFINED
        if marker == ECMA_ARRAY:
            self.take(4)  # the count is only a hint (encoders get it wrong); the end marker decides
            return EcmaArray(self.properties(depth))
        if marker == STRICT_ARRAY:
            (count,) = _U32.unpack(self.take(4))
            if count > self.limits.max_entries:
                raise AmfError(f"AMF0 strict array of {count} entries is over the limit of {self.limits.max_entries}")
            return [self.value(depth + 1) for _ in range(count)]
        if marker == DATE:
            (ms,) = _DOUBLE.unpack(self.take(8))
            (tz,) = _DATE_TZ.unpack(self.take(2))
            return AmfDate(ms, tz)
        if marker == LONG_STRING:
            return self.string(_U32)
        if marker == XML_DOCUMENT:
            return XmlDocument(self.string(_U32))
        if marker == TYPED_OBJECT:
            name = self.string(_U16)
            return TypedObject(name, self.properties(depth))
        if marker == UNSUPPORTED:
            return UNDEFINED
        raise AmfError(f"unsupported AMF0 marker 0x{marker:02x} at offset {self.pos - 1}")


def decode(data: bytes, limits: AmfLimits = DEFAULT_LIMITS) -> list[Any]:
    """Decode every value in data (a command or data message body)."""
    decoder = _Decoder(bytes(data), limits)
    values: list[Any] = []
    while decoder.pos < len(decoder.data):
        if len(values) >= limits.max_entries:
            raise AmfError(f"more than {limits.max_entries} AMF0 values in one message")
        values.append(decoder.value())
    return values


def decode_one(data: bytes, limits: AmfLimits = DEFAULT_LIMITS) -> tuple[Any, int]:
    """Decode the first value; return it and the number of bytes it used."""
    decoder = _Decoder(bytes(data), limits)
    return decoder.value(), decoder.pos


def _encode_key(out: bytearray, key: str) -> None:
    raw = key.encode("utf-8", "surrogateescape")
    if len(raw) > 0xFFFF:
        raise AmfError("AMF0 property names are at most 65535 bytes")
    out += _U16.pack(len(raw))
    out += raw


def _encode_properties(out: bytearray, props: dict[str, Any]) -> None:
    for key, item in props.items():
        _encode_key(out, key)
        _encode_value(out, item)
    out += b"\x00\x00" + bytes([OBJECT_END])


def _encode_value(out: bytearray, value: Any) -> None:
    if value is None:
        out.append(NULL)
    elif value is UNDEFINED:
        out.append(UNDEFINED_MARKER)
    elif isinstance(value, bool):
        out.append(BOOLEAN)
        out.append(1 if value else 0)
    elif isinstance(value, int | float):
        out.append(NUMBER)
        out += _DOUBLE.pack(float(value))
    elif isinstance(value, str):
        raw = value.encode("utf-8", "surrogateescape")
        if len(raw) <= 0xFFFF:
            out.append(STRING)
            out += _U16.pack(len(raw))
        else:
            out.append(LONG_STRING)
            out += _U32.pack(len(raw))
        out += raw
    elif isinstance(value, EcmaArray):
        out.append(ECMA_ARRAY)
        out += _U32.pack(len(value))
        _encode_properties(out, value)
    elif isinstance(value, dict):
        out.append(OBJECT)
        _encode_properties(out, value)
    elif isinstance(value, list | tuple):
        out.append(STRICT_ARRAY)
        out += _U32.pack(len(value))
        for item in value:
            _encode_value(out, item)
    elif isinstance(value, AmfDate):
        out.append(DATE)
        out += _DOUBLE.pack(value.milliseconds)
        out += _DATE_TZ.pack(value.timezone)
    elif isinstance(value, XmlDocument):
        raw = value.text.encode("utf-8", "surrogateescape")
        out.append(XML_DOCUMENT)
        out += _U32.pack(len(raw))
        out += raw
    elif isinstance(value, TypedObject):
        out.append(TYPED_OBJECT)
        _encode_key(out, value.class_name)
        _encode_properties(out, value.properties)
    else:
        raise AmfError(f"cannot encode {type(value).__name__} as AMF0")


def encode(*values: Any) -> bytes:
    out = bytearray()
    for value in values:
        _encode_value(out, value)
    return bytes(out)
