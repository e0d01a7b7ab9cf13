"""The pieces of the local API server that kubectl talks to, without a cluster: SPDY framing,
strategic merge patch, Table printing, OpenAPI documents and strict decoding."""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import struct
import zlib
from typing import Any

import pytest
import yaml
from e2e.localcluster import smp, spdy, tables
from e2e.localcluster.discovery import Catalog
from e2e.localcluster.openapi import BuiltinSchemas, OpenAPI, definition_name, to_openapi

from tests.e2e_fast.kubectl import REPO

# ------------------------------------------------------------------------------------------ SPDY


def test_the_header_dictionary_is_the_spdy3_one() -> None:
    assert len(spdy.DICTIONARY) == 1423
    assert zlib.adler32(spdy.DICTIONARY) == 0xE3C6A7C2  # the checksum a zlib FDICT header carries


def client_syn_stream(deflate: Any, stream_id: int, headers: dict[str, str], fin: bool = False) -> bytes:
    """What a Go client (moby/spdystream) sends: SYN_STREAM with a zlib block primed with the dictionary."""
    block = deflate.compress(spdy.encode_headers(headers)) + deflate.flush(zlib.Z_SYNC_FLUSH)
    payload = struct.pack(">IIBB", stream_id, 0, 0, 0) + block
    return spdy.control_frame(spdy.SYN_STREAM, spdy.FLAG_FIN if fin else 0, payload)


def parse_frames(data: bytes) -> list[tuple[bool, int, int, bytes]]:
    """(control, type or stream id, flags, payload) of each frame in ``data``."""
    out = []
    while data:
        first, second = struct.unpack_from(">II", data)
        length = second & 0xFFFFFF
        control = bool(first & 0x80000000)
        out.append((control, first & 0xFFFF if control else first, second >> 24, data[8 : 8 + length]))
        data = data[8 + length :]
    return out


async def test_spdy_session_replies_echoes_pings_and_splits_streams() -> None:
    sent: list[bytes] = []
    opened: list[spdy.Stream] = []

    async def send(frame: bytes) -> None:
        sent.append(frame)

    async def on_stream(stream: spdy.Stream) -> None:
        opened.append(stream)

    session = spdy.Session(send, on_stream)
    deflate = zlib.compressobj(zdict=spdy.DICTIONARY)
    wire = (
        client_syn_stream(deflate, 1, {"streamtype": "error", "port": "8080", "requestid": "0"})
        + client_syn_stream(deflate, 3, {"streamtype": "data", "port": "8080", "requestid": "0"})
        + spdy.data_frame(3, b"GET / HTTP/1.1\r\n\r\n")
        + spdy.data_frame(3, b"", spdy.FLAG_FIN)
        + spdy.control_frame(spdy.PING, 0, struct.pack(">I", 7))
    )
    for i in range(0, len(wire), 5):  # frames split anywhere, as WebSocket messages may split them
        await session.feed(wire[i : i + 5])
    assert [s.headers["streamtype"] for s in opened] == ["error", "data"]
    assert opened[1].headers == {"streamtype": "data", "port": "8080", "requestid": "0"}
    assert await opened[1].received.get() == b"GET / HTTP/1.1\r\n\r\n"
    assert await opened[1].received.get() is None and opened[1].remote_closed
    frames = parse_frames(b"".join(sent))
    assert [(c, t) for c, t, _, _ in frames] == [
        (True, spdy.SYN_REPLY),
        (True, spdy.SYN_REPLY),
        (True, spdy.PING),
    ]
    inflate = zlib.decompressobj(zdict=spdy.DICTIONARY)  # our replies decode as the client decodes them
    for _, _, _, payload in frames[:2]:
        assert spdy.decode_headers(inflate.decompress(payload[4:])) == {}
    assert struct.unpack(">I", frames[2][3]) == (7,)
    sent.clear()
    await opened[1].write(b"x" * (spdy.MAX_DATA + 1))
    await opened[1].close()
    data = parse_frames(b"".join(sent))
    assert [(c, sid, flags, len(p)) for c, sid, flags, p in data] == [
        (False, 3, 0, spdy.MAX_DATA),
        (False, 3, 0, 1),
        (False, 3, spdy.FLAG_FIN, 0),
    ]
    await session.feed(spdy.control_frame(spdy.RST_STREAM, 0, struct.pack(">II", 1, 5)))
    assert opened[0].reset and await opened[0].received.get() is None


async def test_spdy_rejects_another_version() -> None:
    session = spdy.Session(lambda _: asyncio.sleep(0), lambda _: asyncio.sleep(0))
    with pytest.raises(spdy.ProtocolError):
        await session.feed(struct.pack(">HHI", 0x8000 | 2, spdy.PING, 4) + b"\0\0\0\1")


# ------------------------------------------------------------------------------------------ SMP

STS = definition_name("apps", "v1", "StatefulSet")


