"""Data routes of the server: lookup, get (a KV frame, streamed) and put (a KV frame: received
into slots the engine reserved, else into a warm staging buffer). Transport only: every
decision is the engine's.

Invariant: a put's header is read and checked (dtype, shape, byte count) before any payload
byte is accepted; a put whose body is cut short stores nothing.
"""

from __future__ import annotations

import asyncio
import functools
import math
from typing import TYPE_CHECKING, Any

from aiohttp import web

from kvcache_engine.client.buffers import byte_view, torch_dtype
from kvcache_engine.contract import DTYPE_BYTES, KVCacheConfig
from kvcache_engine.contract.curve import CLIENT_MISS_REASONS
from kvcache_engine.core.store import check_distinct
from kvcache_engine.server.body import BodyViews, read_exact, send_tensor, wire_pieces
from kvcache_engine.server.http import BadRequestError
from kvcache_engine.wire import (
    PREFIX_BYTES,
    decode_frame_header,
    decode_frame_prefix,
    parse_hashes,
    parse_tokens,
    split_frame,
)

if TYPE_CHECKING:
    import torch

    from kvcache_engine.core.reservations import PutReservation
    from kvcache_engine.server.app import EngineServer

__all__ = ["DataRoutes"]


class DataRoutes:
    """``/v1/lookup``, ``/v1/get``, ``/v1/put`` of one server (bearer token: the middleware)."""

    def __init__(self, server: EngineServer) -> None:
        self.server = server
        self.engine = server.engine
        self.settings = server.settings
        self.staging = server.staging

    def _chain(self, doc: dict[str, Any]) -> tuple[str, list[int]]:
        """("hashes"|"tokens", values) from a request, bounded by max_blocks_per_request."""
        cfg = self.engine.config
        max_blocks = self.settings.max_blocks_per_request
        if ("hashes" in doc) == ("tokens" in doc):
            raise BadRequestError("give exactly one of 'hashes' (block hashes) or 'tokens' (token ids)")
        if "hashes" in doc:
            return "hashes", parse_hashes(doc["hashes"], max_len=max_blocks)
        return "tokens", parse_tokens(
            doc["tokens"], max_len=max_blocks * cfg.block_tokens + cfg.block_tokens - 1
        )

    def _put_chain(self, doc: dict[str, Any]) -> tuple[str, list[int]]:
        """A put's chain: as :meth:`_chain`, and a repeated hash is refused before anything is
        reserved (a put is atomic: a refusal leaves no trace in the pool or the index)."""
        kind, values = self._chain(doc)
        if kind == "hashes":
            check_distinct(values)
        return kind, values

    async def lookup(self, request: web.Request) -> web.Response:
        """Optional keys besides the chain: ``namespace`` (the one the client hashed under: its
        misses count as a namespace mismatch when it is not the engine's), ``moved`` (true: the
        chain's replica changed lately) and ``client_misses`` (``{"client_timeout"|"client_error":
        blocks}`` its failed calls missed since it last said)."""
        doc = await self.server.read_json(request)
        kind, values = self._chain(doc)
        namespace = doc.get("namespace")
        if namespace is not None and not isinstance(namespace, str):
            raise BadRequestError(f"namespace: expected a string, got {type(namespace).__name__}")
        moved = doc.get("moved", False)
        if not isinstance(moved, bool):
            raise BadRequestError(f"moved: expected true or false, got {moved!r}")
        misses = self._client_misses(doc.get("client_misses"))
        bt = self.engine.config.block_tokens
        blocks = await self.server.run(self._lookup, kind, values, namespace, misses, moved)
        return web.json_response({"cached_blocks": blocks, "cached_tokens": blocks * bt})

    def _lookup(
        self, kind: str, values: list[int], namespace: str | None, misses: dict[str, int], moved: bool
    ) -> int:
        """On the executor (the engine's lock is never taken on the event loop)."""
        for reason, count in misses.items():
            self.engine.count_client_misses(reason, count)
        if kind == "hashes":
            return self.engine.lookup_hashes(values, namespace=namespace, moved=moved)  # type: ignore[arg-type]
        return self.engine.lookup(values) // self.engine.config.block_tokens

    @staticmethod
    def _client_misses(doc: Any) -> dict[str, int]:
        """The ``client_misses`` of a lookup, checked (BadRequestError naming what is wrong)."""
        if doc is None:
            return {}
        if not isinstance(doc, dict):
            raise BadRequestError(f"client_misses: expected an object, got {type(doc).__name__}")
        for reason, blocks in doc.items():
            if reason not in CLIENT_MISS_REASONS:
                raise BadRequestError(
                    f"client_misses: unknown reason {reason!r}; expected {', '.join(CLIENT_MISS_REASONS)}"
                )
            if isinstance(blocks, bool) or not isinstance(blocks, int) or not 0 <= blocks < 2**53:
                raise BadRequestError(f"client_misses.{reason}: expected a non-negative int, got {blocks!r}")
        return doc

    async def get(self, request: web.Request) -> web.StreamResponse:
        kind, values = self._chain(await self.server.read_json(request))
        if kind == "tokens":
            values = [int(h) for h in self.engine.block_hashes(values)]
        buf = self.staging.take(len(values) * self._token_elems())
        try:
            kv = await self.server.run(self.engine.get_hashes, values, buf)
            return await send_tensor(request, kv, self.engine.config.dtype)
        finally:
            if buf is not None:
                self.staging.give(buf)

    def _token_elems(self) -> int:
        cfg = self.engine.config
        return cfg.block_tokens * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim

    async def put(self, request: web.Request) -> web.Response:
        """Store a put frame. The header is read and checked first; the payload then lands
        straight in slots the engine reserved (:meth:`_put_in_place`, raw CPU pools with free
        slots), else in a warm staging buffer (no fresh pages to fault in per put) that the
        engine encodes into its slots and that goes back to the staging pool afterwards."""
        cfg = self.engine.config
        declared = request.content_length
        if declared is None:  # chunked upload: buffer it whole
            body = await self.server.read_body(request)
            header, payload = split_frame(body)
            kind, values = self._put_chain(header)
            want = self._frame_shape(header, kind, values, payload.nbytes)
            kv = self._as_kv(want, memoryview(body)[len(body) - payload.nbytes :])
            return await self._store(kind, values, kv)
        limit = self.settings.max_body_bytes
        if declared > limit:
            raise BadRequestError(f"body of {declared} bytes exceeds the limit of {limit}", 413)
        reader = request.content
        async with asyncio.timeout(self.settings.body_timeout_s):
            hlen = decode_frame_prefix(await read_exact(reader, PREFIX_BYTES))
            if PREFIX_BYTES + hlen > declared:
                raise BadRequestError(f"frame: truncated header ({declared - PREFIX_BYTES} of {hlen} bytes)")
            header = decode_frame_header(await read_exact(reader, hlen))
        kind, values = self._put_chain(header)
        want = self._frame_shape(header, kind, values, declared - PREFIX_BYTES - hlen)
        raw = self.engine.stores_raw_rows
        hashes = self._hashes(kind, values) if raw else []
        res = await self.server.run(self.engine.reserve_put, hashes) if hashes else None
        if res is not None:
            return await self._put_in_place(request, res, want, cfg)
        numel = math.prod(want)
        buf = self.staging.take(numel)
        try:
            view = byte_view(buf)[: numel * DTYPE_BYTES[cfg.dtype]] if buf is not None else None
            if view is None:
                view = memoryview(bytearray(numel * DTYPE_BYTES[cfg.dtype]))
            if hashes:  # staged as slot rows, checksummed on the way: put_rows copies them as is
                return await self._put_rows_staged(request, hashes, want, view, cfg)
            async with asyncio.timeout(self.settings.body_timeout_s):
                await BodyViews([view]).read_from(reader)
            return await self._store(kind, values, self._as_kv(want, view))
        finally:
            if buf is not None:
                self.staging.give(buf)

    def _hashes(self, kind: str, values: list[int]) -> list[int]:
        """The block hashes of a put's chain (its full blocks when given as tokens)."""
        return values if kind == "hashes" else [int(h) for h in self.engine.block_hashes(values)]

    async def _put_in_place(
        self, request: web.Request, res: PutReservation, shape: list[int], cfg: KVCacheConfig
    ) -> web.Response:
        """The zero-copy put: the body's bytes go from aiohttp's chunks straight into the slots
        the engine reserved (no staging buffer, no second copy), then the engine indexes them
        (checksummed on the way, or at commit without the C kernel). A body cut short releases
        the slots and indexes nothing."""
        body = BodyViews.for_blocks(res.targets, *wire_pieces(shape, cfg))
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                await body.read_from(request.content)
        except BaseException:
            self.engine.release_put(res)
            raise
        commit = functools.partial(self.engine.commit_put, res, body.checksums())
        stored = await asyncio.get_running_loop().run_in_executor(self.server.commit_executor, commit)
        return web.json_response({"stored_blocks": stored, "block_tokens": cfg.block_tokens})

    async def _put_rows_staged(
        self, request: web.Request, hashes: list[int], shape: list[int], view: memoryview, cfg: KVCacheConfig
    ) -> web.Response:
        """The staged put of a raw-rows engine (no free slots to reserve): the body lands in the
        staging buffer already laid out as the blocks' slot rows, checksummed on the way with the
        C kernel; engine.put_rows then evicts, copies the new rows into their slots as they are
        and indexes them. A body cut short changes nothing."""
        import torch

        planes, plane_bytes, piece = wire_pieces(shape, cfg)
        width = planes * piece
        targets: list[memoryview | None] = [view[j * width : (j + 1) * width] for j in range(len(hashes))]
        body = BodyViews.for_blocks(targets, planes, plane_bytes, piece)
        async with asyncio.timeout(self.settings.body_timeout_s):
            await body.read_from(request.content)
        rows = torch.frombuffer(view, dtype=torch.uint8, count=len(hashes) * width).view(len(hashes), width)
        stored = await self.server.run(self.engine.put_rows, hashes, rows, body.checksums())
        return web.json_response({"stored_blocks": stored, "block_tokens": cfg.block_tokens})

    async def _store(self, kind: str, values: list[int], kv: torch.Tensor) -> web.Response:
        if kind == "hashes":
            stored = await self.server.run(self.engine.put_blocks_raw, values, kv)
        else:
            stored = await self.server.run(self.engine.put, values, kv)
        return web.json_response({"stored_blocks": stored, "block_tokens": self.engine.config.block_tokens})

    def _frame_shape(
        self, header: dict[str, Any], kind: str, values: list[int], payload_nbytes: int
    ) -> list[int]:
        """The KV shape a put frame must carry, after checking its header and payload length."""
        cfg = self.engine.config
        if header.get("dtype") != cfg.dtype:
            raise BadRequestError(f"dtype: got {header.get('dtype')!r}, this engine stores {cfg.dtype!r}")
        shape = header.get("shape")
        n = len(values) * cfg.block_tokens if kind == "hashes" else len(values)
        want = [2, cfg.num_layers, n, cfg.num_kv_heads, cfg.head_dim]
        if shape != want:
            raise BadRequestError(
                f"shape: got {shape!r}, expected {want} ([2, num_layers, n_tokens, num_kv_heads, head_dim])"
            )
        nbytes = math.prod(want) * DTYPE_BYTES[cfg.dtype]
        if header.get("nbytes") != nbytes or payload_nbytes != nbytes:
            raise BadRequestError(
                f"payload: {payload_nbytes} bytes (header nbytes={header.get('nbytes')!r}), expected {nbytes}"
            )
        return want

    def _as_kv(self, want: list[int], payload: memoryview) -> torch.Tensor:
        """A zero-copy tensor view of a put payload (already length-checked)."""
        import torch

        dtype = torch_dtype(self.engine.config.dtype)
        if not payload.nbytes:
            return torch.empty(want, dtype=dtype)
        return torch.frombuffer(payload, dtype=dtype, count=math.prod(want)).view(want)
