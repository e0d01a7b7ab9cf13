"""The ``<name>-connection`` ConfigMap as the real operator publishes it to the API emulator:
valid against the Kubernetes schemas, owned by its KVCache, updated when the spec changes, and
readable by ``KVCacheClient.from_connection`` when mounted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kopf
import kubernetes_validate
import pytest

from kvcache_engine.client import ClientGeometry, read_connection
from tests.operator.conftest import KVCACHES, NS, Cluster, make_kvcache, wait_for

K8S_VERSIONS = ("1.29", "1.35")


def _connection(cluster: Cluster, name: str) -> dict[str, Any] | None:
    found = cluster.emu.list("v1/configmaps", NS, label_selector=f"app.kubernetes.io/instance={name}")
    return next((cm for cm in found if cm["metadata"]["name"] == f"{name}-connection"), None)


def _info(cm: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if cm is None else json.loads(cm["data"]["connection.json"])


def _validate(cm: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(cm, version, strict=True)
        except kubernetes_validate.ValidationError as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"ConfigMap on {version}: {'.'.join(map(str, exc.path))}: {exc.message}")


async def test_connection_configmap_is_published_owned_and_follows_the_spec(
    cluster: Cluster, operator: kopf.Memo, tmp_path: Path
) -> None:
    emu = cluster.emu
    kvc = emu.create(KVCACHES, make_kvcache("conn", replicas=1))
    cm = await wait_for(lambda: _connection(cluster, "conn"), what="conn-connection")
    _validate(cm)
    owners = cm["metadata"]["ownerReferences"]
    assert [(o["kind"], o["name"], o["uid"], o.get("controller")) for o in owners] == [
        ("KVCache", "conn", kvc["metadata"]["uid"], True)
    ]
    info = _info(cm)
    assert info is not None
    assert info["formatVersion"] == 1
    assert (info["numLayers"], info["numKvHeads"], info["headDim"], info["blockTokens"]) == (2, 2, 16, 16)
    assert (info["codec"], info["routeDepth"], info["port"]) == ("none", 2, 8080)
    assert info["headlessService"] == f"conn-headless.{NS}.svc"
    assert info["tokenSecretName"] == "conn-token" and info["tokenSecretKey"] == "token"
    assert emu.get("v1/secrets", info["tokenSecretName"], NS)["data"][info["tokenSecretKey"]]
    # Every key is also its own file, holding the same value.
    assert {k: cm["data"][k] for k in info} == {k: str(v) for k, v in info.items()}

    # Geometry, codec and placement change in the spec -> the published contract follows.
    cache = {
        **make_kvcache("conn")["spec"]["cache"],
        "headDim": 32,
        "compressionCodec": "int8",
        "routeDepth": 3,
    }
    emu.patch(KVCACHES, "conn", {"spec": {"cache": cache}}, NS)
    updated = await wait_for(
        lambda: (
            (c := _connection(cluster, "conn")) is not None and (_info(c) or {}).get("headDim") == 32 and c
        ),
        what="conn-connection updated",
    )
    _validate(updated)
    info = _info(updated)
    assert info is not None and (info["codec"], info["routeDepth"]) == ("int8", 3)
    assert updated["metadata"]["uid"] == cm["metadata"]["uid"]  # patched in place, same owner
    assert updated["metadata"]["ownerReferences"] == owners

    # What a pod would mount is what the client reads (per-key files, no connection.json).
    mount = tmp_path / "mount"
    mount.mkdir()
    for key, value in updated["data"].items():
        if key != "connection.json":
            (mount / key).write_text(value)
    read = read_connection(mount)
    assert read == {k: v for k, v in info.items()}
    assert ClientGeometry("default", 16, 2, 2, 32, "float16", 3) == ClientGeometry(
        read["cacheNamespace"], read["blockTokens"], read["numLayers"], read["numKvHeads"],
        read["headDim"], read["dtype"], read["routeDepth"],
    )  # fmt: skip