def container(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "image": "img", **fields}


def test_strategic_merge_merges_containers_by_name_and_ports_by_container_port() -> None:
    live = {"spec": {"template": {"spec": {"containers": [
        container("a", ports=[{"containerPort": 80, "name": "http"}]), container("b")]}}}}  # fmt: skip
    patch = {"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "b"}, {"name": "a"}],
        "containers": [{"name": "a", "image": "new", "ports": [{"containerPort": 90, "name": "m"}]}],
    }}}}  # fmt: skip
    merged = smp.apply(live, patch, STS)
    a, b = (
        merged["spec"]["template"]["spec"]["containers"][1],
        merged["spec"]["template"]["spec"]["containers"][0],
    )
    assert (b["name"], a["name"], a["image"]) == ("b", "a", "new")
    assert a["ports"] == [{"containerPort": 80, "name": "http"}, {"containerPort": 90, "name": "m"}]
    assert live["spec"]["template"]["spec"]["containers"][0]["image"] == "img"  # the input is untouched


def test_strategic_merge_directives_delete_replace_and_null() -> None:
    pod_spec = {"containers": [container("a"), container("b")], "volumes": [{"name": "v", "emptyDir": {}}]}
    live = {"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"template": {"spec": pod_spec}}}
    patch = {
        "metadata": {"labels": {"a": None, "c": "3"}},
        "spec": {"template": {"spec": {
            "containers": [{"name": "b", "$patch": "delete"}],
            "volumes": [{"name": "w", "emptyDir": {}}, {"$patch": "replace"}],
        }}},
    }  # fmt: skip
    merged = smp.apply(live, patch, STS)
    assert merged["metadata"]["labels"] == {"b": "2", "c": "3"}
    assert [c["name"] for c in merged["spec"]["template"]["spec"]["containers"]] == ["a"]
    assert merged["spec"]["template"]["spec"]["volumes"] == [{"name": "w", "emptyDir": {}}]


def test_strategic_merge_replaces_lists_without_a_merge_strategy() -> None:
    live = {"spec": {"template": {"spec": {"containers": [container("a", args=["1", "2"])]}}}}
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "a", "args": ["3"]}]}}}}
    assert smp.apply(live, patch, STS)["spec"]["template"]["spec"]["containers"][0]["args"] == ["3"]


# ------------------------------------------------------------------------------------------ tables


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(5, "5s"), (119, "119s"), (125, "2m5s"), (600, "10m"), (3 * 3600 + 60, "3h1m"), (30 * 3600, "30h"),
     (3 * 86400 + 7200, "3d2h"), (40 * 86400, "40d"), (-5, "<invalid>")],
)  # fmt: skip
def test_ages_read_like_kubectls(seconds: int, text: str) -> None:
    assert tables.human_duration(seconds) == text


def test_printer_column_json_paths() -> None:
    obj = {"status": {"conditions": [{"type": "Ready"}], "a.b": 1}, "spec": {"x": 0}}
    assert tables.json_path(obj, ".status.conditions[0].type") == "Ready"
    assert tables.json_path(obj, ".status['a.b']") == 1
    assert tables.json_path(obj, ".spec.x") == 0 and tables.json_path(obj, ".spec.missing.deeper") is None


def catalog_with_crd() -> tuple[Catalog, dict[str, Any]]:
    crd = next(d for d in yaml.safe_load_all((REPO / "crds" / "kvcache.dev_kvcaches.yaml").read_text()) if d)
    catalog = Catalog()
    catalog.add_builtin("", "v1", "pods", "Pod", True, ("status",))
    catalog.add_builtin("apps", "v1", "statefulsets", "StatefulSet", True, ("status", "scale"))
    catalog.add_crd(crd)
    return catalog, crd


