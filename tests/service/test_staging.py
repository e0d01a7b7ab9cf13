"""The server's reusable get buffers (``server.Staging``): any take/give order is valid."""

from __future__ import annotations

from kvcache_engine.server import Staging


def test_staging_reuses_buffers_taken_in_growing_sizes() -> None:
    # Found by `kvcache-engine bench`: gets of growing prefixes leave buffers of different sizes
    # on the free list; taking one that is not first must not compare tensors (list.remove does).
    staging = Staging(1 << 20, "float16")
    small = staging.take(16)
    assert small is not None
    staging.give(small)
    big = staging.take(64)
    assert big is not None and big is not small
    staging.give(big)
    assert staging.take(64) is big
    assert staging.take(16) is small
