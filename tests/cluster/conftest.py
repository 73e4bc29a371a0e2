from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.harness import Cluster
from tests.consul.double import ConsulDouble


@pytest.fixture(params=["dispatch", "consul"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """Every cluster test runs twice: nodes registered with dispatch, and through Consul (the agent double)."""
    if request.param == "dispatch":
        c = Cluster(tmp_path)
        yield c
        c.stop()
        return
    agent = ConsulDouble(tmp_path)
    c = Cluster(tmp_path, env={"CASTMESH_REGISTRY": "consul", "CONSUL_HTTP_ADDR": f"127.0.0.1:{agent.port}"})
    yield c
    c.stop()
    agent.stop()
