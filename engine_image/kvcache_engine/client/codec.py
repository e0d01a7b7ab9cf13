"""The client's HTTP/1.1 codec, sans I/O: request heads, response heads and bodies, and the
KV frames of puts (encoded) and gets (validated, and given the tensor their payload lands in).

Invariant: anything the server answers that is not a well-formed response of the expected
shape raises :class:`CacheProtocolError` (never another exception type, never a wrong tensor).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from kvcache_engine.client.buffers import RecvPool, byte_view, reusable, torch_dtype
from kvcache_engine.client.connection import ClientGeometry
from kvcache_engine.client.errors import CacheProtocolError
from kvcache_engine.wire import PREFIX_BYTES, encode_frame_header

if TYPE_CHECKING:
    import torch

__all__ = [
    "CONFIG_REQ",
    "MAX_ANSWER_BYTES",
    "MAX_FRAME_HEADER_BYTES",
    "MAX_HEAD_BYTES",
    "RECV_CHUNK",
    "Head",
    "Req",
    "check_answer_length",
    "check_frame_header_length",
    "error_message",
    "field_parser",
    "get_tensor_for",
    "hashes_body",
    "json_body",
    "parse_head",
    "put_frame",
    "request_head",
    "split_endpoint",
    "tokens_list",
]

MAX_HEAD_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 1024 * 1024
"""Largest JSON answer or error body a client reads (the engine's are a few hundred bytes): a
server declaring more is refused before anything is allocated."""
MAX_FRAME_HEADER_BYTES = 64 * 1024
"""Largest get frame header (dtype, shape, nbytes: under 200 bytes from the engine)."""
RECV_CHUNK = 4 * 1024 * 1024


@dataclass
class Head:
    status: int
    headers: dict[str, str]
    content_length: int
    keep_alive: bool


def parse_head(raw: bytes) -> Head:
    """Status line and headers of an HTTP/1.1 response (CacheProtocolError on garbage)."""
    try:
        text = raw.decode("latin-1")
        lines = text.split("\r\n")
        version, status, *_ = lines[0].split(" ", 2)
        if not version.startswith("HTTP/1."):
            raise ValueError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        code = int(status)
    except ValueError as exc:
        raise CacheProtocolError(f"malformed response head: {exc}") from None
    if "chunked" in headers.get("transfer-encoding", "").lower() or "content-length" not in headers:
        raise CacheProtocolError("response without Content-Length (the engine always sends one)")
    try:
        length = int(headers["content-length"])
    except ValueError:
        raise CacheProtocolError(f"bad Content-Length {headers['content-length']!r}") from None
    if length < 0:
        raise CacheProtocolError(f"bad Content-Length {length}")
    keep = headers.get("connection", "").lower() != "close"
    return Head(code, headers, length, keep)


@dataclass
class Req:
    """One HTTP request: method, path, content type and body parts (sent without joining)."""

    method: str
    path: str
    ctype: str = ""
    parts: list[bytes | memoryview] = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(memoryview(p).nbytes for p in self.parts)


def check_answer_length(head: Head, limit: int = MAX_ANSWER_BYTES) -> int:
    """The Content-Length of a JSON or error answer; CacheProtocolError when it is over ``limit``."""
    if head.content_length > limit:
        raise CacheProtocolError(
            f"response of {head.content_length} bytes (HTTP {head.status}) exceeds the client's "
            f"limit of {limit}"
        )
    return head.content_length


def check_frame_header_length(head: Head, header_len: int) -> int:
    """A get frame's header length, checked against the answer and MAX_FRAME_HEADER_BYTES."""
    if header_len > MAX_FRAME_HEADER_BYTES or PREFIX_BYTES + header_len > head.content_length:
        raise CacheProtocolError(
            f"get: frame header of {header_len} bytes in a {head.content_length}-byte answer "
            f"(at most {MAX_FRAME_HEADER_BYTES})"
        )
    return header_len


def request_head(req: Req, host: str, token: str | None, length: int) -> bytes:
    lines = [
        f"{req.method} {req.path} HTTP/1.1",
        f"Host: {host}",
        f"Content-Length: {length}",
        "Connection: keep-alive",
    ]
    if length:
        lines.append(f"Content-Type: {req.ctype}")
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def error_message(body: bytes) -> str:
    try:
        doc = json.loads(body)
        return str(doc.get("error", doc)) if isinstance(doc, dict) else str(doc)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return body[:200].decode("utf-8", "replace")


def json_body(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CacheProtocolError("response body is not JSON") from None
    if not isinstance(doc, dict):
        raise CacheProtocolError("response body is not a JSON object")
    return doc


def _int_field(doc: dict[str, Any], name: str, *, high: int) -> int:
    value = doc.get(name)
    if type(value) is not int or not 0 <= value <= high:
        raise CacheProtocolError(
            f"response field {name!r}: expected an integer in [0, {high}], got {value!r}"
        )
    return value


def field_parser(name: str, high: int) -> Callable[[bytes], int]:
    """Parser of a JSON answer's integer field (run inside the breaker's scope: an endpoint that
    answers well-formed HTTP with a garbage body counts as failing)."""
    return lambda raw: _int_field(json_body(raw), name, high=high)


def split_endpoint(endpoint: str) -> tuple[str, int]:
    text = endpoint if "//" in endpoint else "http://" + endpoint
    parts = urlsplit(text)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"endpoint {endpoint!r}: expected http://host:port (plain HTTP)")
    return parts.hostname, parts.port or 80


def tokens_list(tokens: Any) -> list[int]:
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    return [int(t) for t in tokens] if not isinstance(tokens, list) else tokens


def hashes_body(hashes: list[int], **extra: Any) -> bytes:
    """A lookup/get body: the chain, plus ``extra`` keys whose value is not None."""
    doc: dict[str, Any] = {"hashes": hashes}
    doc.update((k, v) for k, v in extra.items() if v is not None)
    return json.dumps(doc, separators=(",", ":")).encode()


CONFIG_REQ = Req("GET", "/v1/config")


# --- KV frames -----------------------------------------------------------------------------------


def put_frame(geometry: ClientGeometry, hashes: list[int], kv: torch.Tensor) -> tuple[bytes, memoryview]:
    """Frame header and payload view for a put of the full blocks of ``kv``."""
    import torch

    if not isinstance(kv, torch.Tensor) or kv.dim() != 5:
        raise ValueError("kv: expected a 5-D tensor [2, num_layers, n_tokens, num_kv_heads, head_dim]")
    n = len(hashes) * geometry.block_tokens
    want = (2, geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    got = (kv.shape[0], kv.shape[1], kv.shape[3], kv.shape[4])
    if got != want or kv.shape[2] < n:
        raise ValueError(
            f"kv: shape {tuple(kv.shape)} does not match the engine geometry "
            f"[2, {geometry.num_layers}, >={n}, {geometry.num_kv_heads}, {geometry.head_dim}]"
        )
    kv = kv.detach()[:, :, :n].to(device="cpu", dtype=torch_dtype(geometry.dtype)).contiguous()
    payload = byte_view(kv)
    header = {
        "hashes": hashes,
        "dtype": geometry.dtype,
        "shape": list(kv.shape),
        "nbytes": payload.nbytes,
    }
    return encode_frame_header(header), payload


def get_tensor_for(
    geometry: ClientGeometry,
    header: dict[str, Any],
    asked_blocks: int,
    body_len: int,
    out: torch.Tensor | None,
    *,
    recv_pool: RecvPool,
) -> torch.Tensor:
    """Validate a get response header; the tensor its payload lands in (a view of the front
    of ``out`` when given and large enough, else one from ``recv_pool``)."""
    shape = header.get("shape")
    n_max = asked_blocks * geometry.block_tokens
    if header.get("dtype") != geometry.dtype or not isinstance(shape, list) or len(shape) != 5:
        raise CacheProtocolError(f"get: unexpected tensor header {header!r}")
    if (
        any(type(x) is not int for x in shape)
        or shape[2] % geometry.block_tokens
        or not 0 <= shape[2] <= n_max
    ):
        raise CacheProtocolError(f"get: unexpected tensor shape {shape!r}")
    want = [2, geometry.num_layers, shape[2], geometry.num_kv_heads, geometry.head_dim]
    if shape != want:
        raise CacheProtocolError(f"get: tensor shape {shape} does not match the geometry {want}")
    nbytes = shape[2] * geometry.block_bytes() // geometry.block_tokens
    if header.get("nbytes") != nbytes or body_len != nbytes:
        raise CacheProtocolError(
            f"get: payload is {body_len} bytes, header says {header.get('nbytes')}, expected {nbytes}"
        )
    dtype = torch_dtype(geometry.dtype)
    if out is not None and reusable(out, dtype, math.prod(want)):
        return out.view(-1)[: math.prod(want)].view(want)
    return recv_pool.tensor(want, dtype)
