"""``kvcache-operator run`` argument handling that needs no cluster."""

from __future__ import annotations

import gc

import pytest

from kvcache_operator.run import GC_THRESHOLDS, default_priority, tune_gc


def test_default_priority_differs_between_replicas_and_is_stable() -> None:
    names = [f"kvcache-operator-7d9f8c6b5-{suffix}" for suffix in ("abcde", "fghij", "klmno", "pqrst")]
    priorities = [default_priority(n) for n in names]
    assert len(set(priorities)) == len(names)
    assert priorities == [default_priority(n) for n in names]
    assert all(1 <= p < 2**31 for p in priorities)


def test_default_priority_reads_pod_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_ID", "op-0")
    assert default_priority() == default_priority("op-0")


def test_the_operator_raises_the_gc_thresholds_unless_told_not_to(monkeypatch: pytest.MonkeyPatch) -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        monkeypatch.setenv("KVCACHE_OPERATOR_GC", "0")
        assert tune_gc() == (700, 10, 10)
        monkeypatch.delenv("KVCACHE_OPERATOR_GC")
        assert tune_gc() == GC_THRESHOLDS != (700, 10, 10)
    finally:
        gc.set_threshold(*before)
