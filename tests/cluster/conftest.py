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


# Tests run with nodes registered with dispatch only, and where what Consul changes in them is tested instead.
DISPATCH_ONLY = {
    "test_origin_killed_while_publishing_and_viewing": "test_fault_sequence[consul] kills both origins, late",
    "test_dispatch_restart_forgets_nothing_viewers_need": "test_fault_sequence[consul] restarts dispatch, late",
    "test_playback_moves_to_another_edge_when_its_edge_dies": "test_fault_sequence[consul] kills both edges, late",
    "test_stuck_subscriber_is_skipped_then_dropped_and_costs_bounded_memory": "(a relay's fan-out: no registry in it)",
    "test_ffmpeg_plays_rtmp_from_a_playback_node": "(playback's RTMP output: no registry in it)",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """DISPATCH_ONLY's tests run with nodes registered with dispatch only: what Consul changes in them
    (registration, sessions that hold leases) is exercised by test_fault_sequence[consul]. The suite's time
    budget (make test within about 25 minutes on two cores) pays for that one."""
    def consul_elsewhere(item: pytest.Item) -> bool:
        params = item.callspec.params if getattr(item, "callspec", None) is not None else {}  # type: ignore[attr-defined]
        return params.get("cluster") == "consul" and getattr(item, "originalname", "") in DISPATCH_ONLY

    dropped = [item for item in items if consul_elsewhere(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]


@pytest.fixture(params=["dispatch", "consul"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """Every cluster test runs twice: nodes registered with dispatch, and through Consul (the agent double);
    DISPATCH_ONLY's with dispatch only (pytest_collection_modifyitems)."""
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
