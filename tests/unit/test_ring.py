"""Consistent hashing with bounded loads: no node over the cap, a stream's viewers packed along its walk,
and little movement when a node joins."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from castmesh.mesh.ring import BoundedRing


@settings(max_examples=100, deadline=None)
@given(nodes=st.integers(1, 12), viewers=st.lists(st.integers(0, 20), min_size=1, max_size=400),
       epsilon=st.sampled_from([0.1, 0.25, 1.0]))
def test_no_node_ever_goes_over_the_cap(nodes: int, viewers: list[int], epsilon: float) -> None:
    ring = BoundedRing([f"playback-{i}" for i in range(nodes)], epsilon=epsilon)
    loads: Counter[str] = Counter()
    for stream in viewers:
        cap = ring.cap(loads)
        node = ring.pick(f"live/s{stream}", loads)
        assert node is not None and loads[node] < cap
        loads[node] += 1
    average = sum(loads.values()) / nodes
    assert max(loads.values()) <= (1 + epsilon) * average + 1 + 1e-9


def test_one_streams_viewers_fill_its_walk_in_order() -> None:
    ring = BoundedRing([f"playback-{i}" for i in range(4)], epsilon=0.25)
    walk = ring.walk("live/big")
    loads: Counter[str] = Counter()
    picks = []
    for _ in range(40):
        node = ring.pick("live/big", loads)
        assert node is not None
        picks.append(node)
        loads[node] += 1
    assert picks[0] == walk[0]
    order = [walk.index(p) for p in picks]
    assert order.count(0) > order.count(3)  # packed: the first node of the walk takes the most
    assert max(loads.values()) <= 13  # ceil(1.25 * 40 / 4)
    assert len(set(picks)) == 4  # and once the others are full, every node helps


def test_viewers_of_many_small_streams_stay_on_their_first_node() -> None:
    ring = BoundedRing([f"playback-{i}" for i in range(5)], epsilon=0.25)
    loads: Counter[str] = Counter()
    moved = 0
    for stream in range(50):
        for _ in range(2):
            node = ring.pick(f"live/s{stream}", loads)
            assert node is not None
            moved += node != ring.walk(f"live/s{stream}")[0]
            loads[node] += 1
    assert moved < 20  # most streams keep both viewers on one node: one upstream subscription each


def test_a_new_node_takes_only_the_streams_whose_walk_it_now_heads() -> None:
    before = BoundedRing([f"playback-{i}" for i in range(4)])
    after = BoundedRing([f"playback-{i}" for i in range(5)])
    streams = [f"live/s{i}" for i in range(500)]
    changed = [s for s in streams if before.walk(s)[0] != after.walk(s)[0]]
    assert all(after.walk(s)[0] == "playback-4" for s in changed)
    assert 50 < len(changed) < 160  # about a fifth
