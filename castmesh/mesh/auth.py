"""Signed URLs for publish and play: ?expires=UNIX&sign=HMAC-SHA256(secret, "/{app}/{stream}" + expires),
hex, with a secret per application (or one for all). Off when no secret is configured.

The same signature opens a stream for every protocol (RTMP publish and play, HTTP-FLV, WebSocket-FLV,
HLS), since it signs the stream's path, not a protocol's URL. Checked at ingest, playback and the gateway
with compare_digest; a refusal says why (missing, expired, wrong) without saying what would be right.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

from castmesh.mesh.config import ConfigError

ANY_APP = "*"


class Signer:
    def __init__(self, secrets: Mapping[str, str] | None = None) -> None:
        self.secrets = dict(secrets or {})

    @classmethod
    def parse(cls, text: str) -> Signer:
        """"SECRET" (every app) or "live=SECRET1,studio=SECRET2" (per app; "*=..." for the rest)."""
        text = text.strip()
        if not text:
            return cls()
        if "=" not in text:
            return cls({ANY_APP: text})
        secrets = {}
        for part in text.split(","):
            app, sep, secret = part.partition("=")
            if not sep or not app.strip() or not secret.strip():
                raise ConfigError(f"--secret: {part!r} is not app=secret")
            secrets[app.strip()] = secret.strip()
        return cls(secrets)

    @property
    def enabled(self) -> bool:
        return bool(self.secrets)

    def _secret(self, app: str) -> str | None:
        return self.secrets.get(app, self.secrets.get(ANY_APP))

    def sign(self, app: str, stream: str, expires: int) -> str:
        secret = self._secret(app)
        if secret is None:
            raise ValueError(f"no secret for application {app!r}")
        return hmac.new(secret.encode(), f"/{app}/{stream}{expires}".encode(), hashlib.sha256).hexdigest()

    def query(self, app: str, stream: str, ttl: float = 3600.0) -> str:
        """expires=...&sign=... for a URL valid `ttl` seconds from now."""
        expires = int(time.time() + ttl)
        return f"expires={expires}&sign={self.sign(app, stream, expires)}"

    def refuse(self, app: str, stream: str, query: Mapping[str, str], now: float | None = None) -> str | None:
        """Why this request may not go ahead, or None if it may (always None when signing is off)."""
        if not self.enabled:
            return None
        secret = self._secret(app)
        if secret is None:
            return None  # signing is configured for other applications only
        expires, sign = query.get("expires", ""), query.get("sign", "")
        if not expires or not sign:
            return "this stream needs a signed URL (expires and sign)"
        if not expires.isdigit() or len(expires) > 12:
            return "expires is not a UNIX time"
        if int(expires) < (time.time() if now is None else now):
            return "the signed URL has expired"
        if not hmac.compare_digest(sign.lower(), self.sign(app, stream, int(expires))):
            return "the signature does not match"
        return None


def bearer_query(query: Mapping[str, str], headers: Mapping[str, str]) -> dict[str, str]:
    """The signed URL's query, or a Bearer token that carries it (WHIP and WHEP clients send tokens):
    "Authorization: Bearer EXPIRES.SIGN" stands for ?expires=EXPIRES&sign=SIGN. Header names in lower case."""
    token = headers.get("authorization", "")
    if token[:7].lower() == "bearer " and "sign" not in query:
        expires, _, sign = token[7:].strip().partition(".")
        return {**query, "expires": expires, "sign": sign}
    return dict(query)
