"""The byte damage the fuzz tests share: a bit flipped, the rest cut off, or a few random bytes put in."""

from __future__ import annotations

from hypothesis import strategies as st

BASIC = ("flip", "truncate", "insert")


def damage(draw: st.DrawFn, data: bytearray, action: str, pos: int, max_insert: int = 8) -> bool:
    """Apply one of BASIC at `pos`; False if `action` is not one of them (the caller's own kind)."""
    if action == "flip":
        data[pos] ^= 1 << draw(st.integers(0, 7))
    elif action == "truncate":
        del data[pos:]
    elif action == "insert":
        data[pos:pos] = draw(st.binary(min_size=1, max_size=max_insert))
    else:
        return False
    return True
