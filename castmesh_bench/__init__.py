"""castmesh's benchmarks (`castmesh bench ...`): load on 127.0.0.1 only, bounded in count and time."""

from __future__ import annotations

import argparse
from typing import Any

from castmesh.mesh import runtime


def add_parsers(commands: argparse._SubParsersAction) -> None:
    from castmesh_bench import cluster, fanout, ingest, jobs, llhls, relay, webrtc, worker

    fanout.add_parser(commands)
    jobs.add_parser(commands)
    worker.add_parser(commands)
    ingest.add_parser(commands)
    webrtc.add_parser(commands)
    llhls.add_parser(commands)
    relay.add_parsers(commands)
    cluster.add_parsers(commands)


def run(args: argparse.Namespace) -> int:
    from castmesh_bench import cluster, fanout, ingest, jobs, llhls, relay, webrtc, worker

    if args.bench in ("record", "forward"):
        return jobs.run(args)
    if args.bench == "worker":
        return worker.run(args)
    if args.bench == "fanout":
        return fanout.run(args)
    if args.bench == "ingest":
        return ingest.run(args)
    if args.bench == "llhls":
        llhls.report(runtime.run(llhls.bench(args)), args.json)
        return 0
    if args.bench == "webrtc":
        webrtc.report(runtime.run(webrtc.bench(args)), args.json)
        return 0
    runners: dict[str, Any] = {"relay": relay.relay, "latency": cluster.latency, "failover": cluster.failover}
    result = runtime.run(runners[args.bench](args))
    cluster.report(result, args.json)
    return 0
