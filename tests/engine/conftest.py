"""Engine test fixtures: every engine a test makes is closed afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kvcache_engine.engine import KVCacheEngine
from tests.engine.helpers import make_engine


@pytest.fixture
def engines() -> Iterator[list[KVCacheEngine]]:
    made: list[KVCacheEngine] = []
    yield made
    for e in made:
        e.close()


@pytest.fixture
def engine_factory(engines: list[KVCacheEngine]) -> Any:
    def factory(**overrides: Any) -> KVCacheEngine:
        e = make_engine(**overrides)
        engines.append(e)
        return e

    return factory
