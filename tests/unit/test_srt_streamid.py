"""SRT stream ids in the forms SRS and MediaMTX accept, and clear errors for the rest."""

from __future__ import annotations

import pytest

from castmesh.srt.streamid import StreamId, StreamIdError, parse


def test_the_forms_callers_use() -> None:
    assert parse("#!::r=live/cam,m=publish") == StreamId("publish", "live", "cam")
    assert parse("#!::m=request,r=/live/cam/,u=alice,expires=1,sign=ab") == StreamId(
        "request", "live", "cam", {"expires": "1", "sign": "ab"}, "alice")
    assert parse("publish:live/cam?expires=9&sign=cd") == StreamId("publish", "live", "cam",
                                                                    {"expires": "9", "sign": "cd"})
    assert parse("read:live/cam").mode == "request" and parse("live/cam") == StreamId("", "live", "cam")


@pytest.mark.parametrize("bad", ["", "#!::r=live", "#!::r=live/cam,m=sideways", "#!::garbage", "publish:cam",
                                 "live/../etc", "live/" + "x" * 300, "publish:live/c a m"])
def test_what_is_refused_says_why(bad: str) -> None:
    with pytest.raises(StreamIdError):
        parse(bad)
