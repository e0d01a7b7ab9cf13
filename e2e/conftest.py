"""Fixtures of the end-to-end suite (``make e2e`` runs ``pytest e2e``).

``E2E_TARGET=local`` (default): one local cluster with the real operator per test module.
``E2E_TARGET=kind``: a real cluster through kubectl and helm (see e2e/kind/README in e2e/README.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from e2e.scenarios import Driver


@pytest.fixture(scope="module")
def driver() -> Iterator[Driver]:
    target = os.environ.get("E2E_TARGET", "local")
    if target == "kind":
        from e2e.kind.driver import KindDriver

        with KindDriver.from_env() as kind:
            yield kind
        return
    if target != "local":
        raise pytest.UsageError(f"E2E_TARGET must be 'local' or 'kind', got {target!r}")
    from e2e.localcluster.cluster import LocalCluster
    from e2e.localcluster.driver import LocalDriver

    with LocalCluster(shutdown_grace_s=5.0) as cluster:
        yield LocalDriver(cluster)
