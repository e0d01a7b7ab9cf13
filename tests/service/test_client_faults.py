"""Client resilience against real failures: a killed, paused (SIGSTOP), slow or garbage-speaking
engine. Calls keep their deadlines, never raise by default, and the breaker opens and recovers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import socketserver
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from kvcache_engine.client import (
    M_PUT_DROPPED,
    AsyncKVCacheClient,
    CacheProtocolError,
    CacheServerError,
    CacheTimeoutError,
    CacheUnavailableError,
    CircuitBreaker,
    KVCacheClient,
)
from kvcache_engine.contract import rendezvous_order, rendezvous_owner
from tests.service.conftest import TOKEN, make_config, make_kv, make_tokens

DEADLINE = 0.1
MARGIN = 0.05  # scheduling noise on a shared 2-core machine


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98] if len(samples) > 1 else samples[0]


def timed(fn: Callable[[], object], n: int) -> tuple[list[float], list[object]]:
    times, results = [], []
    for _ in range(n):
        t0 = time.monotonic()
        results.append(fn())
        times.append(time.monotonic() - t0)
    return times, results


class FakeEngine(socketserver.ThreadingTCPServer):
    """A TCP server that answers every request with ``reply(request_bytes)`` after ``delay``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, reply: Callable[[bytes], bytes | None], delay: float = 0.0) -> None:
        self.reply, self.delay = reply, delay
        self.stopping = threading.Event()
        self.connections = 0  # accepted so far

        fake = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                fake.connections += 1
                self.request.settimeout(5)
                while not fake.stopping.is_set():
                    try:
                        data = self.request.recv(1 << 20)
                    except OSError:
                        return
                    if not data:
                        return
                    if fake.stopping.wait(fake.delay):
                        return
                    answer = fake.reply(data)
                    if answer is None:
                        continue  # hang: never answer
                    try:
                        self.request.sendall(answer)
                    except OSError:
                        return

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def fake_engine() -> Iterator[Callable[..., FakeEngine]]:
    made: list[FakeEngine] = []

    def factory(reply: Callable[[bytes], bytes | None], delay: float = 0.0) -> FakeEngine:
        made.append(FakeEngine(reply, delay))
        return made[-1]

    yield factory
    for f in made:
        f.stop()