def test_pod_rows_say_what_kubectl_says() -> None:
    catalog, _ = catalog_with_crd()
    pods = catalog.get("", "v1", "pods")
    assert pods is not None
    now = datetime.datetime.now(tz=datetime.UTC)
    finished = (now - datetime.timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    pod = {
        "metadata": {"name": "p", "creationTimestamp": finished},
        "spec": {"containers": [{"name": "a"}, {"name": "b"}]},
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.9",
            "containerStatuses": [
                {"name": "a", "ready": True, "restartCount": 0, "state": {"running": {}}},
                {"name": "b", "ready": False, "restartCount": 2,
                 "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                 "lastState": {"terminated": {"finishedAt": finished}}},
            ],
        },
    }  # fmt: skip
    table = tables.table(pods, [pod])
    assert [c["name"] for c in table["columnDefinitions"] if c["priority"] == 0] == [
        "Name", "Ready", "Status", "Restarts", "Age"]  # fmt: skip
    cells = table["rows"][0]["cells"]
    assert cells[:3] == ["p", "1/2", "CrashLoopBackOff"] and re.fullmatch(r"2 \(3[0-2]s ago\)", cells[3])
    assert cells[5] == "127.0.0.9"
    assert table["rows"][0]["object"]["metadata"]["name"] == "p"


def test_custom_resources_print_their_crd_columns() -> None:
    catalog, crd = catalog_with_crd()
    resource = catalog.get("kvcache.dev", "v1alpha1", "kvcaches")
    assert resource is not None and resource.names.short_names == ("kvc",)
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    obj = {
        "metadata": {"name": "demo", "creationTimestamp": "2020-01-01T00:00:00Z"},
        "status": {"phase": "Ready"},
    }
    table = tables.table(resource, [obj])
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name"] + [c["name"] for c in columns]
    row = dict(zip([c["name"] for c in table["columnDefinitions"]], table["rows"][0]["cells"], strict=True))
    assert row["Name"] == "demo" and row["Age"].endswith(("y", "d"))
    assert all(
        row[c["name"]] == ("Ready" if c["jsonPath"] == ".status.phase" else None) for c in columns[:-1]
    )
    assert tables.wants_table("application/json;as=Table;v=v1;g=meta.k8s.io,application/json")
    assert not tables.wants_table("application/json")


# ------------------------------------------------------------------------------------------ OpenAPI


def test_openapi_v3_offers_field_validation_where_kubectl_looks_for_it() -> None:
    catalog, _ = catalog_with_crd()
    crd_schema = {catalog.get("kvcache.dev", "v1alpha1", "kvcaches").key: {"type": "object"}}  # type: ignore[union-attr]
    openapi = OpenAPI(catalog, crd_schema)
    index = json.loads(openapi.v3_index())["paths"]
    assert set(index) == {"api/v1", "apis/apps/v1", "apis/kvcache.dev/v1alpha1"}
    assert index["apis/kvcache.dev/v1alpha1"]["serverRelativeURL"].startswith(
        "/openapi/v3/apis/kvcache.dev/v1alpha1?hash="
    )
    doc = json.loads(openapi.v3("kvcache.dev", "v1alpha1") or b"{}")
    patch = doc["paths"]["/apis/kvcache.dev/v1alpha1/namespaces/{namespace}/kvcaches/{name}"]["patch"]
    assert patch["x-kubernetes-group-version-kind"] == {
        "group": "kvcache.dev",
        "version": "v1alpha1",
        "kind": "KVCache",
    }
    assert any(p["name"] == "fieldValidation" and p["in"] == "query" for p in patch["parameters"])
    schemas = doc["components"]["schemas"]
    assert schemas["dev.kvcache.v1alpha1.KVCache"]["x-kubernetes-group-version-kind"][0]["kind"] == "KVCache"
    assert "io.k8s.api.autoscaling.v1.Scale" in schemas  # the scale subresource's kind
    apps = json.loads(openapi.v3("apps", "v1") or b"{}")["components"]["schemas"]
    quantity = apps["io.k8s.apimachinery.pkg.api.resource.Quantity"]
    assert quantity["oneOf"] == [{"type": "number"}, {"type": "string"}]
    assert apps["io.k8s.apimachinery.pkg.util.intstr.IntOrString"]["x-kubernetes-int-or-string"] is True
    assert apps["io.k8s.api.apps.v1.StatefulSetSpec"]["properties"]["replicas"]["type"] == "integer"
    v2 = json.loads(openapi.v2())
    int_or_string = v2["definitions"]["io.k8s.apimachinery.pkg.util.intstr.IntOrString"]
    assert (v2["swagger"], int_or_string["type"], int_or_string["format"]) == (
        "2.0",
        "string",
        "int-or-string",
    )


def test_to_openapi_keeps_property_names_that_look_like_keywords() -> None:
    schema = {
        "type": ["object", "null"],
        "properties": {"oneOf": {"type": ["string", "null"]}, "$ref": {"$ref": "#/$defs/X"}},
    }
    assert to_openapi(schema, "#/components/schemas/") == {
        "type": "object",
        "properties": {"oneOf": {"type": "string"}, "$ref": {"$ref": "#/components/schemas/X"}},
    }


def test_strict_decoding_of_built_in_kinds_names_unknown_fields_and_wrong_types() -> None:
    schemas = BuiltinSchemas()
    sts = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "x", "labelz": {}},
           "spec": {"replicas": "two", "selector": {}, "template": {"spec": {"containers": [
               {"name": "c", "image": "i", "imagePullPolicyy": "Always"}]}}}}  # fmt: skip
    assert schemas.errors(sts) == [
        "spec.replicas: expected integer, got str",
        'unknown field "metadata.labelz"',
        'unknown field "spec.template.spec.containers.0.imagePullPolicyy"',
    ]
    assert (
        schemas.errors(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}}
        )
        == []
    )
    assert schemas.errors({"apiVersion": "example.com/v1", "kind": "Unknown", "spec": {"x": 1}}) == []
