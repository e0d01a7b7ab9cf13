"""Fixtures for the fast local-cluster tests (run by ``make test``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e.localcluster.cluster import LocalCluster


@pytest.fixture(scope="module")
def bare_cluster() -> Iterator[LocalCluster]:
    """API server, controllers, kubelet and proxy; no operator (the workload tests need none)."""
    with LocalCluster(operator=False, shutdown_grace_s=3.0) as cluster:
        yield cluster
