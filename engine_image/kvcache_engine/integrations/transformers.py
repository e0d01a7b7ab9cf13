"""Prefix reuse across processes and pods for Hugging Face causal LMs.

::

    store = ClientKVStore.connect(model, endpoints=["http://kvcache:8080"], token_file="/run/kvcache/token")
    out = generate_with_cache(model, tokenizer, store, "long shared prompt ...", max_new_tokens=64)
    out.text, out.cached_tokens, out.computed_tokens, out.ttft_ms

``generate_with_cache`` looks up the longest cached prefix of the prompt, loads its KV into the
model's ``DynamicCache``, prefills only the rest, decodes greedily and stores the new full
blocks. Keys include the model identity (name, revision, dtype): ``ClientKVStore`` builds its
``KVCacheClient`` with a hashing namespace of ``<engine namespace>|model=…|revision=…|dtype=…``,
so two models (or two revisions of one) never share entries on the same engine. A model whose
KV geometry differs from the engine's is refused at connect time with the field named.

The client's promises hold here: an engine that is down or slow makes ``fetch_prefix`` return
None within the client's deadline and the prompt is simply computed in full; stores are
fire-and-forget (``close()`` flushes them).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvcache_engine.contract import KVCacheConfig
from kvcache_engine.inference import (
    EngineKVStore,
    KVGeometry,
    KVStore,
    ModelIdentity,
    PrefixCachedGenerator,
    model_identity,
)

if TYPE_CHECKING:
    from kvcache_engine.client import KVCacheClient

__all__ = ["CachedGeneration", "ClientKVStore", "generate_with_cache"]

_GEOMETRY_FIELDS = ("num_layers", "num_kv_heads", "head_dim")


class ClientKVStore:
    """A ``KVStore`` over the engine service, bound to one model identity.

    Build it with :meth:`connect` (endpoints or a Service name) or :meth:`from_connection`
    (the operator's mounted ``<name>-connection`` ConfigMap). Geometry is checked once here.
    """

    def __init__(self, client: KVCacheClient, config: KVCacheConfig, identity: ModelIdentity) -> None:
        self.client = client
        self.config = config
        self.identity = identity

    @property
    def block_tokens(self) -> int:
        return self.config.block_tokens

    @property
    def geometry(self) -> KVGeometry:
        return KVGeometry.from_engine_config(self.config)

    @property
    def dtype(self) -> str:
        return self.config.dtype

    def fetch_prefix(self, tokens: Sequence[int]) -> torch.Tensor | None:
        # lookup first: it is what the engine counts as a request (hit rate), and it saves the
        # get's larger deadline when nothing is cached.
        if self.client.lookup(list(tokens)) == 0:
            return None
        return self.client.get(list(tokens))

    def store(self, tokens: Sequence[int], kv: torch.Tensor) -> int:
        return self.client.put(list(tokens), kv)

    def close(self) -> None:
        """Flush queued stores (briefly) and close connections."""
        self.client.close()

    def __enter__(self) -> ClientKVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def connect(
        cls,
        model: Any,
        *,
        endpoints: Sequence[str] | None = None,
        service: str | None = None,
        token: str | None = None,
        token_file: str | None = None,
        engine_config: KVCacheConfig | None = None,
        name: str | None = None,
        revision: str | None = None,
        **client_kwargs: Any,
    ) -> ClientKVStore:
        """Connect for ``model``. The engine's config (block size, dtype, namespace, geometry)
        is read from ``GET /v1/config`` unless ``engine_config`` is given. Raises ValueError
        naming the differing field when the model's KV geometry is not the engine's."""
        from kvcache_engine.client import KVCacheClient

        if token is None and token_file is not None:
            token = Path(token_file).read_text().strip() or None
        if engine_config is None:
            urls = list(endpoints) if endpoints is not None else [_service_url(str(service))]
            engine_config = _fetch_engine_config(urls, token)
        _require_geometry(model, engine_config)
        identity = model_identity(model, name=name, revision=revision)
        bound = engine_config.model_copy(update={"namespace": identity.namespace(engine_config.namespace)})
        client = KVCacheClient(
            endpoints, service=service, token=token, token_file=token_file, config=bound, **client_kwargs
        )
        return cls(client, bound, identity)

    @classmethod
    def from_connection(
        cls, model: Any, path: str | os.PathLike[str], *, token_file: str | None = None, **kwargs: Any
    ) -> ClientKVStore:
        """Connect from a mounted ``<name>-connection`` ConfigMap (a directory holding
        ``connection.json`` or one file per key, or the JSON file itself; see
        :func:`kvcache_engine.client.read_connection`). The token comes from ``token_file``, else
        :func:`kvcache_engine.client.connection_token_file` (``$KVCACHE_TOKEN_FILE`` or the
        Secret mounted beside the ConfigMap)."""
        from kvcache_engine.client import connection_config, connection_token_file, read_connection

        info = read_connection(path)
        token_file = token_file or connection_token_file(path, info)
        return cls.connect(
            model, service=info["headlessService"] + f":{info['port']}", token_file=token_file,
            engine_config=connection_config(info), **kwargs,
        )  # fmt: skip


def _service_url(service: str) -> str:
    from kvcache_engine.client import DEFAULT_PORT

    return f"http://{service}" if ":" in service else f"http://{service}:{DEFAULT_PORT}"


def _fetch_engine_config(urls: Sequence[str], token: str | None, timeout_s: float = 5.0) -> KVCacheConfig:
    """The first answering engine's ``GET /v1/config``. ValueError when none answers."""
    errors = []
    for url in urls:
        base = url if "//" in url else "http://" + url
        req = urllib.request.Request(base.rstrip("/") + "/v1/config")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return KVCacheConfig.model_validate(json.loads(resp.read()))
        except (OSError, ValueError) as exc:
            errors.append(f"{url}: {exc}")
    raise ValueError("engine config: no engine answered GET /v1/config (" + "; ".join(errors) + ")")


def _require_geometry(model: Any, config: KVCacheConfig) -> None:
    KVGeometry.from_model_config(model.config).require_match(KVGeometry.from_engine_config(config))


@dataclass
class CachedGeneration:
    """What ``generate_with_cache`` returns."""

    text: str
    output_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    computed_tokens: int
    stored_blocks: int
    ttft_ms: float
    latency_ms: float


def generate_with_cache(
    model: Any,
    tokenizer: Any,
    cache: KVStore | Any,
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
) -> CachedGeneration:
    """Greedy generation reusing the longest cached prefix of ``prompt``.

    ``cache`` is a :class:`ClientKVStore` (remote engine), any ``KVStore``, or an in-process
    ``KVCacheEngine`` (bound to this model's identity here). A bare ``KVCacheClient`` is
    refused: it hashes under the engine's namespace only, so two models would share keys.
    """
    from kvcache_engine.engine import KVCacheEngine

    if isinstance(cache, KVCacheEngine):
        cache = EngineKVStore(cache, model_identity(model))
    if not isinstance(cache, KVStore):
        raise TypeError(
            f"cache: expected a ClientKVStore (ClientKVStore.connect / from_connection), a KVStore or a "
            f"KVCacheEngine, got {type(cache).__name__}"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected a non-negative int, got {max_new_tokens!r}")
    ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else [int(t) for t in prompt]
    eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    result = PrefixCachedGenerator(model, cache).generate(ids, max_new_tokens, eos)
    return CachedGeneration(
        text=tokenizer.decode(result.output_ids, skip_special_tokens=True),
        output_ids=result.output_ids,
        prompt_tokens=len(ids),
        cached_tokens=result.cached_tokens,
        computed_tokens=result.computed_tokens,
        stored_blocks=result.stored_blocks,
        ttft_ms=result.ttft_ms,
        latency_ms=result.latency_ms,
    )
