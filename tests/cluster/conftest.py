from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.cluster.harness import Cluster
from tests.consul.double import ConsulDouble

FAILED = pytest.StashKey[bool]()  # whether the test itself (not its setup or teardown) failed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport,
                                                                                         pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[FAILED] = report.failed
    return report


def _stop(request: pytest.FixtureRequest, cluster: Cluster) -> None:
    """Stop the nodes; if the test failed, print every node's log first (pytest shows it with the failure)."""
    if request.node.stash.get(FAILED, False):
        print(cluster.logs())
    cluster.stop()


@pytest.fixture(params=["dispatch", "consul"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """Every cluster test runs twice: nodes registered with dispatch, and through Consul (the agent double)."""
    if request.param == "dispatch":
        c = Cluster(tmp_path)
        yield c
        _stop(request, c)
        return
    agent = ConsulDouble(tmp_path)
    c = Cluster(tmp_path, env={"CASTMESH_REGISTRY": "consul", "CONSUL_HTTP_ADDR": f"127.0.0.1:{agent.port}"})
    yield c
    _stop(request, c)
    agent.stop()
