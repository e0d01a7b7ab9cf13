"""Persistence of the cache under ``persistence_path``: safetensors segments plus a manifest.

Layout::

    <persistence_path>/manifest.json        format version, KV geometry, codec, generation, segments
    <persistence_path>/seg-<gen>-<i>.safetensors   whole blocks (see kvcache_engine.wire: segments)
    <persistence_path>/quarantine/          segments that failed verification, moved aside

Invariants:

* **Atomic.** Every file is written to a temp name, fsynced, renamed, and the directory fsynced;
  segments are durable before the manifest that names them, so a crash at any instant leaves
  either the previous manifest or the new one, each naming only complete segments. Files no
  manifest names (a crash's leftovers) are removed on the next load or persist.
* **Acknowledged means durable.** When ``persist()`` returns True, every block the engine held
  when it started (and still holds) is named by the manifest on disk.
* **Incremental.** A persist writes only blocks not yet on disk, into one new segment (split
  at ``SEGMENT_BYTES``); blocks evicted since are dropped from the manifest, and segments whose
  live bytes fall under half are rewritten (compaction) when the dead bytes are large.
* **Verified on load.** A segment whose size, metadata or any block checksum is wrong is moved
  to ``quarantine/``, counted and reported by ``integrity_errors()``; the rest loads. A
  manifest whose KV geometry differs from the config is refused with the field named.
* **Never raises on a full, read-only or forbidden disk.** ``persist()`` returns False, logs the
  reason and counts it by reason (``kvcache_persist_failures_total{reason=...}``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvcache_engine.wire import (
    WIRE_FORMAT_VERSION,
    BlockMeta,
    WireError,
    parse_segment_metadata,
    segment_metadata,
    tensor_key,
)

if TYPE_CHECKING:
    import torch

    from kvcache_engine.contract import KVCacheConfig
    from kvcache_engine.core.block_pool import StoredBlock
    from kvcache_engine.engine import KVCacheEngine

__all__ = [
    "FORMAT_VERSION",
    "GEOMETRY_FIELDS",
    "GeometryMismatchError",
    "Persister",
    "SegmentError",
    "decode_segment",
    "encode_segment",
    "geometry_of",
    "read_manifest",
    "validate_path",
]

log = logging.getLogger("kvcache_engine.persistence")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
QUARANTINE = "quarantine"
SEGMENT_BYTES = 256 * 1024 * 1024
"""Upper bound of one segment's payload; bounds the memory a persist, load or stream holds."""
GEOMETRY_FIELDS = ("namespace", "block_tokens", "num_layers", "num_kv_heads", "head_dim", "dtype")
"""Config fields a persisted cache must share with the engine that loads it."""

_FAILURE_REASONS = {
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.EROFS: "read_only_filesystem",
    errno.ENOSPC: "disk_full",
    errno.EDQUOT: "disk_full",
}


class GeometryMismatchError(ValueError):
    """The persisted cache was written for another KV geometry; the field is named."""


class SegmentError(ValueError):
    """A segment failed verification (missing, truncated, bad metadata, bad checksum)."""


def geometry_of(config: KVCacheConfig) -> dict[str, Any]:
    """The geometry fields a manifest records."""
    return {name: getattr(config, name) for name in GEOMETRY_FIELDS}


def check_geometry(found: Mapping[str, Any], config: KVCacheConfig, source: str) -> None:
    """GeometryMismatchError naming the first differing field."""
    want = geometry_of(config)
    for name in GEOMETRY_FIELDS:
        if found.get(name) != want[name]:
            raise GeometryMismatchError(
                f"{source}: geometry mismatch: {name} is {found.get(name)!r} in the persisted cache "
                f"but {want[name]!r} in the engine config; refusing to load"
            )


# --- segment encoding ------------------------------------------------------------------------


