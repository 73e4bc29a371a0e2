"""HTTP hooks on session events, as SRS (http_hooks) and nginx-rtmp (on_publish, on_play) call them:
castmesh POSTs a JSON body describing the event to the configured URL.

on_publish and on_play decide: a 2xx answer allows, anything else (another status, no answer within the
timeout, a refused connection) denies, and the client is told why. on_unpublish and on_stop only inform;
their answers are not waited for by the session. The body: {"action", "app", "stream", "client_ip",
"client_id", "node", "protocol", "query"}. on_record_segment informs of a recording file finished by a
worker: {"action", "app", "stream", "node", "path", "start" (ISO 8601), "duration", "bytes", "error"}.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp

from castmesh.mesh.logs import event

log = logging.getLogger("castmesh.hooks")

ACTIONS = ("on_publish", "on_unpublish", "on_play", "on_stop", "on_record_segment")


class Hooks:
    def __init__(self, urls: dict[str, str] | None = None, timeout: float = 3.0) -> None:
        self.urls = {action: url for action, url in (urls or {}).items() if url}
        unknown = set(self.urls) - set(ACTIONS)
        if unknown:
            raise ValueError(f"unknown hook {sorted(unknown)}")
        self.timeout = timeout
        self.http: aiohttp.ClientSession | None = None
        self.pending: set[asyncio.Task[None]] = set()

    def has(self, action: str) -> bool:
        return action in self.urls

    async def ask(self, action: str, body: dict[str, Any]) -> str | None:
        """Why the hook denies `action`, or None if it allows it (or no hook is set for it)."""
        url = self.urls.get(action)
        if url is None:
            return None
        if self.http is None:
            self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self.http.post(url, json={"action": action, **body}) as answer:
                if 200 <= answer.status < 300:
                    return None
                detail = (await answer.text())[:200].strip()
                reason = f"{action} hook answered {answer.status}" + (f": {detail}" if detail else "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = f"{action} hook did not answer: {type(exc).__name__}"
        stream = f"{body.get('app')}/{body.get('stream')}"
        event(log, "hook.denied", level=logging.WARNING, action=action, stream=stream, reason=reason)
        return reason

    def tell(self, action: str, body: dict[str, Any]) -> None:
        """Inform the hook, without waiting for it."""
        if action not in self.urls:
            return
        task = asyncio.get_running_loop().create_task(self._tell(action, body))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _tell(self, action: str, body: dict[str, Any]) -> None:
        await self.ask(action, body)

    async def close(self) -> None:
        for task in list(self.pending):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, self.timeout)
        if self.http is not None:
            await self.http.close()
