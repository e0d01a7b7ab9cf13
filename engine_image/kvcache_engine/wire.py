"""Wire formats shared by the server, the client, persistence and backups (torch-free).

Two binary formats, no pickle and no JSON tensors:

* **Frame** (data plane, ``application/x-kvcache-frame``)::

      b"KVC1" | u32 little-endian header length | UTF-8 JSON header | raw tensor bytes

  The header names the tensor's ``dtype`` and ``shape`` and ``nbytes`` (= the byte count that
  follows); the bytes are the tensor in C order. A put sends one, a get answers with one.

* **Stream** (snapshots, restores, drains, ``application/x-kvcache-stream``)::

      b"KVS1" | u32 header length | JSON header (format version, geometry, codec)
      then per segment: u64 little-endian length | safetensors bytes   (a "segment")
      then u64 0 | u32 trailer length | JSON trailer {"blocks": n, "segments": m}

  A segment is a safetensors file holding whole blocks: tensor ``"<hash:016x>.<key>"`` per
  payload key, metadata ``{"kvcache": JSON}`` listing each block's hash, parent, codec,
  checksum and payload keys. The same segments are the files of the persisted cache, so one
  decoder serves load, restore, backup validation and drain.

Shard placement lives in :mod:`kvcache_engine.contract.placement`.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FRAME_CONTENT_TYPE",
    "FRAME_MAGIC",
    "MAX_HASH",
    "STREAM_CONTENT_TYPE",
    "STREAM_MAGIC",
    "WIRE_FORMAT_VERSION",
    "WireError",
    "decode_frame_header",
    "decode_json_object",
    "encode_frame_header",
    "json_depth",
    "loads_bounded",
    "parse_hashes",
    "parse_tokens",
]

FRAME_MAGIC = b"KVC1"
STREAM_MAGIC = b"KVS1"
FRAME_CONTENT_TYPE = "application/x-kvcache-frame"
STREAM_CONTENT_TYPE = "application/x-kvcache-stream"
WIRE_FORMAT_VERSION = 2
"""2: every block's metadata carries ``identity``, a digest of (hash, parent, checksum), so a
corrupted identity is refused like a corrupted payload (docs/security.md)."""
READABLE_WIRE_FORMATS = (1, 2)
"""1 (before identity digests) is still read: payload checksums verified, identity unverifiable;
whatever is written from it is version 2 (the migration)."""
MAX_HASH = 2**64 - 1
# A frame or stream header is small JSON (hashes/tokens lists at most); bound it so a garbage
# length field can never make anyone allocate gigabytes.
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_JSON_DEPTH = 32
"""Deepest JSON nesting any request body, frame or stream header may have (ours nest <= 3)."""
_PREFIX = struct.Struct("<4sI")
PREFIX_BYTES = _PREFIX.size
SEGMENT_LEN = struct.Struct("<Q")
TRAILER_LEN = struct.Struct("<I")


class WireError(ValueError):
    """Malformed wire data; the message names the field and what was expected."""


def encode_frame_header(header: Mapping[str, Any]) -> bytes:
    """Magic + length + JSON header; the raw payload (``header["nbytes"]`` bytes) follows it."""
    body = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(FRAME_MAGIC, len(body)) + body


def decode_frame_prefix(prefix: bytes, magic: bytes = FRAME_MAGIC) -> int:
    """Header length from the 8-byte prefix; WireError on a wrong magic or a huge header."""
    if len(prefix) != PREFIX_BYTES:
        raise WireError(f"frame: truncated prefix ({len(prefix)} of {PREFIX_BYTES} bytes)")
    got, length = _PREFIX.unpack(prefix)
    if got != magic:
        raise WireError(f"frame: bad magic {got!r}, expected {magic!r}")
    if length > MAX_HEADER_BYTES:
        raise WireError(f"frame: header length {length} exceeds {MAX_HEADER_BYTES}")
    return int(length)


def json_depth(doc: Any) -> int:
    """The nesting depth of a parsed JSON value (a scalar is 0, ``[]`` is 1), iteratively."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((v, depth) for v in value if isinstance(v, (dict, list)))
    return deepest