def encode_segment(blocks: Iterable[StoredBlock]) -> tuple[bytes, list[BlockMeta]]:
    """Serialise whole blocks into one safetensors blob (payload tensors + block metadata)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    metas: list[BlockMeta] = []
    for block in blocks:
        keys = tuple(block.payload)
        nbytes = 0
        for key in keys:
            t = block.payload[key].contiguous()
            tensors[tensor_key(block.hash, key)] = t
            nbytes += t.numel() * t.element_size()
        metas.append(
            BlockMeta(int(block.hash), _opt_int(block.parent), block.codec, block.checksum, keys, nbytes)
        )
    return save(tensors, metadata=segment_metadata(metas)), metas


def _opt_int(value: int | None) -> int | None:
    return None if value is None else int(value)


def iter_batches(
    blocks: Iterable[StoredBlock], max_bytes: int = SEGMENT_BYTES
) -> Iterator[list[StoredBlock]]:
    """Group blocks into batches of at most ``max_bytes`` payload each (at least one block)."""
    batch: list[StoredBlock] = []
    size = 0
    for block in blocks:
        nbytes = sum(t.numel() * t.element_size() for t in block.payload.values())
        if batch and size + nbytes > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(block)
        size += nbytes
    if batch:
        yield batch


_ST_DTYPES = {
    "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64", "uint8": "U8", "int8": "I8",
    "int16": "I16", "int32": "I32", "int64": "I64", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}  # fmt: skip


def write_segment_file(path: Path, blocks: list[StoredBlock]) -> tuple[int, list[BlockMeta]]:
    """Write ``blocks`` as one safetensors segment, atomically, straight from the tensors'
    memory (the header is built here, so no serialised copy of the payload is made).
    Returns (file size, block metadata)."""
    from kvcache_engine.client.buffers import byte_view

    header: dict[str, Any] = {}
    parts: list[bytes | memoryview] = []
    metas: list[BlockMeta] = []
    offset = 0
    for block in blocks:
        keys = tuple(block.payload)
        nbytes = 0
        for key in keys:
            t = block.payload[key].detach().cpu().contiguous()
            n = t.numel() * t.element_size()
            dtype = _ST_DTYPES.get(str(t.dtype).removeprefix("torch."))
            if dtype is None:
                raise ValueError(f"payload {key!r}: dtype {t.dtype} has no safetensors name")
            header[tensor_key(block.hash, key)] = {
                "dtype": dtype,
                "shape": list(t.shape),
                "data_offsets": [offset, offset + n],
            }
            if n:
                parts.append(byte_view(t))
            offset += n
            nbytes += n
        metas.append(
            BlockMeta(int(block.hash), _opt_int(block.parent), block.codec, block.checksum, keys, nbytes)
        )
    header["__metadata__"] = segment_metadata(metas)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
    write_atomic(path, [len(raw).to_bytes(8, "little"), raw, *parts])
    return 8 + len(raw) + offset, metas


def iter_segments(
    blocks: Iterable[StoredBlock], max_bytes: int = SEGMENT_BYTES
) -> Iterator[tuple[bytes, list[BlockMeta]]]:
    """Encode blocks into segments of at most ``max_bytes`` payload each (at least one block)."""
    for batch in iter_batches(blocks, max_bytes):
        yield encode_segment(batch)


def _blocks_from_tensors(
    metas: list[BlockMeta],
    tensors: Mapping[str, torch.Tensor],
    wanted: set[int] | None,
    source: str,
    *,
    verify: bool = True,
) -> list[StoredBlock]:
    from kvcache_engine.core.block_pool import StoredBlock, payload_checksum
    from kvcache_engine.core.hashing import BlockHash

    out: list[StoredBlock] = []
    for meta in metas:
        if wanted is not None and meta.hash not in wanted:
            continue
        try:
            payload = {key: tensors[tensor_key(meta.hash, key)] for key in meta.keys}
        except KeyError as exc:
            raise SegmentError(
                f"{source}: block {meta.hash:016x} is missing tensor {exc.args[0]!r}"
            ) from None
        if verify and payload_checksum(payload) != meta.checksum:
            raise SegmentError(f"{source}: block {meta.hash:016x} fails its checksum")
        out.append(
            StoredBlock(
                hash=BlockHash(meta.hash),
                parent=None if meta.parent is None else BlockHash(meta.parent),
                codec=meta.codec,
                payload=payload,
                checksum=meta.checksum,
                hits=0,
                last_access=0,
            )
        )
    return out


def decode_segment(data: bytes, wanted: set[int] | None = None, source: str = "segment") -> list[StoredBlock]:
    """Blocks of an in-memory segment, each verified against its checksum (SegmentError)."""
    from safetensors.torch import load

    try:
        # safetensors.torch.load drops the metadata; read it from the header directly.
        metas = parse_segment_metadata(_header_metadata(data))
        tensors = load(data)
    except (WireError, SegmentError) as exc:
        raise SegmentError(f"{source}: {exc}") from None
    except Exception as exc:  # safetensors raises its own error types for garbage
        raise SegmentError(f"{source}: not a readable safetensors segment ({exc})") from None
    return _blocks_from_tensors(metas, tensors, wanted, source)


def _header_metadata(data: bytes) -> dict[str, str] | None:
    if len(data) < 8:
        raise SegmentError("segment: truncated (no header)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise SegmentError("segment: truncated header")
    try:
        header = json.loads(data[8 : 8 + n])
    except RecursionError:
        raise SegmentError("segment: header nests too deep") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SegmentError(f"segment: header is not JSON ({exc})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


def read_segment_file(
    path: Path, expected_size: int | None, wanted: set[int] | None, *, verify: bool = True
) -> list[StoredBlock]:
    """Blocks of a segment file, checked for size and metadata and, with ``verify``, every
    block's checksum (load leaves that to ``engine.import_blocks``, which checks it anyway)."""
    from safetensors import safe_open

    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise SegmentError(f"{path.name}: missing") from None
    if expected_size is not None and size != expected_size:
        raise SegmentError(
            f"{path.name}: size {size} bytes, manifest says {expected_size} (truncated or altered)"
        )
    try:
        with safe_open(str(path), framework="pt") as fh:
            metas = parse_segment_metadata(fh.metadata())
            needed = [m for m in metas if wanted is None or m.hash in wanted]
            tensors = {
                tensor_key(m.hash, k): fh.get_tensor(tensor_key(m.hash, k)) for m in needed for k in m.keys
            }
    except WireError as exc:
        raise SegmentError(f"{path.name}: {exc}") from None
    except SegmentError:
        raise
    except Exception as exc:  # safetensors' own errors on garbage or truncation
        raise SegmentError(f"{path.name}: not a readable safetensors segment ({exc})") from None
    return _blocks_from_tensors(needed, tensors, None, path.name, verify=verify)