def http_reply(body: bytes, status: str = "200 OK", length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return (
        f"HTTP/1.1 {status}\r\nContent-Length: {n}\r\nContent-Type: application/json\r\n\r\n".encode() + body
    )


def client(url: str | list[str], **kw: object) -> KVCacheClient:
    urls = [url] if isinstance(url, str) else url
    opts: dict[str, object] = {"token": TOKEN, "config": make_config(), "timeout_s": DEADLINE, **kw}
    return KVCacheClient(urls, **opts)  # type: ignore[arg-type]


TOKENS = make_tokens(64)


@pytest.mark.parametrize(
    "name,reply",
    [
        ("garbage", lambda _: b"\x00\xff garbage \r\n\r\n" * 3),
        ("not http", lambda _: b"SSH-2.0-OpenSSH\r\n\r\n"),
        ("short body", lambda _: http_reply(b'{"cached_blocks": 1}', length=500)),
        ("wrong json", lambda _: http_reply(b'{"cached_blocks": "many"}')),
        ("too many blocks", lambda _: http_reply(b'{"cached_blocks": 999}')),
        ("not json", lambda _: http_reply(b"<html>")),
        ("server error", lambda _: http_reply(b'{"error": "boom"}', "503 Service Unavailable")),
        ("huge head", lambda _: b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000),
        (
            "chunked",
            lambda _: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        ("bad frame", lambda _: http_reply(b"KVC1\x05\x00\x00\x00{}xxx")),
    ],
)
def test_malformed_answers_degrade_to_a_miss(fake_engine, name: str, reply) -> None:
    fake = fake_engine(reply)
    with client(fake.url) as c:
        times, results = timed(lambda: (c.lookup(TOKENS), c.get(TOKENS)), 5)
        assert results == [(0, None)] * 5
        assert max(times) < 2 * DEADLINE + MARGIN  # lookup + get, each within its deadline
        assert c.breaker(fake.url).state == "open"  # garbage counts as the endpoint's failure
    with (
        client(fake.url, strict=True) as c,
        pytest.raises((CacheProtocolError, CacheTimeoutError, CacheServerError)) as info,
    ):
        c.lookup(TOKENS)
    # A short body waits for bytes that never come (a timeout); the rest are recognised at once.
    expected = {"short body": CacheTimeoutError, "server error": CacheServerError}.get(
        name, CacheProtocolError
    )
    assert type(info.value) is expected


def test_slow_engine_deadline_kept(fake_engine) -> None:
    fake = fake_engine(lambda _: http_reply(b'{"cached_blocks": 4, "cached_tokens": 64}'), delay=0.5)
    with client(fake.url, failure_threshold=1000) as c:
        times, results = timed(lambda: c.lookup(TOKENS), 20)
        get_times, gets = timed(lambda: c.get(TOKENS), 10)
        put_times, puts = timed(lambda: c.put(TOKENS, make_kv(make_config(), 64), wait=True), 5)
    assert results == [0] * 20 and gets == [None] * 10 and puts == [0] * 5
    assert p99(times) <= DEADLINE + MARGIN
    # get/put budgets add the transfer time at min_bandwidth (8 KiB here: negligible).
    assert p99(get_times) <= DEADLINE + MARGIN and p99(put_times) <= DEADLINE + MARGIN
    with client(fake.url, strict=True) as c, pytest.raises(CacheTimeoutError):
        c.lookup(TOKENS)


def test_fast_fake_engine_answers(fake_engine) -> None:
    fake = fake_engine(lambda _: http_reply(b'{"cached_blocks": 2, "cached_tokens": 8}'))
    with client(fake.url) as c:
        assert c.lookup(TOKENS) == 8  # the control: the same client works against a sane answer


def test_killed_engine_then_restart(engine_process) -> None:
    proc = engine_process("k")
    cfg = make_config()
    with client(proc.url, reset_timeout_s=0.2) as c:
        assert c.put(TOKENS, make_kv(cfg, 64), wait=True) == 16
        assert http_ok(proc.url)
        proc.kill9()
        times, results = timed(lambda: c.lookup(TOKENS), 30)
        assert results == [0] * 30 and p99(times) <= DEADLINE + MARGIN
        assert c.breaker(proc.url).state in ("open", "half_open")
        assert c.get(TOKENS) is None and c.put(TOKENS, make_kv(cfg, 64), wait=True) == 0
        proc.start()  # same port; nothing was persisted, so the cache is empty
        assert c.put(TOKENS, make_kv(cfg, 64), wait=True) in (0, 16)  # may still hit an open breaker
        deadline = time.monotonic() + 10
        while c.breaker(proc.url).state != "closed" or c.lookup(TOKENS) != 64:
            c.put(TOKENS, make_kv(cfg, 64), wait=True)
            assert time.monotonic() < deadline, "breaker never recovered"
            time.sleep(0.05)


def http_ok(url: str) -> bool:
    with socket.create_connection(tuple(url.removeprefix("http://").split(":")), timeout=1):  # type: ignore[arg-type]
        return True


def test_paused_engine_sigstop_breaker_opens_and_recovers(engine_process) -> None:
    proc = engine_process("s")
    cfg = make_config()
    with client(proc.url, reset_timeout_s=0.3, failure_threshold=3) as c:
        assert c.put(TOKENS, make_kv(cfg, 64), wait=True) == 16
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            times, results = timed(lambda: c.lookup(TOKENS), 20)
            assert results == [0] * 20
            assert p99(times) <= DEADLINE + MARGIN
            assert c.breaker(proc.url).state == "open"
            assert max(times[5:]) < 0.01  # an open breaker answers at once
            put_times, _ = timed(lambda: c.put(TOKENS, make_kv(cfg, 64)), 200)
            assert max(put_times) < 0.05  # fire-and-forget never blocks
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while c.lookup(TOKENS) != 64:  # half-open probe after 0.3 s, then closed
            assert time.monotonic() < deadline, "breaker never recovered"
            time.sleep(0.05)
        assert c.breaker(proc.url).state == "closed"


def test_put_queue_is_bounded_and_drops(fake_engine) -> None:
    fake = fake_engine(lambda _: None)  # accepts, never answers
    cfg = make_config()
    kv = make_kv(cfg, 64)
    before = M_PUT_DROPPED._value.get()
    with client(fake.url, put_queue_size=4, failure_threshold=1000) as c:
        t0 = time.monotonic()
        queued = sum(c.put(TOKENS, kv) for _ in range(200))
        assert time.monotonic() - t0 < 0.5
    assert queued <= 6
    assert M_PUT_DROPPED._value.get() - before >= 194


def test_no_endpoint_and_strict_errors() -> None:
    with client("http://127.0.0.1:9") as c:  # nothing listens on the discard port
        assert c.lookup(TOKENS) == 0 and c.get(TOKENS) is None
    with client("http://127.0.0.1:9", strict=True) as c, pytest.raises(CacheUnavailableError):
        c.lookup(TOKENS)
    with client("http://127.0.0.1:9") as c:
        assert c.put(TOKENS, torch.zeros(3)) in (0, 1)  # bad tensor: counted, never raised
        assert c.put(TOKENS, torch.zeros(3), wait=True) == 0
    with pytest.raises(ValueError, match="exactly one"):
        KVCacheClient()


async def test_async_client_keeps_deadlines_against_a_hanging_engine(fake_engine) -> None:
    fake = fake_engine(lambda _: None)
    async with AsyncKVCacheClient(
        [fake.url], token=TOKEN, config=make_config(), timeout_s=DEADLINE, reset_timeout_s=0.2
    ) as c:
        times = []
        for _ in range(10):
            t0 = time.monotonic()
            assert await c.lookup(TOKENS) == 0
            assert await c.get(TOKENS) is None
            times.append(time.monotonic() - t0)
        assert p99(times) <= 2 * DEADLINE + MARGIN
        assert c.breaker(fake.url).state == "open"
        async with AsyncKVCacheClient([fake.url], config=make_config(), timeout_s=DEADLINE, strict=True) as s:
            with pytest.raises(CacheTimeoutError):
                await s.lookup(TOKENS)
        fake.reply = lambda _: http_reply(b'{"cached_blocks": 2, "cached_tokens": 8}')  # it comes back
        deadline = time.monotonic() + 5
        while await c.lookup(TOKENS) != 8:  # the half-open probe succeeds after 0.2 s
            assert time.monotonic() < deadline, "breaker never recovered"
            await asyncio.sleep(0.05)
        assert c.breaker(fake.url).state == "closed"


def test_breaker_state_machine_with_a_fake_clock() -> None:
    now = [0.0]
    br = CircuitBreaker(
        "e", failure_threshold=2, reset_timeout_s=1.0, max_reset_timeout_s=3.0, clock=lambda: now[0]
    )
    assert br.allow()
    br.record_failure()
    assert br.state == "closed"
    br.record_failure()
    assert br.state == "open" and not br.allow()
    now[0] = 1.0
    assert br.allow() and br.state == "half_open"
    assert not br.allow()  # one probe at a time
    br.record_failure()  # failed probe: open for twice as long
    now[0] = 2.5
    assert not br.allow()
    now[0] = 3.0
    assert br.allow()
    br.record_success()
    assert br.state == "closed" and br.allow()


def test_rendezvous_moves_about_one_nth_of_chains() -> None:
    nodes = [f"http://10.0.0.{i}:8080" for i in range(4)]
    roots = [int.from_bytes(os.urandom(8), "little") for _ in range(4000)]
    before = {r: rendezvous_owner(r, nodes) for r in roots}
    after = {r: rendezvous_owner(r, [*nodes, "http://10.0.0.9:8080"]) for r in roots}
    moved = [r for r in roots if before[r] != after[r]]
    assert all(after[r] == "http://10.0.0.9:8080" for r in moved)
    assert 0.12 < len(moved) / len(roots) < 0.28  # ~1/5
    assert rendezvous_order(roots[0], nodes)[0] == before[roots[0]]
    assert rendezvous_owner(roots[0], ["http://10.0.0.1:8080/"]) == "http://10.0.0.1:8080/"


def _config_reply(doc: dict[str, object]) -> Callable[[bytes], bytes]:
    """A fake engine serving ``doc`` at /v1/config and a 2-block hit to every lookup."""

    def reply(request: bytes) -> bytes:
        if request.startswith(b"GET /v1/config"):
            return http_reply(json.dumps(doc).encode())
        return http_reply(b'{"cached_blocks": 2, "cached_tokens": 8}')

    return reply


GOOD_CONFIG = make_config().to_file_dict()


@pytest.mark.parametrize(
    "bad",
    [
        lambda _: http_reply(b'{"error": "boom"}', "503 Service Unavailable"),
        lambda _: http_reply(b'{"numLayers": -1}'),  # an invalid config: that replica's garbage
        lambda _: b"\x00\xff garbage \r\n\r\n",
    ],
    ids=["5xx", "invalid-config", "garbage"],
)
async def test_both_clients_fetch_the_geometry_from_the_next_replica(fake_engine, bad) -> None:
    """Without ``config`` the geometry comes from ``GET /v1/config`` of the first replica that
    answers it well; a failing one counts against its own breaker and the next is asked."""
    broken, good = fake_engine(bad), fake_engine(_config_reply(GOOD_CONFIG))
    urls = [broken.url, good.url]
    opts: dict[str, object] = {"token": TOKEN, "timeout_s": 1.0, "failure_threshold": 1}
    with KVCacheClient(urls, **opts) as c:  # type: ignore[arg-type]
        assert c.lookup(make_tokens(8)) == 8
        assert c.breaker(broken.url).state == "open" and c.breaker(good.url).state == "closed"
    async with AsyncKVCacheClient(urls, **opts) as a:  # type: ignore[arg-type]
        assert await a.lookup(make_tokens(8)) == 8
        assert a.breaker(broken.url).state == "open" and a.breaker(good.url).state == "closed"


async def test_one_deadline_for_a_call_across_replicas(fake_engine) -> None:
    """A call's deadline is set once: a chain's replica that hangs costs one deadline, never one
    per replica tried, in both clients (the next replica is asked only when a breaker refuses)."""
    hanging = [fake_engine(lambda _: None), fake_engine(lambda _: None)]
    urls = [f.url for f in hanging]
    with client(urls, failure_threshold=1000) as c:
        times, results = timed(lambda: c.lookup(TOKENS), 5)
    assert results == [0] * 5 and max(times) < DEADLINE + MARGIN
    async with AsyncKVCacheClient(
        urls, token=TOKEN, config=make_config(), timeout_s=DEADLINE, failure_threshold=1000
    ) as a:
        atimes = []
        for _ in range(5):
            t0 = time.monotonic()
            assert await a.lookup(TOKENS) == 0
            atimes.append(time.monotonic() - t0)
    assert max(atimes) < DEADLINE + MARGIN


def test_an_error_answer_keeps_the_connection(fake_engine) -> None:
    """A complete error answer (status, length, body) leaves the socket in a known state: the
    next call reuses it, in both clients (the fake engine counts connections)."""
    answers = iter([http_reply(b'{"error": "nope"}', "404 Not Found")])
    fake = fake_engine(lambda _: next(answers, http_reply(b'{"cached_blocks": 2, "cached_tokens": 8}')))
    with client(fake.url) as c:
        assert c.lookup(TOKENS) == 0  # the 404
        assert c.lookup(TOKENS) == 8
    assert fake.connections == 1

    async def run() -> None:
        async with AsyncKVCacheClient([fake.url], token=TOKEN, config=make_config(), timeout_s=1.0) as a:
            assert await a.lookup(TOKENS) == 0
            assert await a.lookup(TOKENS) == 8

    answers = iter([http_reply(b'{"error": "nope"}', "404 Not Found")])
    asyncio.run(run())
    assert fake.connections == 2


def test_breaker_probes_a_recovered_endpoint_within_two_seconds_of_a_long_outage() -> None:
    """Issue 16 finding 10: after a 20 s outage the backoff had grown to 30 s (9.4 s of misses
    after the endpoint answered again); the backoff is bounded so recovery is seen within 2 s."""
    now = [0.0]
    br = CircuitBreaker("e", failure_threshold=3, reset_timeout_s=0.25, clock=lambda: now[0])
    while now[0] < 20.0:  # down: every allowed call (probes included) fails
        if br.allow():
            br.record_failure()
        now[0] += 0.01
    recovered_at = now[0]
    while not br.allow():
        now[0] += 0.01
    assert now[0] - recovered_at <= 2.0 + 1e-9
    br.record_success()
    assert br.state == "closed"


@pytest.mark.parametrize("declared", [2**31, 2**33])
def test_a_lying_content_length_never_allocates(fake_engine, declared: int) -> None:
    """Issue 16 finding 3: the sync client preallocated whatever Content-Length a server
    declared (+1.4 GiB for one lookup); answers are bounded by the client's own limits."""
    import tracemalloc

    fake = fake_engine(lambda _: http_reply(b'{"cached_blocks": 1}', length=declared))
    with client(fake.url, timeout_s=0.5) as c:
        tracemalloc.start()
        try:
            t0 = time.monotonic()
            assert c.lookup(TOKENS) == 0
            elapsed = time.monotonic() - t0
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 16 * 2**20, peak
    assert elapsed < 0.5 + MARGIN
    with client(fake.url, timeout_s=0.5, strict=True) as s, pytest.raises(CacheProtocolError, match="limit"):
        s.lookup(TOKENS)


async def test_the_async_client_refuses_a_lying_content_length_too(fake_engine) -> None:
    fake = fake_engine(lambda _: http_reply(b'{"cached_blocks": 1}', length=2**33))
    async with AsyncKVCacheClient([fake.url], config=make_config(), timeout_s=0.5, strict=True) as s:
        with pytest.raises(CacheProtocolError, match="limit"):
            await s.lookup(TOKENS)


def test_a_get_frame_header_longer_than_the_answer_is_refused(fake_engine) -> None:
    frame = b"KVC1" + (60 * 2**20).to_bytes(4, "little") + b"{}"
    fake = fake_engine(lambda _: http_reply(frame, length=len(frame)))
    with (
        client(fake.url, timeout_s=0.5, strict=True) as s,
        pytest.raises(CacheProtocolError, match="frame header"),
    ):
        s.get(TOKENS)
