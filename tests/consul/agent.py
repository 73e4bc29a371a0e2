"""An HTTP double of the Consul agent API, for tests: no Consul binary can be installed here.

It serves the endpoints castmesh uses, with Consul's documented semantics:
- /v1/agent/service/register, /v1/agent/service/deregister/{id}: a service and its checks. A new check is
  critical until it passes. gRPC checks call grpc.health.v1.Health/Check on the target every interval
  (SERVING is passing, anything else or no answer within the timeout is critical); TTL checks are critical
  once their TTL passes without /v1/agent/check/pass|warn|fail|update/{id}.
- DeregisterCriticalServiceAfter: a service whose check has been critical that long is removed by the
  reaper. Consul's minimum is one minute and its reaper runs every 30 s; --min-deregister and --reap-every
  lower both so that tests finish (the only deliberate departure, and it is a flag).
- /v1/health/service/{name}: entries of node, service and checks; ?passing keeps those whose checks all
  pass. Blocking queries: ?index=N&wait=D returns when the index passes N or after D (default 5m, capped
  at 10m), with X-Consul-Index on every answer. The index never goes backwards and moves on any change,
  related or not (as Consul's may), so clients must compare content.
- /v1/session/create|renew|destroy|info: sessions with a TTL (10 s to 24 h, as Consul enforces), invalidated
  once the TTL has passed twice over without a renew (Consul's TTL is a lower bound; its implementation
  waits 2 x TTL), or when one of the checks they are bound to goes critical. Invalidation releases
  (Behavior "release") or deletes (Behavior "delete") the keys the session holds, and starts the lock-delay
  (default 15 s) during which no other session may acquire those keys.
- /v1/kv/{key}: GET (?recurse, blocking), PUT (?acquire, ?release, ?cas), DELETE (?recurse), values in
  base64, with CreateIndex, ModifyIndex, LockIndex, Session.

Run: python -m tests.consul.agent --port 8500 [--min-deregister 1 --reap-every 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

NODE = "castmesh-double"
PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
MAX_WAIT = 600.0


def duration(value: Any, default: float = 0.0) -> float:
    """A Go duration ("10s", "1m30s", "500ms") or a number of nanoseconds, in seconds."""
    if value in (None, ""):
        return default
    if isinstance(value, (int, float)):
        return value / 1e9
    total, units = 0.0, {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"([\d.]+)(ms|us|ns|h|m|s)", value)
    if not parts:
        raise ValueError(f"bad duration {value!r}")
    for number, unit in parts:
        total += float(number) * units[unit]
    return total


def folded(data: dict[str, Any]) -> dict[str, Any]:
    """Consul decodes JSON keys case-insensitively and accepts snake_case: fold them."""
    return {k.replace("_", "").lower(): v for k, v in data.items()}


@dataclass
class Check:
    id: str
    name: str
    service_id: str
    definition: dict[str, Any]
    status: str = CRITICAL
    output: str = ""
    critical_since: float = field(default_factory=time.monotonic)
    ttl_deadline: float = 0.0
    task: asyncio.Task[None] | None = None

    @property
    def deregister_after(self) -> float:
        return duration(self.definition.get("deregistercriticalserviceafter"))

    def view(self) -> dict[str, Any]:
        return {"Node": NODE, "CheckID": self.id, "Name": self.name, "Status": self.status, "Output": self.output,
                "ServiceID": self.service_id, "ServiceName": self.service_id}


@dataclass
class Session:
    id: str
    name: str
    ttl: float
    behavior: str
    lock_delay: float
    checks: list[str]
    deadline: float
    create_index: int

    def view(self) -> dict[str, Any]:
        return {"ID": self.id, "Name": self.name, "Node": NODE, "TTL": f"{self.ttl:g}s" if self.ttl else "",
                "Behavior": self.behavior, "LockDelay": int(self.lock_delay * 1e9), "ServiceChecks": None,
                "NodeChecks": ["serfHealth"], "CreateIndex": self.create_index, "ModifyIndex": self.create_index}


@dataclass
class Entry:
    value: bytes
    flags: int
    create_index: int
    modify_index: int
    lock_index: int = 0
    session: str = ""

    def view(self, key: str) -> dict[str, Any]:
        out = {"Key": key, "Value": base64.b64encode(self.value).decode() if self.value else None, "Flags": self.flags,
               "CreateIndex": self.create_index, "ModifyIndex": self.modify_index, "LockIndex": self.lock_index}
        if self.session:
            out["Session"] = self.session
        return out


class Agent:
    def __init__(self, min_deregister: float = 60.0, reap_every: float = 30.0) -> None:
        self.min_deregister = min_deregister
        self.reap_every = reap_every
        self.index = 1
        self.changed = asyncio.Condition()
        self.services: dict[str, dict[str, Any]] = {}
        self.checks: dict[str, Check] = {}
        self.sessions: dict[str, Session] = {}
        self.kv: dict[str, Entry] = {}
        self.lock_delays: dict[str, float] = {}  # key -> until when no session may acquire it
        self.port = 0  # where it listens, for whoever started it

    async def bump(self) -> None:
        self.index += 1
        async with self.changed:
            self.changed.notify_all()

    async def wait_past(self, request: web.Request) -> None:
        """A blocking query: return once the index is past ?index, or after ?wait."""
        if "index" not in request.query:
            return
        seen = int(request.query["index"])
        wait = min(duration(request.query.get("wait"), 300.0), MAX_WAIT)
        deadline = time.monotonic() + wait
        async with self.changed:
            while self.index <= seen and time.monotonic() < deadline:
                try:
                    await asyncio.wait_for(self.changed.wait(), deadline - time.monotonic())
                except TimeoutError:
                    break

    def answer(self, body: Any, status: int = 200) -> web.Response:
        return web.Response(status=status, text=json.dumps(body), content_type="application/json",
                            headers={"X-Consul-Index": str(self.index), "X-Consul-KnownLeader": "true"})

    # Services and checks --------------------------------------------------------------------------------

    async def register(self, request: web.Request) -> web.Response:
        body = folded(await request.json())
        if not body.get("name"):
            return web.Response(status=400, text="Missing service name")
        service_id = body.get("id") or body["name"]
        await self._drop_service(service_id, notify=False)
        self.services[service_id] = {"ID": service_id, "Service": body["name"], "Address": body.get("address", ""),
                                     "Port": body.get("port", 0), "Meta": body.get("meta") or {},
                                     "Tags": body.get("tags") or []}
        definitions = list(body.get("checks") or [])
        if body.get("check"):
            definitions.append(body["check"])
        for number, raw in enumerate(definitions, start=1):
            definition = folded(raw)
            if definition.get("deregistercriticalserviceafter"):
                wanted = duration(definition["deregistercriticalserviceafter"])
                definition["deregistercriticalserviceafter"] = f"{max(wanted, self.min_deregister)}s"
            check_id = definition.get("checkid") or definition.get("id") or (
                f"service:{service_id}" + (f":{number}" if len(definitions) > 1 else ""))
            check = Check(check_id, definition.get("name") or f"Service '{body['name']}' check", service_id,
                          definition, status=definition.get("status") or CRITICAL)
            self.checks[check_id] = check
            check.task = asyncio.get_running_loop().create_task(self._run_check(check))
        await self.bump()
        return web.Response(text="")

    async def deregister(self, request: web.Request) -> web.Response:
        service_id = request.match_info["id"]
        if service_id not in self.services:
            return web.Response(status=404, text=f'Unknown service ID "{service_id}"')
        await self._drop_service(service_id)
        return web.Response(text="")

    async def _drop_service(self, service_id: str, notify: bool = True) -> None:
        if self.services.pop(service_id, None) is None:
            return
        for check in [c for c in self.checks.values() if c.service_id == service_id]:
            del self.checks[check.id]
            if check.task is not None:
                check.task.cancel()
            await self._check_gone(check.id)
        if notify:
            await self.bump()

    async def _run_check(self, check: Check) -> None:
        definition = check.definition
        interval = max(duration(definition.get("interval"), 10.0), 0.05)
        timeout = duration(definition.get("timeout"), 10.0)
        if definition.get("ttl"):
            check.ttl_deadline = time.monotonic() + duration(definition["ttl"])
            while True:
                await asyncio.sleep(max(0.0, check.ttl_deadline - time.monotonic()) + 0.01)
                if time.monotonic() >= check.ttl_deadline and check.status != CRITICAL:
                    await self._set_status(check, CRITICAL, "TTL expired")
                elif time.monotonic() >= check.ttl_deadline:
                    await asyncio.sleep(interval)
        target = definition.get("grpc")
        if not target:
            return  # a kind of check this double does not run stays as registered
        address, _, service = target.partition("/")
        while True:
            status, output = CRITICAL, ""
            try:
                async with grpc.aio.insecure_channel(address) as channel:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=timeout)
                status = PASSING if reply.status == health_pb2.HealthCheckResponse.SERVING else CRITICAL
                output = f"gRPC health: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
            except grpc.aio.AioRpcError as exc:
                output = f"gRPC health check failed: {exc.code().name}"
            await self._set_status(check, status, output)
            await asyncio.sleep(interval)

    async def _set_status(self, check: Check, status: str, output: str) -> None:
        if status == check.status and output == check.output:
            return
        if status == CRITICAL and check.status != CRITICAL:
            check.critical_since = time.monotonic()
        check.status, check.output = status, output
        if status == CRITICAL:
            for session in [s for s in self.sessions.values() if check.id in s.checks]:
                await self._invalidate(session)
        await self.bump()

    async def _check_gone(self, check_id: str) -> None:
        for session in [s for s in self.sessions.values() if check_id in s.checks]:
            await self._invalidate(session)

    async def ttl_update(self, request: web.Request) -> web.Response:
        check = self.checks.get(request.match_info["id"])
        if check is None or not check.definition.get("ttl"):
            return web.Response(status=404, text="Unknown check ID")
        kind = request.match_info["kind"]
        status = {"pass": PASSING, "warn": WARNING, "fail": CRITICAL}.get(kind)
        output = request.query.get("note", "")
        if kind == "update":
            body = folded(await request.json())
            status, output = body.get("status", PASSING), body.get("output", "")
        check.ttl_deadline = time.monotonic() + duration(check.definition["ttl"])
        await self._set_status(check, status or PASSING, output)
        return web.Response(text="")

    async def reaper(self) -> None:
        while True:
            await asyncio.sleep(self.reap_every)
            now = time.monotonic()
            for check in list(self.checks.values()):
                after = check.deregister_after
                if after and check.status == CRITICAL and now - check.critical_since >= after:
                    await self._drop_service(check.service_id)

    async def health(self, request: web.Request) -> web.Response:
        await self.wait_past(request)
        name, passing = request.match_info["name"], "passing" in request.query
        out = []
        for service in self.services.values():
            if service["Service"] != name:
                continue
            checks = [c.view() for c in self.checks.values() if c.service_id == service["ID"]]
            if passing and any(c["Status"] != PASSING for c in checks):
                continue
            serf = {"Node": NODE, "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": PASSING,
                    "ServiceID": "", "ServiceName": ""}
            out.append({"Node": {"Node": NODE, "Address": "127.0.0.1"}, "Service": service, "Checks": [serf, *checks]})
        return self.answer(out)

    async def agent_services(self, request: web.Request) -> web.Response:
        return self.answer(self.services)

    # Sessions -------------------------------------------------------------------------------------------

    async def session_create(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = folded(json.loads(raw)) if raw.strip() else {}
        ttl = duration(body.get("ttl"))
        if ttl and not 10 <= ttl <= 86400:
            return web.Response(status=400, text=f"Invalid Session TTL '{ttl}', must be between [10s=24h0m0s]")
        checks = list(body.get("checks") or []) + [c.get("ID", c.get("id")) if isinstance(c, dict) else c
                                                   for c in body.get("servicechecks") or []]
        for check_id in checks:
            if check_id == "serfHealth":
                continue  # the node's own check, always passing here
            if check_id not in self.checks:
                return web.Response(status=500, text=f'Missing check "{check_id}" registration')
            if self.checks[check_id].status == CRITICAL:
                return web.Response(status=500, text=f'Check "{check_id}" is in critical state')
        session = Session(str(uuid.uuid4()), body.get("name", ""), ttl, body.get("behavior") or "release",
                          duration(body.get("lockdelay"), 15.0), checks, time.monotonic() + 2 * ttl, self.index + 1)
        self.sessions[session.id] = session
        await self.bump()
        return self.answer({"ID": session.id})

    async def session_renew(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return web.Response(status=404, text=f"Session id '{request.match_info['id']}' not found")
        session.deadline = time.monotonic() + 2 * session.ttl
        return self.answer([session.view()])

    async def session_destroy(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["id"])
        if session is not None:
            await self._invalidate(session, destroyed=True)
        return self.answer(True)

    async def session_info(self, request: web.Request) -> web.Response:
        await self.wait_past(request)
        session = self.sessions.get(request.match_info["id"])
        return self.answer([session.view()] if session else None)

    async def session_expiry(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            for session in [s for s in self.sessions.values() if s.ttl and now >= s.deadline]:
                await self._invalidate(session)

    async def _invalidate(self, session: Session, destroyed: bool = False) -> None:
        if self.sessions.pop(session.id, None) is None:
            return
        for key, entry in list(self.kv.items()):
            if entry.session != session.id:
                continue
            if session.lock_delay:
                self.lock_delays[key] = time.monotonic() + session.lock_delay
            if session.behavior == "delete":
                del self.kv[key]
            else:
                entry.session = ""
                entry.modify_index = self.index + 1
        await self.bump()

    # KV -------------------------------------------------------------------------------------------------

    async def kv_get(self, request: web.Request) -> web.Response:
        await self.wait_past(request)
        key = request.match_info["key"]
        if "recurse" in request.query:
            found = [e.view(k) for k, e in sorted(self.kv.items()) if k.startswith(key)]
        else:
            found = [self.kv[key].view(key)] if key in self.kv else []
        if not found:
            return web.Response(status=404, headers={"X-Consul-Index": str(self.index)})
        return self.answer(found)

    async def kv_put(self, request: web.Request) -> web.Response:
        key, query = request.match_info["key"], request.query
        value = await request.read()
        entry = self.kv.get(key)
        flags = int(query.get("flags", entry.flags if entry else 0))
        if "cas" in query:
            cas = int(query["cas"])
            if (cas == 0 and entry is not None) or (cas != 0 and (entry is None or entry.modify_index != cas)):
                return self.answer(False)
        index = self.index + 1
        if "acquire" in query:
            holder = query["acquire"]
            if holder not in self.sessions:
                return web.Response(status=500, text=f"invalid session \"{holder}\"")
            if self.lock_delays.get(key, 0) > time.monotonic():
                return self.answer(False)
            if entry is not None and entry.session and entry.session != holder:
                return self.answer(False)
            if entry is None:
                entry = self.kv[key] = Entry(value, flags, index, index)
            elif entry.session != holder:
                entry.lock_index += 1
            if entry.lock_index == 0:
                entry.lock_index = 1
            entry.session, entry.value, entry.flags, entry.modify_index = holder, value, flags, index
            await self.bump()
            return self.answer(True)
        if "release" in query:
            if entry is None or entry.session != query["release"]:
                return self.answer(False)
            entry.session, entry.value, entry.flags, entry.modify_index = "", value, flags, index
            await self.bump()
            return self.answer(True)
        if entry is None:
            self.kv[key] = Entry(value, flags, index, index)
        else:
            entry.value, entry.flags, entry.modify_index = value, flags, index
        await self.bump()
        return self.answer(True)

    async def kv_delete(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        doomed = [k for k in self.kv if (k.startswith(key) if "recurse" in request.query else k == key)]
        cas = request.query.get("cas")
        if cas is not None and (len(doomed) != 1 or self.kv[doomed[0]].modify_index != int(cas)):
            return self.answer(False)
        for k in doomed:
            del self.kv[k]
        await self.bump()
        return self.answer(True)

    async def leader(self, request: web.Request) -> web.Response:
        return self.answer("127.0.0.1:8300")


def app(agent: Agent) -> web.Application:
    application = web.Application()
    r = application.router
    r.add_put("/v1/agent/service/register", agent.register)
    r.add_put("/v1/agent/service/deregister/{id}", agent.deregister)
    r.add_get("/v1/agent/services", agent.agent_services)
    r.add_put("/v1/agent/check/{kind:pass|warn|fail|update}/{id:.+}", agent.ttl_update)
    r.add_get("/v1/health/service/{name}", agent.health)
    r.add_put("/v1/session/create", agent.session_create)
    r.add_put("/v1/session/renew/{id}", agent.session_renew)
    r.add_put("/v1/session/destroy/{id}", agent.session_destroy)
    r.add_get("/v1/session/info/{id}", agent.session_info)
    r.add_get("/v1/kv/{key:.*}", agent.kv_get)
    r.add_put("/v1/kv/{key:.*}", agent.kv_put)
    r.add_delete("/v1/kv/{key:.*}", agent.kv_delete)
    r.add_get("/v1/status/leader", agent.leader)

    async def background(application: web.Application) -> Any:
        tasks = [asyncio.get_running_loop().create_task(agent.reaper()),
                 asyncio.get_running_loop().create_task(agent.session_expiry())]
        yield
        for task in tasks + [c.task for c in agent.checks.values() if c.task]:
            task.cancel()

    application.cleanup_ctx.append(background)
    return application


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--min-deregister", type=float, default=60.0, help="seconds (Consul: 60)")
    parser.add_argument("--reap-every", type=float, default=30.0, help="seconds (Consul: 30)")
    args = parser.parse_args()
    print(f"consul agent double listening on 127.0.0.1:{args.port}", flush=True)
    web.run_app(app(Agent(args.min_deregister, args.reap_every)), host="127.0.0.1", port=args.port, print=None,
                shutdown_timeout=0.5)  # blocking queries in flight are cut off, not waited for


if __name__ == "__main__":
    main()