# --- files --------------------------------------------------------------------------------------


class FileOps:
    """The file layer every persisted write goes through: the real calls here; tests install a
    faulty one (``FILES``) to inject fsync/write errors and torn writes (tests/service/
    test_durability.py). Invariant the callers keep: a failed operation leaves the last
    durable manifest, and the segments it names, as they were."""

    def write(self, fh: Any, data: bytes | memoryview) -> None:
        fh.write(data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)


FILES = FileOps()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        FILES.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | memoryview | list[bytes | memoryview]) -> None:
    """Write ``data`` (or its parts, in order) to ``path`` via temp file + fsync + rename +
    directory fsync."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as fh:
            for part in data if isinstance(data, list) else [data]:
                FILES.write(fh, part)
            fh.flush()
            FILES.fsync(fh.fileno())
        FILES.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a persisted cache or backup directory (None when there is none).

    Raises SegmentError when it exists but is not a valid manifest."""
    path = directory / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:  # bit-rot: refused (and quarantined by load), never a traceback
        raise SegmentError(f"{path}: not UTF-8 text (corrupted)") from None
    try:
        doc = json.loads(text)
    except RecursionError:
        raise SegmentError(f"{path}: JSON nests too deep") from None
    except json.JSONDecodeError as exc:
        raise SegmentError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("segments"), list):
        raise SegmentError(f"{path}: not a kvcache manifest")
    if doc.get("format_version") != FORMAT_VERSION:
        raise SegmentError(f"{path}: format_version {doc.get('format_version')!r}, expected {FORMAT_VERSION}")
    return doc


@dataclass
class _Segment:
    file: str
    size: int
    blocks: dict[int, BlockMeta]

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "size": self.size, "blocks": [m.to_json() for m in self.blocks.values()]}

    @classmethod
    def from_json(cls, doc: Any, version: int = WIRE_FORMAT_VERSION) -> _Segment:
        """A manifest's segment entry; ``version``: the manifest's wire_format_version (1: written
        before identity digests, read as is and migrated when the manifest is written again)."""
        if not isinstance(doc, dict) or not isinstance(doc.get("file"), str) or "/" in doc["file"]:
            raise SegmentError(f"manifest: bad segment entry {str(doc)[:120]}")
        try:
            if not isinstance(doc.get("blocks"), list):  # a rotted key must not read as "no blocks"
                raise SegmentError(f"manifest: segment entry {doc['file']!r} has no block list")
            metas = [BlockMeta.from_json(b, version) for b in doc["blocks"]]
            return cls(doc["file"], int(doc["size"]), {m.hash: m for m in metas})
        except (WireError, KeyError, TypeError, ValueError) as exc:
            raise SegmentError(f"manifest: bad segment entry {doc.get('file')!r}: {exc}") from None


