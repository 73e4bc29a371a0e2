import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from castmesh.media import amf0
from castmesh.media.amf0 import UNDEFINED, AmfDate, AmfError, EcmaArray, TypedObject, XmlDocument

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
scalars = st.one_of(
    st.none(), st.just(UNDEFINED), st.booleans(),
    st.floats(allow_nan=False), text,
    st.builds(AmfDate, st.floats(allow_nan=False, allow_infinity=False), st.integers(-32768, 32767)),
    st.builds(XmlDocument, text),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(text, inner, max_size=5),
        st.dictionaries(text, inner, max_size=5).map(EcmaArray),
        st.builds(TypedObject, text, st.dictionaries(text, inner, max_size=4)),
    ),
    max_leaves=20,
)


@given(st.lists(values, max_size=4))
def test_values_round_trip(items):
    decoded = amf0.decode(amf0.encode(*items))
    assert decoded == items
    assert [type(v) for v in decoded] == [type(v) for v in items]


@given(st.lists(values, max_size=4))
def test_bytes_round_trip(items):
    raw = amf0.encode(*items)
    assert amf0.encode(*amf0.decode(raw)) == raw


def test_known_bytes_of_a_connect_command():
    raw = amf0.encode("connect", 1.0, {"app": "live"})
    assert raw == (b"\x02\x00\x07connect" + b"\x00" + bytes.fromhex("3ff0000000000000")
                   + b"\x03\x00\x03app\x02\x00\x04live\x00\x00\x09")


def test_long_string_is_used_past_65535_bytes():
    raw = amf0.encode("x" * 70000)
    assert raw[0] == amf0.LONG_STRING
    assert amf0.decode(raw) == ["x" * 70000]


def test_invalid_utf8_survives_a_round_trip():
    raw = b"\x02\x00\x02\xff\xfe"
    assert amf0.encode(*amf0.decode(raw)) == raw


def test_ecma_array_count_is_only_a_hint():
    # ffmpeg and others write counts that do not match; the end marker decides.
    raw = b"\x08\x00\x00\x00\x63" + b"\x00\x01a\x00" + bytes.fromhex("4000000000000000") + b"\x00\x00\x09"
    assert amf0.decode(raw) == [{"a": 2.0}]


def test_nesting_bomb_is_refused():
    bomb = b"\x0a\x00\x00\x00\x01" * 100_000 + b"\x05"
    with pytest.raises(AmfError, match="nesting deeper"):
        amf0.decode(bomb)


def test_object_nesting_bomb_is_refused():
    bomb = b"\x03" + b"\x00\x01k\x03" * 1000
    with pytest.raises(AmfError, match="nesting deeper"):
        amf0.decode(bomb)


def test_string_over_the_limit_is_refused_before_reading_it():
    raw = b"\x0c\xff\xff\xff\xff"
    with pytest.raises(AmfError, match="over the limit"):
        amf0.decode(raw)


def test_strict_array_count_over_the_limit_is_refused_without_allocating():
    with pytest.raises(AmfError, match="strict array"):
        amf0.decode(b"\x0a\xff\xff\xff\xff")


@pytest.mark.parametrize("raw", [b"\x00\x01\x02", b"\x02\x00\x05ab", b"\x03\x00\x01a", b"\x0b\x00", b"\x07\x00\x01"])
def test_truncated_or_unsupported_input_is_an_amf_error(raw):
    with pytest.raises(AmfError):
        amf0.decode(raw)


def test_number_values():
    assert amf0.decode(amf0.encode(3, -0.5, math.inf)) == [3.0, -0.5, math.inf]
