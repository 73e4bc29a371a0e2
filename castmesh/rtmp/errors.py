"""Typed errors of the RTMP protocol. The adapter that owns the socket closes the connection on any of
them and logs the message, which always says what was wrong."""

from __future__ import annotations


class RtmpError(Exception):
    """The peer broke the protocol; the connection cannot continue."""


class HandshakeError(RtmpError):
    pass


class ChunkError(RtmpError):
    """Malformed chunk stream: bad header, message over its declared length, unknown chunk stream."""


class LimitExceeded(RtmpError):
    """Well-formed input over one of the configured limits (chunk size, message length, ...)."""


class CommandError(RtmpError):
    """A command message that cannot be decoded or makes no sense in this state."""