def _segments_of(doc: Mapping[str, Any]) -> list[_Segment]:
    version = doc.get("wire_format_version", 1)
    version = version if isinstance(version, int) and not isinstance(version, bool) else 1
    return [_Segment.from_json(s, version) for s in doc["segments"]]


def new_segment(file: str, size: int, metas: Iterable[BlockMeta]) -> _Segment:
    """A manifest entry for a segment file (used by backups writing the same layout)."""
    return _Segment(file, size, {m.hash: m for m in metas})


def write_manifest(
    directory: Path, geometry: Mapping[str, Any], codec: str, segments: Iterable[_Segment], generation: int
) -> None:
    """Atomically write ``manifest.json`` naming ``segments`` (already durable) in order."""
    doc = {
        "format_version": FORMAT_VERSION,
        "wire_format_version": WIRE_FORMAT_VERSION,
        "generation": generation,
        "written_unix": time.time(),
        "geometry": dict(geometry),
        "codec": codec,
        "segments": [s.to_json() for s in segments],
    }
    write_atomic(directory / MANIFEST, json.dumps(doc, separators=(",", ":")).encode())


# --- the persister -------------------------------------------------------------------------------


@dataclass
class _Stats:
    persists: int = 0
    persist_failures: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    last_persist_ok: bool | None = None
    last_persist_error: str | None = None
    last_persist_unix: float = 0.0
    last_persist_seconds: float = 0.0
    bytes_written: int = 0
    blocks_loaded: int = 0
    blocks_expected: int = 0  # blocks the manifest named at the last load
    last_load_seconds: float = 0.0
    quarantined_segments: int = 0


