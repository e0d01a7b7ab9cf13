"""Block identity under the checksum (issue 16 finding 9): segment format 2 binds each block's
(hash, parent) to its payload checksum, so a stream or file whose identity was altered is
refused like a corrupted payload; format 1 segments (written before) are still read."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from kvcache_engine.engine import KVCacheEngine
from kvcache_engine.persistence import SegmentError, decode_segment, encode_segment
from kvcache_engine.wire import encode_stream_header, encode_stream_segment, encode_stream_trailer
from tests.service.conftest import TOKEN, http, make_config, make_kv, make_tokens


def _segment() -> tuple[bytes, KVCacheEngine]:
    cfg = make_config()
    engine = KVCacheEngine(cfg, load_on_start=False)
    engine.put(make_tokens(12), make_kv(cfg, 12))
    data, metas = encode_segment(engine.export_blocks(engine.cached_hashes()))
    assert len(metas) == 3 and metas[1].parent == metas[0].hash
    return data, engine


def _edit_metadata(data: bytes, edit: object) -> bytes:
    """Rewrite the segment's kvcache metadata with ``edit(doc)`` (the safetensors header re-sized)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    doc = json.loads(header["__metadata__"]["kvcache"])
    edit(doc)  # type: ignore[operator]
    header["__metadata__"]["kvcache"] = json.dumps(doc, separators=(",", ":"))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def _swap_parent(doc: dict) -> None:  # type: ignore[type-arg]
    doc["blocks"][2]["parent"] = doc["blocks"][0]["hash"]  # block 2 now claims block 0 as parent


def test_format_2_refuses_an_altered_parent() -> None:
    data, engine = _segment()
    try:
        assert len(decode_segment(data)) == 3
        with pytest.raises(SegmentError, match="identity digest mismatch"):
            decode_segment(_edit_metadata(data, _swap_parent))
    finally:
        engine.close()


def test_format_2_refuses_a_block_without_its_identity_digest() -> None:
    data, engine = _segment()
    try:
        with pytest.raises(SegmentError, match="identity digest missing"):
            decode_segment(_edit_metadata(data, lambda d: d["blocks"][1].pop("identity")))
    finally:
        engine.close()


def test_format_1_segments_are_still_read_and_written_back_as_format_2() -> None:
    data, engine = _segment()
    try:

        def as_v1(doc: dict) -> None:  # type: ignore[type-arg]
            doc["format_version"] = 1
            for b in doc["blocks"]:
                b.pop("identity")

        old = _edit_metadata(data, as_v1)
        blocks = decode_segment(old)
        assert [int(b.hash) for b in blocks] == [int(h) for h in engine.cached_hashes()]
        again, _ = encode_segment(blocks)
        n = int.from_bytes(again[:8], "little")
        doc = json.loads(json.loads(again[8 : 8 + n])["__metadata__"]["kvcache"])
        assert doc["format_version"] == 2 and all(len(b["identity"]) == 16 for b in doc["blocks"])
    finally:
        engine.close()


def test_a_restore_stream_with_an_altered_identity_imports_nothing(live_server: Any) -> None:
    data, engine = _segment()
    engine.close()
    srv = live_server()
    cfg = srv.engine.config
    geometry = {
        k: getattr(cfg, k) for k in ("block_tokens", "num_layers", "num_kv_heads", "head_dim", "dtype")
    }
    bad = _edit_metadata(data, _swap_parent)
    body = (
        encode_stream_header({"format_version": 2, "geometry": {**geometry, "namespace": cfg.namespace}})
        + encode_stream_segment(bad) + bad + encode_stream_trailer({"blocks": 3, "segments": 1})
    )  # fmt: skip
    status, raw = http("POST", srv.url + "/admin/restore", body, TOKEN)
    assert status == 400, raw[:300]
    assert b"identity" in raw
    assert srv.engine.get_stats()["cached_blocks"] == 0


def test_a_cache_persisted_in_format_1_loads_and_is_persisted_again_in_format_2(tmp_path: Path) -> None:
    """The migration of existing snapshots: a manifest and segments written before identity
    digests (wire_format_version 1, no ``identity``) load; the next persist writes format 2."""
    from kvcache_engine.persistence import persister_for

    cfg = make_config(persistence_path=str(tmp_path))
    src = KVCacheEngine(cfg, load_on_start=False)
    src.put(make_tokens(16), make_kv(cfg, 16))
    assert persister_for(src).persist()
    src.close()
    manifest = tmp_path / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["wire_format_version"] = 1
    for seg in doc["segments"]:
        for b in seg["blocks"]:
            b.pop("identity")
        path = tmp_path / seg["file"]

        def as_v1(d: dict) -> None:  # type: ignore[type-arg]
            d["format_version"] = 1
            for b in d["blocks"]:
                b.pop("identity")

        path.write_bytes(_edit_metadata(path.read_bytes(), as_v1))
        seg["size"] = path.stat().st_size
    manifest.write_text(json.dumps(doc))
    dst = KVCacheEngine(cfg, load_on_start=False)
    persister = persister_for(dst)
    try:
        persister.load()
        assert dst.get_stats()["cached_blocks"] == 4
        dst.put(make_tokens(8, seed=7), make_kv(cfg, 8, seed=7))
        assert persister.persist()
        again = json.loads(manifest.read_text())
        assert again["wire_format_version"] == 2
        assert all("identity" in b for s in again["segments"] for b in s["blocks"])
    finally:
        persister.stop()
        dst.close()
