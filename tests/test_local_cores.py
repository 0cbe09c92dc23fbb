"""`LocalCluster` (and so `jaxserve serve`) pins each instance to its share of the machine's cores."""

from __future__ import annotations

import os

import pytest



@pytest.mark.parametrize("instances, cores, want", [
    (1, 2, [[]]),                    # a single instance keeps every core
    (2, 2, [[0], [1]]),
    (2, 8, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    (3, 2, [[0], [1], [0]]),         # more instances than cores: round robin
    (3, 8, [[0, 1], [2, 3, 4], [5, 6, 7]]),
])
def test_local_cluster_gives_each_instance_its_share_of_the_cores(monkeypatch, instances, cores, want):
    from jaxserve.launch.local import LocalCluster
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    cluster = LocalCluster("demo", instances)
    assert [cluster._cores(k) for k in range(instances)] == want
    assert [LocalCluster("demo", instances, pin=False)._cores(k) for k in range(instances)] == [[]] * instances
