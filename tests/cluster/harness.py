"""Clusters of real castmesh processes on loopback, found through a dispatch process."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from castmesh.proto.v1.dispatch_pb2 import Job, ListJobsRequest, ListNodesRequest, ListStreamsRequest
from castmesh.proto.v1.dispatch_pb2_grpc import DispatchStub
from castmesh.proto.v1.relay_pb2 import StatsReply, StatsRequest
from castmesh.proto.v1.relay_pb2_grpc import RelayStub
from tests.integration.harness import Castmesh, free_port


@dataclass
class Cluster:
    tmp: Path
    nodes: dict[str, Castmesh] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # for every node: CASTMESH_REGISTRY=consul, say
    args: dict[str, list[str]] = field(default_factory=dict)
    gone: list[tuple[str, Castmesh]] = field(default_factory=list)  # nodes killed or restarted, for logs()

    def __post_init__(self) -> None:
        self.dispatch_port = free_port()
        self.start("dispatch", ["serve", "dispatch", "--host", "127.0.0.1", "--grpc-port", str(self.dispatch_port)])

    @property
    def dispatch(self) -> str:
        return f"127.0.0.1:{self.dispatch_port}"

    def start(self, name: str, args: list[str], port: int | None = None) -> Castmesh:
        runs = 1 + sum(1 for gone, _ in self.gone if gone == name)
        log = self.tmp / (f"{name}.log" if runs == 1 else f"{name}.{runs}.log")
        node = Castmesh([*args, "--log-level", "info"], log, "listening", self.env)
        self.nodes[name] = node
        self.args[name] = args
        if port is not None:
            self.ports[name] = port
        return node

    def relay(self, name: str, role: str = "origin", zone: str = "", extra: list[str] | None = None) -> str:
        port = free_port()
        self.start(name, ["serve", "relay", "--host", "127.0.0.1", "--grpc-port", str(port), "--role", role,
                          "--dispatch", self.dispatch, "--zone", zone, *(extra or [])], port)
        return f"127.0.0.1:{port}"

    def ingest(self, name: str = "ingest") -> int:
        port = free_port()
        self.start(name, ["serve", "ingest", "--host", "127.0.0.1", "--rtmp-port", str(port),
                          "--dispatch", self.dispatch], port)
        return port

    def playback(self, name: str = "playback", zone: str = "", extra: list[str] | None = None,
                 rtmp_port: int = 0) -> int:
        """A playback node; its HTTP port. RTMP play only if rtmp_port is given."""
        port = free_port()
        self.start(name, ["serve", "playback", "--host", "127.0.0.1", "--http-port", str(port),
                          "--rtmp-port", str(rtmp_port), "--dispatch", self.dispatch, "--zone", zone,
                          *(extra or [])], port)
        return port

    def dispatch_with(self, *extra: str) -> None:
        """Dispatch again, on the same port, with more options (before other nodes start: --abr rules)."""
        self.nodes["dispatch"].stop()
        self.start("dispatch", ["serve", "dispatch", "--host", "127.0.0.1", "--grpc-port", str(self.dispatch_port),
                                *extra])

    def worker(self, name: str = "worker", extra: list[str] | None = None) -> None:
        """A worker; no thumbnail port unless `extra` gives one (workers on one machine would share 8092)."""
        extra = extra or []
        http = [] if "--http-port" in extra else ["--http-port", "0"]
        self.start(name, ["serve", "worker", "--host", "127.0.0.1", "--dispatch", self.dispatch, *http, *extra])

    def jobs(self) -> list[Job]:
        with grpc.insecure_channel(self.dispatch) as chan:
            return list(DispatchStub(chan).ListJobs(ListJobsRequest(), timeout=5).jobs)

    def simple(self) -> tuple[int, int]:
        """The smallest cluster with a path for media: one origin, an ingest and a playback node, registered.
        Their (RTMP, HTTP) ports."""
        self.relay("origin-1")
        rtmp = self.ingest()
        http = self.playback()
        self.wait_registered()
        return rtmp, http

    def gateway(self, name: str = "gateway", extra: list[str] | None = None) -> int:
        port = free_port()
        self.start(name, ["serve", "gateway", "--host", "127.0.0.1", "--http-port", str(port),
                          "--dispatch", self.dispatch, *(extra or [])])
        return port

    def wait_registered(self, timeout: float = 10.0) -> None:
        """Until every node started so far is listed by dispatch (instead of sleeping and hoping)."""
        expected = len([n for n in self.nodes if not n.startswith(("dispatch", "gateway"))])
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.dispatch) as chan:
            while True:
                listed = len(DispatchStub(chan).ListNodes(ListNodesRequest(), timeout=5).nodes)
                if listed >= expected:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{listed} of {expected} nodes registered with dispatch")
                time.sleep(0.05)

    def kill9(self, name: str) -> None:
        node = self.nodes[name]
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)

    def restart(self, name: str) -> None:
        """Start a node that was killed again, with the same arguments (so the same ports and node id)."""
        old = self.nodes[name]
        assert old.proc.poll() is not None, f"{name} is still running"
        old.stop()
        self.gone.append((name, old))
        self.start(name, self.args[name])

    def restart_dispatch(self) -> None:
        self.kill9("dispatch")
        self.restart("dispatch")

    def stats(self, name: str) -> StatsReply:
        with grpc.insecure_channel(f"127.0.0.1:{self.ports[name]}") as chan:
            return RelayStub(chan).Stats(StatsRequest(), timeout=5)

    def origin_of(self, stream: str) -> str:
        with grpc.insecure_channel(self.dispatch) as chan:
            for info in DispatchStub(chan).ListStreams(ListStreamsRequest(), timeout=5).streams:
                if info.stream.name == stream:
                    return info.origin
        return ""

    def name_at(self, address: str) -> str:
        port = int(address.rsplit(":", 1)[1])
        return next(name for name, p in self.ports.items() if p == port)

    def logs(self) -> str:
        nodes = [*((f"{name} (before its restart)", node) for name, node in self.gone), *self.nodes.items()]
        return "\n".join(f"== {name}\n{node.log()}" for name, node in nodes)

    def stop(self) -> None:
        for node in reversed(list(self.nodes.values())):
            node.stop()