class Persister:
    """Persists one engine's blocks under ``persistence_path`` (see the module docstring).

    One lock serialises persist, load and restore; ``start_periodic()`` runs a daemon thread
    persisting every ``config.persist_interval_s`` (re-read each round, so hot reload applies).
    """

    def __init__(self, engine: KVCacheEngine, path: str | os.PathLike[str] | None = None) -> None:
        self.engine = engine
        raw = path if path is not None else engine.config.persistence_path
        self.path = Path(raw) if raw else None
        self._lock = threading.RLock()
        self._segments: list[_Segment] = []
        self._on_disk: dict[int, str] = {}  # block hash -> segment file naming it
        self._generation = 0
        self._errors: list[str] = []
        self._stats = _Stats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._synced = False  # whether _segments mirrors the manifest on disk

    # -- reporting ----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters and last-run facts (merged into the engine's stats and /metrics)."""
        s = self._stats
        return {
            "persistence_path": str(self.path) if self.path else None,
            "persists": s.persists,
            "persist_failures": s.persist_failures,
            "persist_failures_by_reason": dict(s.failures_by_reason),
            "last_persist_ok": s.last_persist_ok,
            "last_persist_error": s.last_persist_error,
            "last_persist_unix": s.last_persist_unix,
            "last_persist_seconds": s.last_persist_seconds,
            "persisted_blocks": len(self._on_disk),
            "persisted_segments": len(self._segments),
            "persist_bytes_written": s.bytes_written,
            "blocks_loaded": s.blocks_loaded,
            "blocks_expected": s.blocks_expected,
            "warm_ratio": self.warm_ratio(),
            "last_load_seconds": s.last_load_seconds,
            "quarantined_segments": s.quarantined_segments,
        }

    def warm_ratio(self) -> float:
        """Blocks loaded at start / blocks the persisted cache named (1.0 when it named none): what a
        restarted replica got back; the operator's rolling update waits for it (contract.WARM_RATIO_KEY)."""
        s = self._stats
        return 1.0 if s.blocks_expected <= 0 else min(1.0, s.blocks_loaded / s.blocks_expected)

    def integrity_errors(self) -> list[str]:
        """Problems found on disk (quarantined segments, a refused manifest), newest last."""
        return list(self._errors)

    # -- persist ----------------------------------------------------------------------

    def persist(self) -> bool:
        """Write blocks not yet on disk and a new manifest. False (logged, counted) on failure."""
        if self.path is None:
            log.info("persist: no persistence_path configured; nothing to do")
            return False
        started = time.perf_counter()
        with self._lock:
            try:
                wrote = self._persist_locked()
            except OSError as exc:
                self._record_failure(exc)
                return False
            except Exception as exc:  # an engine or codec error must not kill the caller either
                log.exception("persist failed")
                self._record_failure(exc)
                return False
            s = self._stats
            s.persists += 1
            s.last_persist_ok = True
            s.last_persist_error = None
            s.last_persist_unix = time.time()
            s.last_persist_seconds = time.perf_counter() - started
            s.bytes_written += wrote
            return True

    def _record_failure(self, exc: BaseException) -> None:
        reason = _FAILURE_REASONS.get(
            getattr(exc, "errno", None) or -1, "io_error" if isinstance(exc, OSError) else "error"
        )
        detail = f"{reason}: {exc}"
        log.error("persist to %s failed: %s", self.path, detail)
        s = self._stats
        s.persist_failures += 1
        s.failures_by_reason[reason] = s.failures_by_reason.get(reason, 0) + 1
        s.last_persist_ok = False
        s.last_persist_error = detail

    def _persist_locked(self) -> int:
        assert self.path is not None
        self.path.mkdir(parents=True, exist_ok=True)
        if not self._synced:
            self._adopt_disk_state()
        current = [int(h) for h in self.engine.cached_hashes()]
        live = set(current)
        segments = [s for s in self._segments if s.blocks.keys() & live]
        for seg in segments:
            seg.blocks = {h: m for h, m in seg.blocks.items() if h in live}
        new = [h for h in current if h not in self._on_disk]
        if self._needs_compaction(segments):
            segments, new = [], current
        if (
            not new
            and len(segments) == len(self._segments)
            and sum(len(s.blocks) for s in segments) == len(self._on_disk)
        ):
            return 0  # nothing changed since the last manifest
        self._generation += 1
        written = 0
        for i, batch in enumerate(iter_batches(self._export(new))):
            name = f"seg-{self._generation:08d}-{i:04d}.safetensors"
            size, metas = write_segment_file(self.path / name, batch)
            written += size
            segments.append(_Segment(name, size, {m.hash: m for m in metas}))
        self._write_manifest(segments)
        self._segments = segments
        self._on_disk = {h: s.file for s in segments for h in s.blocks}
        self._remove_unreferenced()
        return written

    def _export(self, hashes: list[int]) -> Iterator[StoredBlock]:
        from kvcache_engine.core.hashing import BlockHash

        return self.engine.export_blocks([BlockHash(h) for h in hashes])

    def _needs_compaction(self, segments: list[_Segment]) -> bool:
        """Rewrite everything when more than half of the segment bytes on disk are dead and
        the dead bytes exceed one segment (amortises the rewrite)."""
        total = sum(s.size for s in segments)
        live = sum(m.nbytes for s in segments for m in s.blocks.values())
        return total - live > max(live, SEGMENT_BYTES)

    def _write_manifest(self, segments: list[_Segment]) -> None:
        assert self.path is not None
        cfg = self.engine.config
        write_manifest(self.path, geometry_of(cfg), cfg.codec, segments, self._generation)

    def _adopt_disk_state(self) -> None:
        """Learn what a valid manifest already names so a first persist stays incremental."""
        assert self.path is not None
        try:
            doc = read_manifest(self.path)
            if doc is not None:
                check_geometry(doc.get("geometry", {}), self.engine.config, str(self.path / MANIFEST))
                self._segments = _segments_of(doc)
                self._generation = int(doc.get("generation", 0))
        except (SegmentError, GeometryMismatchError) as exc:
            # Another geometry or garbage: keep it out of the way instead of overwriting it.
            log.warning("persist: %s; setting the old cache aside", exc)
            self.set_aside(str(exc))
            self._segments = []
        self._on_disk = {h: s.file for s in self._segments for h in s.blocks}
        self._synced = True

    def _remove_unreferenced(self) -> None:
        """Delete segment and temp files no manifest names (crash leftovers, dropped segments)."""
        assert self.path is not None
        keep = {s.file for s in self._segments}
        for entry in self.path.iterdir():
            stale_seg = entry.name.startswith("seg-") and entry.name not in keep
            stale_tmp = entry.name.startswith(".tmp-")
            if entry.is_file() and (stale_seg or stale_tmp):
                with contextlib.suppress(OSError):
                    entry.unlink()

    def set_aside(self, reason: str) -> Path | None:
        """Move the manifest and every segment into ``quarantine/set-aside-<time>/``."""
        assert self.path is not None
        if not self.path.is_dir():
            return None
        dest = self.path / QUARANTINE / f"set-aside-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        dest.mkdir(parents=True, exist_ok=True)
        for entry in self.path.iterdir():
            if entry.is_file() and (entry.name == MANIFEST or entry.name.startswith("seg-")):
                os.replace(entry, dest / entry.name)
        (dest / "REASON").write_text(reason + "\n")
        self._errors.append(f"persisted cache set aside to {dest}: {reason}")
        return dest

    # -- load ---------------------------------------------------------------------------------

    def load(self) -> int:
        """Load the persisted cache into the engine; returns blocks loaded.

        Corrupt/truncated segments are quarantined and the rest loads; a manifest that cannot be
        read (bit-rot) is set aside with every segment (quarantine/set-aside-*: nothing loaded,
        nothing deleted, the reason recorded); a geometry mismatch raises GeometryMismatchError
        naming the field (nothing is loaded or moved)."""
        if self.path is None or not self.path.is_dir():
            with self._lock:
                self._synced = self.path is not None
            return 0
        started = time.perf_counter()
        with self._lock:
            try:
                doc = read_manifest(self.path)
                if doc is not None:
                    _segments_of(doc)  # every entry readable, before anything is imported
            except SegmentError as exc:
                self._errors.append(str(exc))
                self._stats.quarantined_segments += 1
                log.error("persisted cache refused: %s", exc)
                self.set_aside(str(exc))  # the segments may be intact: kept for recovery, not deleted
                doc = None
            if doc is None:
                self._segments, self._on_disk, self._synced = [], {}, True
                self._remove_unreferenced()
                return 0
            check_geometry(doc.get("geometry", {}), self.engine.config, str(self.path / MANIFEST))
            self._generation = int(doc.get("generation", 0))
            segments = _segments_of(doc)
            self._stats.blocks_expected = sum(len(seg.blocks) for seg in segments)
            good, loaded = self._import_segments(self.path, segments, quarantine=True)
            self._segments = good
            self._on_disk = {h: s.file for s in good for h in s.blocks}
            self._synced = True
            if len(good) != len(segments):
                self._write_manifest(good)  # forget the quarantined segments durably
            self._remove_unreferenced()
            self._stats.blocks_loaded += loaded
            self._stats.last_load_seconds = time.perf_counter() - started
            log.info("loaded %d blocks from %s in %.2fs", loaded, self.path, self._stats.last_load_seconds)
            return loaded

    def _import_segments(
        self, directory: Path, segments: list[_Segment], *, quarantine: bool
    ) -> tuple[list[_Segment], int]:
        """Verify and import segments in manifest order, then retry blocks that arrived before
        their parent (possible after a re-put of an evicted parent). Returns (good, imported)."""
        good: list[_Segment] = []
        loaded = 0
        deferred: list[tuple[_Segment, set[int]]] = []
        for seg in segments:
            try:
                blocks = read_segment_file(directory / seg.file, seg.size, set(seg.blocks), verify=False)
                rejected = self._rejected()
                got = self.engine.import_blocks(blocks)  # verifies every checksum
                if self._rejected() > rejected:
                    raise SegmentError(
                        f"{seg.file}: {self._rejected() - rejected} block(s) fail their checksum"
                    )
            except SegmentError as exc:
                self._errors.append(str(exc))
                log.error("segment rejected: %s", exc)
                if quarantine:
                    self._stats.quarantined_segments += 1
                    self._quarantine(directory / seg.file, str(exc))
                continue
            good.append(seg)
            loaded += got
            if got < len(blocks):
                deferred.append((seg, {int(b.hash) for b in blocks}))
        if deferred:
            loaded += self._import_deferred(directory, deferred)
        return good, loaded

    def _rejected(self) -> int:
        """Blocks the engine refused on import so far (checksum, codec or geometry)."""
        return int(self.engine.get_stats().get("import_rejected", 0))

    def _import_deferred(self, directory: Path, deferred: list[tuple[_Segment, set[int]]]) -> int:
        loaded = 0
        for _ in range(len(deferred)):
            present = {int(h) for h in self.engine.cached_hashes()}
            progress = 0
            for seg, hashes in deferred:
                missing = hashes - present
                if missing:
                    progress += self.engine.import_blocks(
                        read_segment_file(directory / seg.file, seg.size, missing)
                    )
            loaded += progress
            if not progress:
                break
        return loaded

    def _quarantine(self, path: Path, reason: str) -> None:
        """Move a bad file into ``quarantine/`` with a note saying why."""
        if not path.exists():
            return
        qdir = path.parent / QUARANTINE
        try:
            qdir.mkdir(exist_ok=True)
            dest = qdir / f"{path.name}.{int(time.time() * 1000)}"
            os.replace(path, dest)
            dest.with_name(dest.name + ".reason").write_text(reason + "\n")
        except OSError as exc:
            log.error("cannot quarantine %s: %s", path, exc)

    # -- restore ---------------------------------------------------------------------------

    def restore_from_backup(self, path: str | os.PathLike[str]) -> int:
        """Import a backup (or another persisted cache) directory; returns blocks imported.

        Raises ValueError when ``path`` is not a backup, GeometryMismatchError on geometry; bad
        segments are skipped and reported (a backup is never modified)."""
        directory = Path(path)
        doc = read_manifest(directory)
        if doc is None:
            raise ValueError(f"restore: {directory} has no {MANIFEST} (not a kvcache backup)")
        check_geometry(doc.get("geometry", {}), self.engine.config, str(directory / MANIFEST))
        with self._lock:
            _, loaded = self._import_segments(directory, _segments_of(doc), quarantine=False)
        log.info("restored %d blocks from %s", loaded, directory)
        return loaded

    # -- periodic ---------------------------------------------------------------------------------

    def start_periodic(self) -> None:
        """Persist every ``config.persist_interval_s`` seconds in a daemon thread (0 disables
        rounds until the interval is reconfigured)."""
        if self._thread is not None or self.path is None:
            return
        self._thread = threading.Thread(target=self._periodic, name="kvcache-persist", daemon=True)
        self._thread.start()

    def _periodic(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.5):
            interval = float(self.engine.config.persist_interval_s)
            if interval > 0 and time.monotonic() - last >= interval:
                self.persist()
                last = time.monotonic()

    def stop(self) -> None:
        """Stop the periodic thread (a persist in progress completes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    close = stop  # engine.close() stops the persister through this name


def persister_for(engine: KVCacheEngine) -> Persister:
    """The engine's one persister (``engine._persister``), created on first use."""
    existing = getattr(engine, "_persister", None)
    if isinstance(existing, Persister):
        return existing
    made = Persister(engine)
    engine._persister = made
    return made


