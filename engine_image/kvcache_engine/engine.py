"""KVCacheEngine: the block store behind the HTTP service (the seed's UltraAdaptiveKVCacheEngine).

Data plane: ``put(tokens, kv)`` stores the full blocks of a prompt's KV, ``lookup(tokens)`` counts
the cached leading tokens, ``get(tokens)`` returns their KV. The public KV layout is
``[2, num_layers, num_tokens, num_kv_heads, head_dim]`` (keys then values) in the config's dtype.

This class is a facade: the work is done by the parts in :mod:`kvcache_engine.core`, which share
one :class:`~kvcache_engine.core.state.EngineState` — the store (put/lookup/get), the slot
allocator (eviction, demotion, prefetch), reservations (zero-copy puts), background GC, block
transfer (export/import), retune (reconfigure/resize), maintenance (clear/compact/validate) and
stats. Persistence and the model runner are created on first use (their modules import lazily).

Concurrency: one re-entrant lock guards the index, pools, strategies and counters; every public
method takes it, so concurrent callers see each operation atomically. A background thread (started
the first time occupancy passes ``gc_threshold``) evicts down to the threshold, so a put rarely has
to evict inline; a put into a full pool still evicts inline rather than wait.

Invariants: a block is indexed iff it occupies exactly one slot of one tier; every indexed block's
parent is indexed (evicting a block evicts its descendants); each tier's strategy tracks exactly
that tier's blocks; counters only grow.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from kvcache_engine.contract import KVCacheConfig, node_id, rendezvous_owner
from kvcache_engine.core.gc import BackgroundGC
from kvcache_engine.core.maintenance import Maintenance
from kvcache_engine.core.reservations import PutReservation, Reservations
from kvcache_engine.core.retune import Retuner, validated_config
from kvcache_engine.core.slots import SlotAllocator
from kvcache_engine.core.state import EngineState
from kvcache_engine.core.stats import collect_stats
from kvcache_engine.core.store import BlockStore
from kvcache_engine.core.transfer import BlockTransfer

if TYPE_CHECKING:
    from pathlib import Path

    from kvcache_engine.core.block_pool import StoredBlock
    from kvcache_engine.core.hashing import BlockHash

__all__ = ["KVCacheEngine"]


class KVCacheEngine:
    """A KV block store: pool(s), prefix index, eviction, compression, tiers, stats.

    ``KVCacheEngine(config, **overrides)``: overrides are config fields (snake_case). When
    ``persistence_path`` is set and ``load_on_start``, the persisted cache is loaded.
    """

    def __init__(
        self, config: KVCacheConfig | None = None, *, load_on_start: bool = True, **overrides: Any
    ) -> None:
        cfg = config if config is not None else KVCacheConfig()
        if overrides:
            cfg = validated_config(cfg, overrides)
        self._state = state = EngineState(cfg)
        self.device: torch.device = state.device
        self._slots = SlotAllocator(state)
        self._gc = BackgroundGC(state, self._slots)
        self._store = BlockStore(state, self._slots, self._gc)
        self._reservations = Reservations(state, self._store, self._gc)
        self._transfer = BlockTransfer(state, self._slots)
        self._retune = Retuner(state, self._slots, self._reservations, self._gc)
        self._maintenance = Maintenance(state, self._reservations)
        self._persister: Any = None
        self._runner: Any = None
        if cfg.persistence_path and load_on_start:
            self.load()

    # ------------------------------------------------------------------ public properties

    @property
    def config(self) -> KVCacheConfig:
        """A copy of the effective config (change it with reconfigure())."""
        return self._state.config.model_copy(deep=True)

    @property
    def codec(self) -> str:
        return self._state.codec.name

    @property
    def stores_raw_rows(self) -> bool:
        """True when a block's stored payload is its raw KV bytes ``[2, L, block_tokens, H, D]``
        in a CPU pool (codec ``none``): then reserve_put can hand out slots to write into."""
        return self._state.stores_raw_rows

    def __enter__(self) -> KVCacheEngine:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ------------------------------------------------------------------ data plane

    def block_hashes(self, tokens: Any) -> list[BlockHash]:
        """Chained hashes of the full blocks of ``tokens`` under this engine's namespace."""
        return self._store.block_hashes(tokens)

    def put(self, tokens: Any, kv: torch.Tensor) -> int:
        """Store the full blocks of ``tokens`` with their KV; returns blocks newly stored
        (already cached ones are touched). Raises ValueError naming ``tokens`` or ``kv``."""
        return self._store.put(tokens, kv)

    def put_blocks_raw(
        self, hashes: Sequence[BlockHash], kv: torch.Tensor, parent: BlockHash | None = None
    ) -> int:
        """Store a chain given its hashes (``hashes[0]``'s parent is ``parent``, None for a root);
        ``kv`` holds ``len(hashes) * block_tokens`` tokens. Nothing is stored when ``parent`` is
        not cached. Returns blocks newly stored."""
        return self._store.put_blocks_raw(hashes, kv, parent)

    def put_rows(
        self,
        hashes: Sequence[BlockHash],
        rows: torch.Tensor,
        checksums: Sequence[str] | None = None,
        parent: BlockHash | None = None,
    ) -> int:
        """Store a chain given as its blocks' raw payloads: ``rows`` uint8 ``[len(hashes),
        slot_bytes]`` on the CPU, row j = block j's ``[2, L, block_tokens, H, D]`` bytes (codec
        ``none``'s slot rows). Evicts as needed, like put_blocks_raw, and copies each new block's
        row into its slot as is. ``checksums``: the rows' checksums when the caller folded them in
        as it wrote them (block_pool.ScatterSums), else they are computed here. When the pool does
        not store raw rows (the codec changed meanwhile) the rows are encoded as put_blocks_raw
        would. Returns blocks newly stored."""
        return self._store.put_rows(hashes, rows, checksums, parent)

    def reserve_put(self, hashes: Sequence[int], parent: BlockHash | None = None) -> PutReservation | None:
        """Reserve free slots for a put of the chain ``hashes`` whose bytes the caller will write
        in place (no staging copy). Never evicts: the bytes are not here yet, and a put that
        never completes must not cost the cache a block (background GC keeps free slots). None
        when the pool does not store raw rows, the free slots do not cover the new blocks, or a
        pool rebuild, compaction or validation is waiting: use put_blocks_raw then. Every
        reservation must end in commit_put or release_put."""
        return self._reservations.reserve(hashes, parent)

    def commit_put(self, res: PutReservation, checksums: Sequence[str] | None = None) -> int:
        """Index a reservation's blocks once their bytes are written; returns blocks newly stored.
        ``checksums``: the reserved blocks' checksums when the writer folded them in as it wrote
        (block_pool.ScatterSums), else they are computed here, outside the lock (the slots are
        the reservation's own). Blocks are dropped, not stored, when their predecessor was
        evicted meanwhile or another put stored them first."""
        return self._reservations.commit(res, checksums)

    def release_put(self, res: PutReservation) -> None:
        """Give a reservation's slots back (its bytes never fully arrived); nothing is indexed."""
        self._reservations.release(res)

    def lookup(self, tokens: Any) -> int:
        """Cached leading tokens of ``tokens`` (a multiple of block_tokens). Counts as a request."""
        return self.lookup_hashes(self.block_hashes(tokens)) * self._state.config.block_tokens

    def lookup_hashes(
        self, hashes: Sequence[BlockHash], *, namespace: str | None = None, moved: bool = False
    ) -> int:
        """Leading cached blocks of this chain. Counts as a request (hits, misses, tokens).
        ``namespace``: the one the caller hashed the chain under, when it says; its misses count
        as ``namespace_mismatch`` when that is not this engine's. ``moved``: the caller says the
        chain's replica changed lately (its unseen blocks are the move's misses, not the
        workload's: the curve leaves them out)."""
        return self._store.lookup_hashes(hashes, namespace=namespace, moved=moved)

    def rebalance(self, endpoints: Sequence[str], this: str) -> int:
        """Clients now place chains over ``endpoints`` (``this``: this engine's URL among them):
        the curve forgets the chains another replica owns. Returns the entries it dropped.
        Raises ValueError naming ``self`` when ``this`` is not among ``endpoints``."""
        members = list(endpoints)
        me = node_id(this)
        if me not in {node_id(e) for e in members}:
            raise ValueError(f"self: {this!r} is not among the endpoints")
        with self._state.lock:
            return self._state.curve.retain(lambda key: node_id(rendezvous_owner(key, members)) == me)

    def count_client_misses(self, reason: str, blocks: int) -> None:
        """Blocks a client asked for and did not get because its own call failed
        (``client_timeout``, ``client_error``), as it reported them: counted with the miss
        reasons. Raises ValueError naming ``reason`` or ``blocks``."""
        self._store.count_client_misses(reason, blocks)

    def get(self, tokens: Any) -> torch.Tensor:
        """KV of the cached prefix of ``tokens``: ``[2, L, n, H, D]`` with n = lookup(tokens)
        (possibly 0), config dtype, on the CPU."""
        return self.get_hashes(self.block_hashes(tokens))

    def get_hashes(self, hashes: Sequence[BlockHash], out: torch.Tensor | None = None) -> torch.Tensor:
        """Decoded KV of the leading cached blocks of this chain, ``[2, L, n * T, H, D]``.

        ``out`` (optional): a contiguous CPU buffer of the config dtype with at least that many
        elements; the result is then decoded straight into its front and returned as a view of it
        (the server reuses warm staging buffers this way instead of faulting in fresh pages)."""
        return self._store.get_hashes(hashes, out)

    # ------------------------------------------------------------------ background gc

    def run_gc(self, limit: int | None = None) -> int:
        """Evict until occupancy is at most gc_threshold (or ``limit`` victims); returns victims."""
        return self._gc.run(limit)

    # ------------------------------------------------------------------ block-level API

    def cached_hashes(self) -> list[BlockHash]:
        """Every stored block, parents before children."""
        return self._transfer.cached_hashes()

    def export_blocks(self, hashes: Iterable[BlockHash] | None = None) -> Iterator[StoredBlock]:
        """Consistent copies of the given (None: all) cached blocks, parents before children.
        Each block is copied under the lock; unknown hashes are skipped."""
        return self._transfer.export_blocks(hashes)

    def import_blocks(self, blocks: Iterable[StoredBlock]) -> int:
        """Store verified copies: a block whose checksum, codec or geometry does not match, or
        whose parent is absent, is skipped (rejections are counted in stats' import_rejected and
        logged). Blocks in another codec are transcoded. Returns blocks newly stored. Blocks are
        taken in chunks, each chunk under the lock."""
        return self._transfer.import_blocks(blocks)

    # ------------------------------------------------------------------ admin

    def reconfigure(self, **changes: Any) -> KVCacheConfig:
        """Apply live fields (config.LIVE_FIELDS); others raise ConfigError naming them.
        Capacity or codec changes rebuild the pool online, keeping the hottest blocks that fit."""
        return self._retune.reconfigure(**changes)

    def resize(self, max_tokens: int) -> None:
        """Grow or shrink the primary tier online, keeping the hottest blocks that fit."""
        self._retune.resize(max_tokens)

    def clear_cache(self) -> None:
        """Drop every block (counters keep growing; they are Prometheus counters)."""
        self._maintenance.clear()

    def compact_cache(self) -> dict[str, int]:
        """Move live blocks to the front of each pool; returns moved/used/free counts."""
        return self._maintenance.compact()

    def validate_cache_integrity(self, repair: bool = False) -> dict[str, Any]:
        """Check every block's checksum against its slot, the index's chain links and slot
        ownership, and the strategies' bookkeeping. ``repair`` drops corrupt and dangling blocks
        (with their descendants). Returns ``{'is_valid', 'errors', 'checked_blocks',
        'corrupt_blocks', 'dangling_blocks', 'repaired_blocks'}``."""
        return self._maintenance.validate(repair, self._persister_errors)

    def _persister_errors(self) -> list[str]:
        return list(self._persister.integrity_errors()) if self._persister is not None else []

    def access_history(self) -> list[tuple[tuple[int, ...], int]]:
        """The last lookups, oldest first: (chain hashes root first, truncated; leading hit blocks)."""
        with self._state.lock:
            return self._state.history.snapshot()

    def get_stats(self) -> dict[str, Any]:
        """Counters, gauges and latency figures (every key always present)."""
        with self._state.lock:
            stats = collect_stats(self._state)
            if self._persister is not None:
                stats.update(self._persister.stats())
            return stats

    def close(self) -> None:
        """Stop background threads (gc, and the persister's when one exists)."""
        self._gc.close()
        persister = self._persister
        if persister is not None and hasattr(persister, "close"):
            persister.close()

    # ------------------------------------------------------------------ persistence and model hooks

    def _get_persister(self) -> Any:
        if self._persister is None:
            from kvcache_engine.persistence import Persister

            self._persister = Persister(self)
        return self._persister

    def _get_runner(self) -> Any:
        if self._runner is None:
            from kvcache_engine.inference import ModelRunner

            self._runner = ModelRunner(self)
        return self._runner

    def persist(self) -> bool:
        """Write the cache to persistence_path (see kvcache_engine.persistence)."""
        return bool(self._get_persister().persist())

    def load(self) -> int:
        """Load the persisted cache; returns blocks loaded."""
        return int(self._get_persister().load())

    def restore_from_backup(self, path: str | Path) -> int:
        """Load a backup archive/directory; returns blocks restored."""
        return int(self._get_persister().restore_from_backup(path))

    async def process_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one request through the configured model, reusing cached KV (kvcache_engine.inference)."""
        result: dict[str, Any] = await self._get_runner().process_request(request)
        return result

    def process_request_sync(self, request: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._get_runner().process_request_sync(request)
        return result

    async def process_batch_optimized(
        self, requests: list[dict[str, Any]], batch_size: int = 20
    ) -> list[dict[str, Any]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        result: list[dict[str, Any]] = await self._get_runner().process_batch_optimized(requests, batch_size)
        return result
