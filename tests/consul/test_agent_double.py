"""The Consul agent double follows Consul's documented semantics, as py-consul's own aio client sees them:
checks start critical and follow a real gRPC health service, ?passing filters, blocking queries wake on
change and time out on `wait`, critical services are reaped, sessions bound to checks are invalidated and
release their locks, lock-delay holds the key, and KV acquire/release/cas behave."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import consul
import consul.aio
import grpc
import pytest
import pytest_asyncio
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.consul.agent import Agent, app
from tests.integration.harness import free_port


@pytest_asyncio.fixture
async def agent() -> AsyncIterator[tuple[Agent, consul.aio.Consul]]:
    double = Agent(min_deregister=1.0, reap_every=0.2)
    runner = web.AppRunner(app(double))
    await runner.setup()
    port = double.port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    client = consul.aio.Consul(host="127.0.0.1", port=port)
    yield double, client
    await client.close()
    await runner.cleanup()


@pytest_asyncio.fixture
async def grpc_health() -> AsyncIterator[tuple[int, health.aio.HealthServicer]]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    yield port, servicer
    await server.stop(0)


async def passing_ids(client: consul.aio.Consul, name: str) -> list[str]:
    _, entries = await client.health.service(name, passing=True)
    return [e["Service"]["ID"] for e in entries]


async def eventually(probe, want, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        got = await probe()
        if got == want or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_grpc_checks_follow_the_health_service_and_critical_services_are_reaped(agent, grpc_health) -> None:
    _double, client = agent
    port, servicer = grpc_health
    check = consul.Check.grpc(f"127.0.0.1:{port}", "0.1s", timeout="1s", deregister="1s")
    await client.agent.service.register("relay", service_id="relay-1", address="127.0.0.1", port=port,
                                        meta={"role": "origin"}, check=check)
    _, entries = await client.health.service("relay")
    assert entries[0]["Checks"][1]["Status"] in ("critical", "passing")  # critical until the first check
    assert await eventually(lambda: passing_ids(client, "relay"), ["relay-1"]) == ["relay-1"]
    _, entries = await client.health.service("relay", passing=True)
    assert entries[0]["Service"]["Meta"] == {"role": "origin"} and entries[0]["Service"]["Port"] == port

    await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert await eventually(lambda: passing_ids(client, "relay"), []) == []
    _, entries = await client.health.service("relay")
    assert entries and entries[0]["Checks"][1]["Status"] == "critical"  # listed, not passing
    # still critical after DeregisterCriticalServiceAfter: the reaper removes it
    async def listed() -> list[str]:
        return [e["Service"]["ID"] for e in (await client.health.service("relay"))[1]]
    assert await eventually(listed, [], timeout=4) == []


@pytest.mark.asyncio
async def test_blocking_queries_wake_on_change_and_time_out_on_wait(agent) -> None:
    _double, client = agent
    index, _ = await client.health.service("ingest")
    started = time.monotonic()
    new_index, _ = await client.health.service("ingest", index=index, wait="300ms")
    assert 0.25 < time.monotonic() - started < 2 and new_index == index  # nothing changed: wait, same index

    async def register_soon() -> None:
        await asyncio.sleep(0.2)
        await client.agent.service.register("ingest", service_id="ingest-1", check=consul.Check.ttl("10s"))

    task = asyncio.get_running_loop().create_task(register_soon())
    started = time.monotonic()
    new_index, entries = await client.health.service("ingest", index=index, wait="5s")
    await task
    assert time.monotonic() - started < 2 and new_index > index and entries[0]["Service"]["ID"] == "ingest-1"
    assert entries[0]["Checks"][1]["Status"] == "critical"  # a TTL check is critical until it is passed
    await client.agent.check.ttl_pass("service:ingest-1")
    assert await passing_ids(client, "ingest") == ["ingest-1"]


@pytest.mark.asyncio
async def test_sessions_bound_to_a_check_release_their_locks_with_lock_delay(agent) -> None:
    _double, client = agent
    await client.agent.service.register("dispatch", service_id="d1", check=consul.Check.ttl("10s"))
    await client.agent.check.ttl_pass("service:d1")
    holder = await client.session.create(name="ingest-1", checks=["serfHealth", "service:d1"], lock_delay=1)
    other = await client.session.create(name="ingest-2", lock_delay=0)
    assert await client.kv.put("streams/live/a", "ingest-1", acquire=holder) is True
    assert await client.kv.put("streams/live/a", "ingest-2", acquire=other) is False  # held
    _, entry = await client.kv.get("streams/live/a")
    assert entry["Session"] == holder and entry["Value"] == b"ingest-1" and entry["LockIndex"] == 1

    await client.agent.check.ttl_fail("service:d1")  # the holder's check goes critical
    _, entry = await client.kv.get("streams/live/a")
    assert "Session" not in entry  # released (Behavior release), the value stays
    assert await client.kv.put("streams/live/a", "ingest-2", acquire=other) is False  # lock-delay of 1 s
    await asyncio.sleep(1.1)
    assert await client.kv.put("streams/live/a", "ingest-2", acquire=other) is True
    _, entry = await client.kv.get("streams/live/a")
    assert entry["Session"] == other and entry["LockIndex"] == 2
    with pytest.raises(consul.ConsulException):
        await client.session.create(checks=["service:d1"])  # a critical check cannot back a new session


@pytest.mark.asyncio
async def test_destroyed_delete_sessions_delete_their_keys_and_cas_guards_writes(agent) -> None:
    double, client = agent
    session = await client.session.create(behavior="delete", lock_delay=0, ttl=10)
    assert await client.kv.put("streams/live/b", "x", acquire=session) is True
    assert await client.kv.put("streams/live/b", "y", release="not-the-holder") is False
    assert (await client.session.renew(session))["ID"] == session
    await client.session.destroy(session)
    _index, entry = await client.kv.get("streams/live/b")
    assert entry is None
    assert await client.kv.put("k", "1", cas=0) is True
    assert await client.kv.put("k", "2", cas=0) is False  # cas=0: only if it does not exist
    _, entry = await client.kv.get("k")
    assert await client.kv.put("k", "3", cas=entry["ModifyIndex"]) is True
    assert await client.kv.put("k", "4", cas=entry["ModifyIndex"]) is False
    with pytest.raises(consul.NotFound):
        await client.session.renew(session)  # gone
    async with aiohttp.ClientSession() as http:  # py-consul checks the TTL itself; ask the double directly
        async with http.put(f"http://127.0.0.1:{double.port}/v1/session/create", json={"TTL": "5s"}) as answer:
            assert answer.status == 400  # Consul refuses TTLs under 10 s