def loads_bounded(
    raw: bytes | bytearray | memoryview | str, what: str, max_depth: int = MAX_JSON_DEPTH
) -> Any:
    """``json.loads`` for untrusted input: WireError (never RecursionError) naming ``what`` when
    it is not JSON or nests deeper than ``max_depth``. The depth is walked only when the text
    holds more brackets than ``max_depth`` (a bytes count: free for the usual flat bodies)."""
    text = bytes(raw) if isinstance(raw, memoryview) else raw  # json.loads takes bytearray as is
    opens = (
        text.count("[") + text.count("{") if isinstance(text, str) else text.count(b"[") + text.count(b"{")
    )
    try:
        doc = json.loads(text)
    except RecursionError:
        raise WireError(f"{what}: JSON nested deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"{what} is not valid JSON ({exc})") from None
    if opens > max_depth and json_depth(doc) > max_depth:
        raise WireError(f"{what}: JSON nested deeper than {max_depth} levels")
    return doc


def decode_json_object(
    raw: bytes | bytearray | memoryview, what: str, max_depth: int = MAX_JSON_DEPTH
) -> dict[str, Any]:
    """Parse ``raw`` as one JSON object; WireError naming ``what`` and the problem otherwise
    (not JSON, nested deeper than ``max_depth``, not an object)."""
    doc = loads_bounded(raw, what, max_depth)
    if not isinstance(doc, dict):
        raise WireError(f"{what} must be a JSON object, got {type(doc).__name__}")
    return doc


def decode_frame_header(raw: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Parse a JSON frame header (a JSON object), WireError naming the problem otherwise."""
    return decode_json_object(raw, "frame: header")


def split_frame(body: bytes | bytearray | memoryview) -> tuple[dict[str, Any], memoryview]:
    """(header, payload view) of a whole frame held in memory."""
    view = memoryview(body)
    length = decode_frame_prefix(bytes(view[:PREFIX_BYTES]))
    end = PREFIX_BYTES + length
    if len(view) < end:
        raise WireError(f"frame: truncated header ({len(view) - PREFIX_BYTES} of {length} bytes)")
    return decode_frame_header(view[PREFIX_BYTES:end]), view[end:]


def _int_list(value: Any, field: str, *, low: int, high: int, max_len: int) -> list[int]:
    if not isinstance(value, list):
        raise WireError(f"{field}: expected a list of integers, got {type(value).__name__}")
    if len(value) > max_len:
        raise WireError(f"{field}: {len(value)} entries exceed the limit of {max_len}")
    for i, item in enumerate(value):
        # bool is an int subclass; True as a token id is certainly a client bug.
        if type(item) is not int or not low <= item <= high:
            raise WireError(f"{field}[{i}]: expected an integer in [{low}, {high}], got {item!r}")
    return value


def parse_tokens(value: Any, *, max_len: int) -> list[int]:
    """Token ids: non-negative integers below 2**31."""
    return _int_list(value, "tokens", low=0, high=2**31 - 1, max_len=max_len)


def parse_hashes(value: Any, *, max_len: int) -> list[int]:
    """Block hashes: unsigned 64-bit integers (JSON numbers)."""
    return _int_list(value, "hashes", low=0, high=MAX_HASH, max_len=max_len)


# --- shard placement -------------------------------------------------------------------------


# --- segments (safetensors blobs of whole blocks) ------------------------------------------------


@dataclass(frozen=True)
class BlockMeta:
    """What a segment records about one block (the payload tensors are stored beside it)."""

    hash: int
    parent: int | None
    codec: str
    checksum: str
    keys: tuple[str, ...]
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "hash": f"{self.hash:016x}",
            "parent": None if self.parent is None else f"{self.parent:016x}",
            "codec": self.codec,
            "checksum": self.checksum,
            "identity": identity_digest(self.hash, self.parent, self.checksum),
            "keys": list(self.keys),
            "nbytes": self.nbytes,
        }

    @classmethod
    def from_json(cls, item: Any, version: int = WIRE_FORMAT_VERSION) -> BlockMeta:
        """A block's metadata; from version 2 on its ``identity`` digest must match (hash,
        parent, checksum): WireError naming the block otherwise."""
        meta = cls._from_json(item)
        got = item.get("identity")
        if got is None and version < 2:
            return meta  # format 1: no identity digest to check (migrated when written again)
        if got != identity_digest(meta.hash, meta.parent, meta.checksum):
            raise WireError(
                f"segment metadata: block {meta.hash:016x}: identity digest "
                f"{'missing' if got is None else 'mismatch'} (its hash, parent or checksum was altered)"
            )
        return meta

    @classmethod
    def _from_json(cls, item: Any) -> BlockMeta:
        if not isinstance(item, dict):
            raise WireError("segment metadata: each block must be an object")
        try:
            parent = item["parent"]
            keys = item["keys"]
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise WireError("segment metadata: keys must be a list of strings")
            return cls(
                hash=_hex64(item["hash"], "hash"),
                parent=None if parent is None else _hex64(parent, "parent"),
                codec=str(item["codec"]),
                checksum=str(item["checksum"]),
                keys=tuple(keys),
                nbytes=int(item["nbytes"]),
            )
        except KeyError as exc:
            raise WireError(f"segment metadata: block is missing {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise WireError(f"segment metadata: {exc}") from None


def identity_digest(block_hash: int, parent: int | None, checksum: str) -> str:
    """The digest binding a block's identity to its payload checksum (16 hex digits)."""
    text = f"{block_hash:016x}:{'-' if parent is None else format(parent, '016x')}:{checksum}"
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _hex64(value: Any, field: str) -> int:
    if not isinstance(value, str) or len(value) != 16:
        raise WireError(f"segment metadata: {field} must be 16 hex digits, got {value!r}")
    try:
        return int(value, 16)
    except ValueError:
        raise WireError(f"segment metadata: {field} must be 16 hex digits, got {value!r}") from None


def tensor_key(block_hash: int, key: str) -> str:
    """Name of one payload tensor of a block inside a segment."""
    return f"{block_hash:016x}.{key}"


def segment_metadata(blocks: Iterable[BlockMeta]) -> dict[str, str]:
    """The safetensors ``__metadata__`` of a segment."""
    doc = {"format_version": WIRE_FORMAT_VERSION, "blocks": [b.to_json() for b in blocks]}
    return {"kvcache": json.dumps(doc, separators=(",", ":"))}


def parse_segment_metadata(metadata: Mapping[str, str] | None) -> list[BlockMeta]:
    """Block list of a segment from its safetensors metadata (WireError when absent/garbled)."""
    if not metadata or "kvcache" not in metadata:
        raise WireError("segment: no kvcache metadata (not a kvcache segment)")
    doc = loads_bounded(metadata["kvcache"], "segment: metadata")
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or version not in READABLE_WIRE_FORMATS:
        raise WireError(f"segment: format_version {version!r}, expected one of {READABLE_WIRE_FORMATS}")
    blocks = doc.get("blocks")
    if not isinstance(blocks, list):
        raise WireError("segment: metadata has no block list")
    return [BlockMeta.from_json(b, version) for b in blocks]


def encode_stream_header(header: Mapping[str, Any]) -> bytes:
    """Opening of a stream (snapshot/restore/drain body)."""
    body = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(STREAM_MAGIC, len(body)) + body


def encode_stream_segment(segment: bytes) -> bytes:
    """Length prefix of one segment in a stream (the segment bytes follow it)."""
    if not segment:
        raise ValueError("a stream segment cannot be empty (length 0 ends the stream)")
    return SEGMENT_LEN.pack(len(segment))


def encode_stream_trailer(trailer: Mapping[str, Any]) -> bytes:
    """End of a stream: a zero length then the JSON trailer (counts to cross-check)."""
    body = json.dumps(trailer, separators=(",", ":")).encode()
    return SEGMENT_LEN.pack(0) + TRAILER_LEN.pack(len(body)) + body
