"""``KVCacheClient.from_connection``: the operator's ``<name>-connection`` ConfigMap (rendered by
the operator's own builder) and token Secret, mounted the way kubelet mounts them, build a
working client; the docs' five-line example runs against a real ``kvcache-engine serve``."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kvcache_engine.client import AsyncKVCacheClient, CacheServerError, ClientGeometry, KVCacheClient
from kvcache_engine.contract import KVCacheConfig
from kvcache_operator import api
from kvcache_operator.resources import build_connection_configmap, engine_config
from tests.service.conftest import TOKEN, make_kv, make_tokens

DOCS = Path(__file__).resolve().parents[2] / "docs" / "integration.md"


def rendered_connection(port: int, **cache: Any) -> dict[str, str]:
    """The ``data`` of the operator's connection ConfigMap for a KVCache with the test geometry,
    its headless Service pointed at 127.0.0.1:``port`` (the only name that resolves here)."""
    spec = {"blockTokens": 4, "numLayers": 2, "numKvHeads": 2, "headDim": 8, "dtype": "float16", **cache}
    kvc = api.parse_kvcache(
        {
            "apiVersion": "kvcache.dev/v1alpha1",
            "kind": "KVCache",
            "metadata": {"name": "tiny", "namespace": "inference"},
            "spec": {"cache": spec},
        }
    )
    data: dict[str, str] = build_connection_configmap(kvc, engine_config(kvc))["data"]
    info = json.loads(data["connection.json"])
    info.update(headlessService="127.0.0.1", port=port)
    data.update({k: str(v) for k, v in info.items()}, **{"connection.json": json.dumps(info)})
    return data


def kubelet_mount(directory: Path, data: dict[str, str]) -> Path:
    """Files the way kubelet projects a ConfigMap/Secret volume: a timestamped directory holding
    the data, ``..data`` linking to it and one ``key -> ..data/key`` link per key."""
    stamp = directory / "..2026_11_27_05_00_00.000000001"
    stamp.mkdir(parents=True)
    for key, value in data.items():
        (stamp / key).write_text(value)
    (directory / "..data").symlink_to(stamp.name)
    for key in data:
        (directory / key).symlink_to(f"..data/{key}")
    return directory


def mount_both(tmp_path: Path, data: dict[str, str]) -> Path:
    """ConfigMap at ``<tmp>/kvcache-connection``, token Secret beside it (the sample's layout)."""
    kubelet_mount(tmp_path / "kvcache-connection-token", {"token": TOKEN + "\n"})
    return kubelet_mount(tmp_path / "kvcache-connection", data)


def expected_geometry(route_depth: int = 2) -> ClientGeometry:
    return ClientGeometry("default", 4, 2, 2, 8, "float16", route_depth)


@pytest.mark.parametrize("layout", ["connection.json", "key files"])
def test_from_connection_reads_a_kubelet_mount(
    live_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    monkeypatch.delenv("KVCACHE_TOKEN_FILE", raising=False)
    srv = live_server()
    data = rendered_connection(srv.port, routeDepth=3)
    if layout == "key files":
        del data["connection.json"]
    directory = mount_both(tmp_path, data)
    cfg = srv.engine.config
    with KVCacheClient.from_connection(directory, strict=True, timeout_s=5.0) as client:
        # Geometry and placement come from the ConfigMap: no /v1/config round trip is needed.
        assert client._core._geometry == expected_geometry(route_depth=3)
        assert client._core.endpoints() == [srv.url]
        tokens = make_tokens(12)
        assert client.put(tokens, make_kv(cfg, 12), wait=True) == 3  # the mounted token authorised it
        assert client.lookup(tokens) == 12


def test_token_file_env_wins_and_overrides_apply(live_server, tmp_path: Path, monkeypatch) -> None:
    srv = live_server()
    directory = mount_both(tmp_path, rendered_connection(srv.port))
    wrong = tmp_path / "other-token"
    wrong.write_text("not-the-token\n")
    monkeypatch.setenv("KVCACHE_TOKEN_FILE", str(wrong))
    with (
        KVCacheClient.from_connection(directory, strict=True, timeout_s=5.0) as client,
        pytest.raises(CacheServerError, match="401"),
    ):
        client.lookup(make_tokens(4))
    with KVCacheClient.from_connection(
        directory / "connection.json", token=TOKEN, endpoints=[srv.url], timeout_s=5.0, strict=True
    ) as client:
        assert client._core.timeout_s == 5.0 and client.lookup(make_tokens(4)) == 0


def test_from_connection_refuses_unknown_versions_and_incomplete_contracts(tmp_path: Path) -> None:
    data = rendered_connection(8080)
    info = json.loads(data["connection.json"])
    newer = kubelet_mount(tmp_path / "v2", {"connection.json": json.dumps({**info, "formatVersion": 2})})
    with pytest.raises(
        ValueError, match=r"formatVersion 2 in .* not supported by this client \(supported: 1\)"
    ):
        KVCacheClient.from_connection(newer)
    keys = {k: v for k, v in data.items() if k not in {"connection.json", "numLayers"}}
    with pytest.raises(ValueError, match=r"lacks the keys \['numLayers'\]"):
        KVCacheClient.from_connection(kubelet_mount(tmp_path / "partial", keys))
    with pytest.raises(ValueError, match="headDim: expected an integer"):
        KVCacheClient.from_connection(kubelet_mount(tmp_path / "bad", {**keys, "headDim": "eight"}))
    with pytest.raises(ValueError, match="cannot read"):
        KVCacheClient.from_connection(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="invalid geometry"):
        KVCacheClient.from_connection(
            kubelet_mount(tmp_path / "geo", {"connection.json": json.dumps({**info, "blockTokens": 0})})
        )


async def test_async_from_connection(live_server, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("KVCACHE_TOKEN_FILE", raising=False)
    srv = live_server()
    directory = mount_both(tmp_path, rendered_connection(srv.port))
    tokens = make_tokens(8, seed=3)
    async with AsyncKVCacheClient.from_connection(directory, strict=True, timeout_s=5.0) as client:
        assert client._core._geometry == expected_geometry()
        assert await client.put(tokens, make_kv(srv.engine.config, 8), wait=True) == 2
        assert await client.lookup(tokens) == 8


def five_line_example() -> str:
    """The first python block under "## Five lines" in docs/integration.md."""
    text = DOCS.read_text()
    section = text[text.index("## Five lines") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


def test_docs_five_line_example_runs_against_a_real_server(
    engine_process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KVCACHE_TOKEN_FILE", raising=False)
    engine = engine_process()
    directory = mount_both(tmp_path, rendered_connection(engine.port))
    code = five_line_example()
    assert code.count('"/etc/kvcache-connection"') == 1
    code = code.replace('"/etc/kvcache-connection"', repr(str(directory)))  # our mount point
    cfg = KVCacheConfig(block_tokens=4, num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
    token_ids = make_tokens(18, seed=5)  # 4 full blocks and a partial one
    prompt_kv = make_kv(cfg, 18, seed=5)
    runs: list[dict[str, Any]] = []
    for _ in range(2):
        scope: dict[str, Any] = {"token_ids": token_ids, "kv_of_the_prompt": prompt_kv}
        exec(compile(code, str(DOCS), "exec"), scope)  # the documented example itself
        client = scope["client"]
        assert client.flush(10.0)
        client.close()
        runs.append(scope)
    assert runs[0]["cached"] == 0 and runs[0]["kv"] is None
    assert runs[1]["cached"] == 16
    assert torch.equal(runs[1]["kv"], prompt_kv[:, :, :16])


def test_unresolvable_service_degrades_to_misses_within_the_deadline(caplog) -> None:
    cfg = KVCacheConfig(block_tokens=4, num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
    client = KVCacheClient(service="kvcache-nowhere.invalid:8080", config=cfg, timeout_s=0.05)
    assert client._core.endpoints() == []
    assert any("cannot resolve service" in r.getMessage() for r in caplog.records)
    tokens = make_tokens(8)
    worst = 0.0
    for _ in range(5):
        started = time.perf_counter()
        assert client.lookup(tokens) == 0
        assert client.get(tokens) is None
        worst = max(worst, time.perf_counter() - started)
    assert worst < 2 * 0.05 + 0.05  # two calls, each within its deadline plus a margin
    client.close()
