"""deploy/, checked statically (no Docker engine runs here): the compose file parses and is wired as a
scalable stack should be, every castmesh service's command and environment in it pass the real CLI's
configuration check, the health-check command works against a real node, and the Dockerfile installs
the way the Makefile does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.harness import ROOT, Castmesh, free_port

DEPLOY = ROOT / "deploy"
CASTMESH = ["dispatch", "relay-origin", "relay-edge", "ingest", "playback", "gateway", "worker"]
SCALED = ["playback", "relay-edge", "worker"]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert isinstance(document, dict)
    return document


def environment(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment as compose would pass it (${VAR:-default} with VAR unset)."""
    out = {}
    for key, value in (service.get("environment") or {}).items():
        out[key] = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m[1], m[2]), str(value))
    return out


def check_config(args: list[str], environment: dict[str, str]) -> dict[str, Any]:
    """`castmesh serve ARGS --check-config` with this environment (and none of ours): the resolved
    configuration, once the real CLI accepted it."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("CASTMESH_", "OTEL_"))}, **environment}
    result = subprocess.run([sys.executable, "-m", "services.cli", "serve", *args, "--check-config"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    resolved: dict[str, Any] = json.loads(result.stdout)
    return resolved


def test_the_stack_has_every_service_wired_with_health_and_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"consul", "jaeger", *CASTMESH} <= set(services)
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert {"16686:16686", "4317:4317", "4318:4318"} <= set(services["jaeger"]["ports"])
    for name in CASTMESH:
        service = services[name]
        env = environment(service)
        assert env["CASTMESH_REGISTRY"] == "consul" and env["CONSUL_HTTP_ADDR"] == "consul:8500"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://") and env["OTEL_SERVICE_NAME"]
        assert service["healthcheck"]["test"][:3] == ["CMD", "castmesh", "health"]
        port = service["healthcheck"]["test"][3].rsplit(":", 1)[1]
        assert port in service["command"], f"{name} checks a port it does not serve"
        assert service["depends_on"]["consul"]["condition"] == "service_healthy"
        if name != "dispatch":
            assert service["depends_on"]["dispatch"]["condition"] == "service_healthy"
    for name in SCALED:
        assert "ports" not in services[name], f"{name} is scaled: it must not bind a fixed host port"
    assert {s for s, v in services.items() if "skywalking" in v.get("profiles", [])} == {
        "banyandb", "oap", "skywalking-ui"}
    assert "otlp-traces" in services["oap"]["environment"]["SW_OTEL_RECEIVER_ENABLED_HANDLERS"]


@pytest.mark.parametrize("name", CASTMESH)
def test_each_service_starts_with_its_compose_command_and_environment(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    resolved = check_config(service["command"], environment(service))
    assert resolved["registry"] == "consul" and resolved["host"] == "0.0.0.0"
    assert resolved["advertise_host"] == "auto"
    if name != "dispatch":
        assert resolved["dispatch"] == "dispatch:50050"


def test_the_health_command_answers_for_a_real_node(tmp_path: Path) -> None:
    port = free_port()
    relay = Castmesh(["serve", "relay", "--host", "127.0.0.1", "--grpc-port", str(port)], tmp_path / "relay.log",
                     "listening")
    try:
        ok = subprocess.run([sys.executable, "-m", "services.cli", "health", f"127.0.0.1:{port}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30, check=False)
        assert ok.returncode == 0 and "SERVING" in ok.stdout
    finally:
        relay.stop()
    gone = subprocess.run([sys.executable, "-m", "services.cli", "health", f"127.0.0.1:{port}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30, check=False)
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr


def test_the_dockerfile_installs_as_the_makefile_does_and_runs_unprivileged() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "npm ci --no-audit --no-fund" in makefile and "npm ci --no-audit --no-fund" in dockerfile
    assert "COPY web/package.json web/package-lock.json" in dockerfile  # the same lockfile as make up
    assert re.search(r"pip install (--quiet )?-e '\.\[dev\]'", makefile)
    assert re.search(r"pip install \.( |$)", dockerfile, re.M)
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"the Dockerfile copies {path}, which is not in the repository"
    assert re.search(r"^USER castmesh$", dockerfile, re.M) and "--uid 10001" in dockerfile
    assert 'ENTRYPOINT ["castmesh", "serve"]' in dockerfile
    assert "CASTMESH_WEB_ROOT" in dockerfile


# Kubernetes ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kubernetes() -> dict[tuple[str, str], dict[str, Any]]:
    """deploy/k8s/castmesh.yaml's objects by (kind, name)."""
    documents = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "castmesh.yaml").read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in documents}


