"""kvcache_engine.integrations.transformers: generate_with_cache, ClientKVStore, the connection file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvcache_engine.client import KVCacheClient
from kvcache_engine.contract import KVCacheConfig
from kvcache_engine.engine import KVCacheEngine
from kvcache_engine.inference import load_model
from kvcache_engine.integrations.transformers import ClientKVStore, generate_with_cache
from tests.inference.conftest import TINY_GEOMETRY, make_model_dir
from tests.inference.test_generator import reference_greedy

pytestmark = pytest.mark.model  # loads a transformers model

SYSTEM = "Shared instructions for every request of this test, long enough to span blocks. "


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_model(make_model_dir(tmp_path_factory.mktemp("models")))


def tiny_config(**overrides: Any) -> KVCacheConfig:
    fields: dict[str, Any] = {
        "num_layers": TINY_GEOMETRY.num_layers,
        "num_kv_heads": TINY_GEOMETRY.num_kv_heads,
        "head_dim": TINY_GEOMETRY.head_dim,
        "block_tokens": 4,
        "dtype": "float32",
        "device": "cpu",
        **overrides,
    }
    return KVCacheConfig(**fields)


def test_helper_and_process_request_share_entries_for_one_model(loaded: Any, tmp_path: Path) -> None:
    engine = KVCacheEngine(tiny_config(model_path=str(make_model_dir(tmp_path))))
    engine.process_request_sync({"text": SYSTEM + "first"})

    out = generate_with_cache(loaded.model, loaded.tokenizer, engine, SYSTEM + "second", max_new_tokens=5)

    ids = loaded.tokenizer(SYSTEM + "second")["input_ids"]
    assert out.cached_tokens == (1 + len(SYSTEM)) // 4 * 4
    assert out.output_ids == reference_greedy(loaded.model, ids, 5)
    assert out.text == loaded.tokenizer.decode(out.output_ids, skip_special_tokens=True)


def test_engine_down_means_no_reuse_not_a_failure(loaded: Any) -> None:
    store = ClientKVStore.connect(
        loaded.model, endpoints=["http://127.0.0.1:9"], engine_config=tiny_config(), timeout_s=0.05
    )
    with store:
        out = generate_with_cache(loaded.model, loaded.tokenizer, store, SYSTEM, max_new_tokens=3)
    ids = loaded.tokenizer(SYSTEM)["input_ids"]
    assert (out.cached_tokens, out.computed_tokens) == (0, len(ids))
    assert out.output_ids == reference_greedy(loaded.model, ids, 3)


def test_geometry_mismatch_is_refused_at_connect(loaded: Any) -> None:
    with pytest.raises(ValueError, match="head_dim: model has 16, cache has 128"):
        ClientKVStore.connect(
            loaded.model, endpoints=["http://127.0.0.1:9"], engine_config=tiny_config(head_dim=128)
        )


def test_a_bare_client_is_refused(loaded: Any) -> None:
    client = KVCacheClient(["http://127.0.0.1:9"], config=tiny_config())
    with pytest.raises(TypeError, match="cache: expected a ClientKVStore"):
        generate_with_cache(loaded.model, loaded.tokenizer, client, "hi")
    client.close()


def write_connection(directory: Path, **overrides: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    info = {
        "formatVersion": 1,
        "name": "tiny",
        "namespace": "inference",
        "url": "http://tiny.inference.svc:8080",
        "service": "tiny.inference.svc",
        "headlessService": "tiny-headless.inference.svc",
        "port": 8080,
        "tokenSecretName": "tiny-token",
        "tokenSecretKey": "token",
        "numLayers": TINY_GEOMETRY.num_layers,
        "numKvHeads": TINY_GEOMETRY.num_kv_heads,
        "headDim": TINY_GEOMETRY.head_dim,
        "blockTokens": 4,
        "dtype": "float32",
        "codec": "none",
        "cacheNamespace": "tiny-cache",
        **overrides,
    }
    (directory / "connection.json").write_text(json.dumps(info))
    return directory


def test_from_connection_binds_the_model_identity(
    loaded: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = tmp_path / "token"
    token.write_text("secret\n")
    directory = write_connection(tmp_path / "conn", headlessService="localhost")  # resolvable here
    with ClientKVStore.from_connection(
        loaded.model, directory, token_file=str(token), timeout_s=0.05
    ) as store:
        assert store.block_tokens == 4 and store.dtype == "float32"
        assert store.config.namespace == loaded.identity.namespace("tiny-cache")
    bad = write_connection(tmp_path / "v2", formatVersion=2)
    with pytest.raises(ValueError, match=r"formatVersion 2 in .* is not supported"):
        ClientKVStore.from_connection(loaded.model, bad)
    with pytest.raises(ValueError, match="num_kv_heads: model has 2, cache has 8"):
        ClientKVStore.from_connection(loaded.model, write_connection(tmp_path / "g", numKvHeads=8))
