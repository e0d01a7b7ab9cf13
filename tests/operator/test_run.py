"""``kvcache-operator run`` argument handling that needs no cluster."""

from __future__ import annotations

import pytest

from kvcache_operator.run import default_priority


def test_default_priority_differs_between_replicas_and_is_stable() -> None:
    names = [f"kvcache-operator-7d9f8c6b5-{suffix}" for suffix in ("abcde", "fghij", "klmno", "pqrst")]
    priorities = [default_priority(n) for n in names]
    assert len(set(priorities)) == len(names)
    assert priorities == [default_priority(n) for n in names]
    assert all(1 <= p < 2**31 for p in priorities)


def test_default_priority_reads_pod_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_ID", "op-0")
    assert default_priority() == default_priority("op-0")
