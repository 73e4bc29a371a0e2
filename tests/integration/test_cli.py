"""The command line as a user meets it: help, one-line errors, and the services as separate processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.harness import ROOT, Castmesh, decode, free_port, publish, wait_live


def castmesh(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "CASTMESH_SRT_PORT": "0", **(env or {})}, check=False)


def test_help_explains_every_option() -> None:
    top = castmesh("--help")
    assert top.returncode == 0 and all(word in top.stdout for word in ("up", "serve", "bench"))
    up = castmesh("up", "--help")
    assert up.returncode == 0
    for option in ("--rtmp-port", "--http-port", "--no-demo", "--host", "--max-lag-ms"):
        assert option in up.stdout
    for env in ("CASTMESH_RTMP_PORT", "CASTMESH_HTTP_PORT", "CASTMESH_NO_DEMO"):
        assert env in up.stdout
    assert "--relay" in castmesh("serve", "ingest", "--help").stdout


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_port_in_use_is_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = castmesh("up", "--no-demo", "--host", "127.0.0.1", "--rtmp-port", str(port),
                          "--http-port", str(free_port()))
    assert result.returncode == 1
    line = one_line_error(result)
    assert f"127.0.0.1:{port}" in line and "RTMP" in line and "in use" in line


def test_bad_flag_and_bad_environment_value() -> None:
    flag = castmesh("up", "--rtmp-port", "nope")
    assert flag.returncode == 2 and "--rtmp-port" in flag.stderr and "Traceback" not in flag.stderr
    env = castmesh("up", "--no-demo", env={"CASTMESH_HTTP_PORT": "99999"})
    assert env.returncode == 1
    assert "CASTMESH_HTTP_PORT" in one_line_error(env)


def test_unreachable_relay_is_a_one_line_error() -> None:
    port = free_port()
    started = time.monotonic()
    result = castmesh("serve", "playback", "--relay", f"127.0.0.1:{port}", "--http-port", str(free_port()))
    assert result.returncode == 1
    assert f"cannot reach the relay at 127.0.0.1:{port}" in one_line_error(result)
    assert time.monotonic() - started < 15


def test_services_as_separate_processes(tmp_path: Path) -> None:
    grpc_port, rtmp_port, http_port = free_port(), free_port(), free_port()
    relay = Castmesh(["serve", "relay", "--host", "127.0.0.1", "--grpc-port", str(grpc_port)],
                     tmp_path / "relay.log", "listening")
    procs = [relay]
    try:
        os.environ["CASTMESH_RELAY"] = f"127.0.0.1:{grpc_port}"  # the relay address from the environment
        try:
            procs.append(Castmesh(["serve", "ingest", "--host", "127.0.0.1", "--rtmp-port", str(rtmp_port)],
                                  tmp_path / "ingest.log", "listening"))
            procs.append(Castmesh(["serve", "playback", "--host", "127.0.0.1", "--http-port", str(http_port),
                                   "--rtmp-port", str(free_port())],
                                  tmp_path / "playback.log", "listening"))
        finally:
            del os.environ["CASTMESH_RELAY"]
        url = f"http://127.0.0.1:{http_port}/live/apart.flv"
        publisher = publish(f"rtmp://127.0.0.1:{rtmp_port}/live/apart", 5, fps=25, gop=125)
        wait_live(url)
        counts, errors = decode(url)
        assert publisher.wait(20) == 0
        assert errors == "" and abs(counts.get(0, 0) - 125) <= 7 and counts.get(1, 0) > 150
        assert "publish.start" in relay.log()
    finally:
        for proc in procs:
            proc.stop()


def test_the_benchmarks_run_from_a_checkout_and_are_not_in_the_installed_package(tmp_path: Path) -> None:
    import tomllib

    from setuptools import find_packages

    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packaged = find_packages(str(ROOT), include=found["include"])
    assert "castmesh.rtmp" in packaged and "services.playback" in packaged
    assert not [p for p in packaged if p.startswith(("castmesh_bench", "tests"))], packaged
    # The console script, from anywhere, finds the checkout's benchmarks (make up / make test install it).
    script = Path(sys.executable).parent / "castmesh"
    ran = subprocess.run([str(script), "bench", "failover", "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=30, check=False)
    assert ran.returncode == 0 and "--kinds" in ran.stdout, ran.stderr


def test_node_ids_are_unique_across_hosts_that_listen_on_the_same_port() -> None:
    """Pods of one Deployment all listen on 50051: ids by port alone collided in dispatch's node table and
    in Consul (one origin listed for two). The advertised host tells them apart; on loopback the port does."""
    from services.cli import _node_id

    pod = {"host": "0.0.0.0", "advertise_host": "10.1.2.3"}
    other = {"host": "0.0.0.0", "advertise_host": "10.1.2.4"}
    assert _node_id("relay-origin", pod, 50051) == "relay-origin-10.1.2.3-50051"
    assert _node_id("relay-origin", pod, 50051) != _node_id("relay-origin", other, 50051)
    assert _node_id("ingest", {"advertise": "ingest-0.ingest:1935"}, 1935) == "ingest-ingest-0.ingest-1935"
    assert _node_id("playback", {"host": "127.0.0.1"}, 8080) == "playback-8080"
