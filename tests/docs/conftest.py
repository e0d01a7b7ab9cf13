"""Every engine a docs test starts is closed after the test, whatever happened in it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.docs.scenarios import LIVE


@pytest.fixture(autouse=True)
def _close_engines() -> Iterator[None]:
    before = set(LIVE)
    yield
    for engine in list(LIVE - before):
        engine.close()