def k8s_environment(objects: dict[tuple[str, str], dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet would set it (a pod IP for status.podIP)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "secretRef" in source:  # (optional Secrets the deployment does not define: the user's own)
            assert source["secretRef"].get("optional") is True and ("Secret", source["secretRef"]["name"]) \
                not in objects
            continue
        env.update(objects[("ConfigMap", source["configMapRef"]["name"])]["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            env[item["name"]] = "10.1.2.3"
    return env


def test_kubernetes_deployments_are_ready_by_grpc_health_and_reachable_by_services(
        kubernetes: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployments = {name: d for (kind, name), d in kubernetes.items() if kind == "Deployment"}
    assert set(CASTMESH) <= set(deployments)
    for name in CASTMESH:
        spec = deployments[name]["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
        assert spec["template"]["spec"]["securityContext"]["runAsUser"] == 10001
        container = spec["template"]["spec"]["containers"][0]
        args = container["args"]
        grpc_port = int(args[args.index("--grpc-port") + 1])
        assert container["readinessProbe"]["grpc"]["port"] == grpc_port, name  # the health service's port
        assert container["livenessProbe"]["grpc"]["port"] == grpc_port, name
        assert grpc_port in [p["containerPort"] for p in container["ports"]]
        env = k8s_environment(kubernetes, container)
        assert env["OTEL_SERVICE_NAME"] == f"castmesh-{name}" and env["CASTMESH_ADVERTISE_HOST"] == "10.1.2.3"
    for (kind, name), service in kubernetes.items():
        if kind != "Service":
            continue
        target = next(d for d in deployments.values()
                      if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items())
        named = {p["name"] for c in target["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= named, name
    dispatch_service = kubernetes[("Service", "dispatch")]["spec"]["ports"][0]["port"]
    assert kubernetes[("ConfigMap", "castmesh")]["data"]["CASTMESH_DISPATCH"] == f"dispatch:{dispatch_service}"


@pytest.mark.parametrize("name", CASTMESH)
def test_each_kubernetes_container_starts_with_its_args_and_environment(
        kubernetes: dict[tuple[str, str], dict[str, Any]], name: str) -> None:
    container = kubernetes[("Deployment", name)]["spec"]["template"]["spec"]["containers"][0]
    resolved = check_config(container["args"], k8s_environment(kubernetes, container))
    assert resolved["registry"] == "dispatch" and resolved["advertise_host"] == "10.1.2.3"
    if name != "dispatch":
        assert resolved["dispatch"] == "dispatch:50050"


def test_whip_publishers_reach_ingest_in_compose_and_kubernetes(
        compose: dict[str, Any], kubernetes: dict[tuple[str, str], dict[str, Any]]) -> None:
    """WHIP's signalling port is served and published, and its media's UDP range is the one ingest binds."""
    ingest = compose["services"]["ingest"]
    resolved = check_config(ingest["command"], environment(ingest))
    assert resolved["http_port"] == 8081 and resolved["webrtc_ports"] == [40000, 40049]
    assert "8081:8081" in ingest["ports"] and "40000-40049:40000-40049/udp" in ingest["ports"]
    container = kubernetes[("Deployment", "ingest")]["spec"]["template"]["spec"]["containers"][0]
    resolved = check_config(container["args"], k8s_environment(kubernetes, container))
    assert resolved["http_port"] == 8081 and resolved["webrtc_ports"] == [40000, 40049]
    service = kubernetes[("Service", "ingest")]["spec"]["ports"]
    assert {"name": "whip", "port": 8081, "targetPort": "whip"} in service


def test_srt_publishers_reach_ingest_in_compose_and_kubernetes(
        compose: dict[str, Any], kubernetes: dict[tuple[str, str], dict[str, Any]]) -> None:
    """SRT's UDP port is served by ingest, published by compose and the Service, and the image has libsrt."""
    ingest = compose["services"]["ingest"]
    assert check_config(ingest["command"], environment(ingest))["srt_port"] == 8890
    assert "8890:8890/udp" in ingest["ports"]
    container = kubernetes[("Deployment", "ingest")]["spec"]["template"]["spec"]["containers"][0]
    assert check_config(container["args"], k8s_environment(kubernetes, container))["srt_port"] == 8890
    assert {"name": "srt", "containerPort": 8890, "protocol": "UDP"} in container["ports"]
    service = kubernetes[("Service", "ingest")]["spec"]["ports"]
    assert {"name": "srt", "port": 8890, "targetPort": "srt", "protocol": "UDP"} in service
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "libsrt1.5-openssl" in dockerfile and "8890/udp" in dockerfile


def test_srt_players_reach_playback_in_compose_and_kubernetes(
        compose: dict[str, Any], kubernetes: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Playback serves SRT players on UDP 8891: each compose replica at its own address (scaled: no host
    port, the gateway names the replica), the Kubernetes container and Service publish it, the image exposes it."""
    playback = compose["services"]["playback"]
    assert check_config(playback["command"], environment(playback))["srt_port"] == 8891
    assert "ports" not in playback
    container = kubernetes[("Deployment", "playback")]["spec"]["template"]["spec"]["containers"][0]
    assert check_config(container["args"], k8s_environment(kubernetes, container))["srt_port"] == 8891
    assert {"name": "srt", "containerPort": 8891, "protocol": "UDP"} in container["ports"]
    service = kubernetes[("Service", "playback")]["spec"]["ports"]
    assert {"name": "srt", "port": 8891, "targetPort": "srt", "protocol": "UDP"} in service
    expose = re.search(r"^EXPOSE (.+)$", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert expose and {"8890/udp", "8891/udp"} <= set(expose[1].split())


def test_workers_scale_on_their_own_in_compose_and_on_cpu_in_kubernetes(
        compose: dict[str, Any], kubernetes: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Workers: a scalable compose service (no host port), a Deployment whose replicas a HorizontalPodAutoscaler
    sets on CPU, thumbnails on their HTTP port; dispatch reads the ladder rules from CASTMESH_ABR."""
    worker = compose["services"]["worker"]
    resolved = check_config(worker["command"], environment(worker))
    assert resolved["http_port"] == 8092 and resolved["max_jobs"] == 4 and "ports" not in worker
    dispatch = compose["services"]["dispatch"]
    rules = check_config(dispatch["command"], {**environment(dispatch), "CASTMESH_ABR": "live=180p:x180:300k"})
    assert rules["abr"] == "live=180p:x180:300k"
    hpa = kubernetes[("HorizontalPodAutoscaler", "worker")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "worker"}
    assert hpa["metrics"] == [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]
    container = kubernetes[("Deployment", "worker")]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["cpu"]  # utilization is measured against the request
    assert check_config(container["args"], k8s_environment(kubernetes, container))["http_port"] == 8092
    assert {"name": "http", "containerPort": 8092} in container["ports"]
    expose = re.search(r"^EXPOSE (.+)$", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert expose and "8092" in expose[1].split()


def test_workers_record_to_a_volume_with_rules_on_dispatch_in_compose_and_kubernetes(
        compose: dict[str, Any], kubernetes: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Recordings: workers write to /recordings (a volume every compose replica shares; the pod's own disk in
    Kubernetes), owned by the image's unprivileged user; dispatch reads the record and forward rules; uploads
    and retention come from the environment."""
    worker = compose["services"]["worker"]
    resolved = check_config(worker["command"], {**environment(worker), "CASTMESH_RECORD_UPLOAD":
                                                "s3://recs?endpoint=http://minio:9000"})
    assert resolved["record_dir"] == "/recordings" and resolved["record_max_age"] == 7 * 86400
    assert resolved["record_upload"] == "s3://recs?endpoint=http://minio:9000"
    assert "recordings:/recordings" in worker["volumes"] and "recordings" in compose["volumes"]
    dispatch = compose["services"]["dispatch"]
    rules = check_config(dispatch["command"], {**environment(dispatch), "CASTMESH_RECORD": "live=300",
                                               "CASTMESH_FORWARD": "live=rtmp://a.example/live/{name}",
                                               "CASTMESH_PULL": "cams/*=rtsp://nvr/{name} ondemand"})
    assert rules["record"] == "live=300" and rules["forward"] == "live=rtmp://a.example/live/{name}"
    assert rules["pull"] == "cams/*=rtsp://nvr/{name} ondemand"
    spec = kubernetes[("Deployment", "worker")]["spec"]["template"]["spec"]
    container = spec["containers"][0]
    resolved = check_config(container["args"], k8s_environment(kubernetes, container))
    assert resolved["record_dir"] == "/recordings" and resolved["record_max_age"] == 7 * 86400
    assert {"name": "recordings", "mountPath": "/recordings"} in container["volumeMounts"]
    assert any(v["name"] == "recordings" and "emptyDir" in v for v in spec["volumes"])
    assert "chown castmesh /recordings" in (DEPLOY / "Dockerfile").read_text()