# --- offline validation ---------------------------------------------------------------------------


def validate_path(path: str | os.PathLike[str], config: KVCacheConfig | None = None) -> dict[str, Any]:
    """Check a persisted cache or backup directory offline: manifest, every segment's size,
    metadata and block checksums, parent links. ``config`` (optional) adds a geometry check."""
    directory = Path(path)
    report: dict[str, Any] = {
        "path": str(directory),
        "is_valid": False,
        "errors": [],
        "segments": 0,
        "blocks": 0,
        "bytes": 0,
    }
    errors: list[str] = report["errors"]
    try:
        doc = read_manifest(directory)
    except SegmentError as exc:
        errors.append(str(exc))
        return report
    if doc is None:
        errors.append(f"{directory}: no {MANIFEST} (not a kvcache cache or backup)")
        return report
    report["geometry"] = doc.get("geometry")
    report["codec"] = doc.get("codec")
    if config is not None:
        try:
            check_geometry(doc.get("geometry", {}), config, str(directory / MANIFEST))
        except GeometryMismatchError as exc:
            errors.append(str(exc))
    try:
        segments = _segments_of(doc)
    except SegmentError as exc:
        errors.append(str(exc))
        return report
    seen: set[int] = set()
    for seg in segments:
        try:
            blocks = read_segment_file(directory / seg.file, seg.size, set(seg.blocks))
        except SegmentError as exc:
            errors.append(str(exc))
            continue
        report["segments"] += 1
        report["bytes"] += seg.size
        for b in blocks:
            seen.add(int(b.hash))
        report["blocks"] += len(blocks)
    orphans = [
        m.hash for s in segments for m in s.blocks.values() if m.parent is not None and m.parent not in seen
    ]
    if orphans:
        report["orphan_blocks"] = len(orphans)  # parents evicted before the snapshot: not an error
    report["is_valid"] = not errors
    return report
