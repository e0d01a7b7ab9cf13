"""controller.py without Kopf: observe over the indexes, the tuned values' home, the thin handlers.

The controller-level tests drive ``controller.converge`` / ``control_pass`` against the API emulator
over HTTP (the real ``k8s.KubeClient``), with the indexes built from the emulator's store the way
Kopf's watches fill them.
"""

from __future__ import annotations

import ast
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvcache_engine.contract import LiveConfig
from kvcache_operator import api, controller, k8s, policy, rbac
from kvcache_operator import status as status_mod
from kvcache_operator.metrics import OperatorMetrics
from tests.operator.conftest import KVCACHES, NS, Cluster, make_kvcache, settle_statefulset

HANDLERS = Path(controller.__file__).with_name("handlers.py")
LOGGER = logging.getLogger("test-controller")
WRITES = ("create", "patch", "update", "delete")


# --- handlers.py holds only decorators ---------------------------------------------------------------


def test_handlers_module_defines_only_thin_decorated_functions() -> None:
    tree = ast.parse(HANDLERS.read_text())
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    assert {f.name for f in functions} >= {"reconcile_handler", "control_loop", "kvcache_children"}
    for node in tree.body:
        assert isinstance(
            node,
            ast.Expr | ast.Import | ast.ImportFrom | ast.FunctionDef | ast.AsyncFunctionDef | ast.Assign,
        ), f"handlers.py line {node.lineno}: only imports and decorated functions belong here"
        if isinstance(node, ast.Assign):  # type aliases only
            assert all(isinstance(t, ast.Name) and t.id[0].isupper() for t in node.targets)
    for fn in functions:
        decorators = [ast.unparse(d) for d in fn.decorator_list]
        assert decorators and all(d.startswith("kopf.") for d in decorators), fn.name
        statements = [
            s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
        ]
        assert len(statements) <= 5, f"{fn.name}: {len(statements)} statements; delegate"
        loops = [
            n for n in ast.walk(fn) if isinstance(n, ast.For | ast.While | ast.Try | ast.With | ast.AsyncWith)
        ]
        assert not loops, f"{fn.name}: control flow belongs in controller.py"


# --- observe: indexes + own writes ----------------------------------------------------------------------


def _obj(kind: str, name: str, rv: str, **extra: Any) -> dict[str, Any]:
    labels = {"app.kubernetes.io/instance": "c", "app.kubernetes.io/component": "engine"}
    return {
        "kind": kind,
        "metadata": {"name": name, "namespace": NS, "resourceVersion": rv, "labels": labels},
        **extra,
    }


def test_observe_lays_own_writes_over_the_index_until_the_watch_brings_them() -> None:
    cm = _obj("ConfigMap", "c-config", "5", data={"v": "old"})
    pod = _obj("Pod", "c-0", "3")
    backup_pod = _obj("Pod", "c-backup-1", "4")
    backup_pod["metadata"]["labels"]["app.kubernetes.io/component"] = "backup"
    job = _obj("Job", "c-backup-1", "6")
    indexes = controller.Indexes({(NS, "c"): [cm, job]}, {(NS, "c"): [backup_pod, pod]})
    state = controller.CacheState()
    patched = {**cm, "metadata": {**cm["metadata"], "resourceVersion": "9"}, "data": {"v": "new"}}
    created = _obj("Service", "c", "10")
    state.written[("ConfigMap", "c-config")] = controller.Written(patched, "5", "9")
    state.written[("Service", "c")] = controller.Written(created, None, "10")

    seen = controller.observe(indexes, state, NS, "c")
    assert seen.configmap is not None and seen.configmap["data"] == {"v": "new"}  # not yet watched back
    assert seen.child("Service", "c") == created
    assert [p["metadata"]["name"] for p in seen.pods] == ["c-0"]  # engine pods only
    assert [j["metadata"]["name"] for j in seen.jobs] == ["c-backup-1"] and "Job" not in seen.children

    # the watch delivers both writes: the index wins and the overlay is dropped
    indexes.children[(NS, "c")] = [patched, created, job]  # type: ignore[index]
    seen = controller.observe(indexes, state, NS, "c")
    assert state.written == {} and seen.configmap == patched

    # a delete hides the object until the watch drops it
    state.written[("Service", "c")] = controller.Written(None, "10", None)
    assert controller.observe(indexes, state, NS, "c").child("Service", "c") is None
    indexes.children[(NS, "c")] = [patched, job]  # type: ignore[index]
    controller.observe(indexes, state, NS, "c")
    assert state.written == {}


def test_index_entry_keys_by_namespace_and_instance() -> None:
    obj = _obj("ConfigMap", "c-config", "1")
    assert controller.index_entry(obj, "ConfigMap") == {(NS, "c"): obj}
    unlabelled = {"metadata": {"name": "x", "namespace": NS, "labels": {}}}
    assert controller.index_entry(unlabelled, "ConfigMap") is None
    listed = {"metadata": obj["metadata"]}  # list items may come without kind
    assert controller.index_entry(listed, "Secret") == {(NS, "c"): {**listed, "kind": "Secret"}}
    managed = {**obj, "metadata": {**obj["metadata"], "managedFields": [{"manager": "kubectl"}]}}
    assert controller.index_entry(managed, "ConfigMap") == {(NS, "c"): obj}


# --- tuned values: the ConfigMap annotation ---------------------------------------------------------------


def test_tuned_values_round_trip_through_one_annotation() -> None:
    tuned = LiveConfig(max_tokens=16384, use_compression=True, compression_ratio=0.5)
    annotation = controller.tuned_annotation(tuned)
    assert json.loads(annotation[controller.TUNED_ANNOTATION] or "") == {
        "maxTokens": 16384,
        "useCompression": True,
        "compressionRatio": 0.5,
    }
    cm = {"metadata": {"annotations": annotation}}
    assert controller.read_tuned(cm) == tuned
    assert controller.tuned_annotation(LiveConfig()) == {controller.TUNED_ANNOTATION: None}
    for broken in ("not json", "[1]", '{"numLayers": 4}', '{"maxTokens": "many"}'):
        assert controller.read_tuned(
            {"metadata": {"annotations": {controller.TUNED_ANNOTATION: broken}}}
        ) == (LiveConfig())
    assert controller.read_tuned(None) == LiveConfig()


# --- converge and the control pass against the emulator, without Kopf -----------------------------------


def _indexes(cluster: Cluster) -> controller.Indexes:
    """What Kopf's two indexes would hold now (labelled objects by namespace and instance)."""
    children: dict[tuple[str, str], list[dict[str, Any]]] = {}
    pods: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for kind in k8s.WATCHED:
        resource = "/".join(p for p in (kind.group, kind.version, kind.plural) if p)
        for obj in cluster.emu.list(
            resource, NS, label_selector="app.kubernetes.io/managed-by=kvcache-operator"
        ):
            for key, value in (controller.index_entry(obj, kind.kind) or {}).items():
                (pods if kind is k8s.PODS else children).setdefault(key, []).append(value)
    return controller.Indexes(children, pods)


@pytest.fixture
async def runtime(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[controller.Runtime]:
    events: list[tuple[str, str]] = []
    monkeypatch.setattr(
        controller,
        "post_event",
        lambda body, reason, message, warning=False: events.append((reason, message)),
    )
    async with aiohttp.ClientSession() as session, aiohttp.ClientSession() as http:
        rt = controller.Runtime(k8s.KubeClient(session, cluster.url), http, OperatorMetrics())
        rt.events = events  # type: ignore[attr-defined]
        yield rt


def _writes(cluster: Cluster) -> list[tuple[str, str, str | None]]:
    return [(v, p, s) for v, p, _, _, s in cluster.emu.calls if v in WRITES]


async def test_converge_writes_once_then_nothing_while_nothing_changes(
    cluster: Cluster, runtime: controller.Runtime
) -> None:
    emu = cluster.emu
    emu.create(KVCACHES, make_kvcache("calm"))
    state = controller.CacheState()
    body = emu.get(KVCACHES, "calm", NS)
    await controller.converge(runtime, body, _indexes(cluster), state, LOGGER)
    first = _writes(cluster)
    assert ("patch", "kvcaches", "status") in first and ("create", "statefulsets", None) in first
    # the watch has not delivered anything yet: the overlay keeps the next pass from repeating writes
    await controller.converge(runtime, body, controller.Indexes({}, {}), state, LOGGER)
    assert _writes(cluster) == first
    # caught up, a fresh state (an operator restart) writes nothing either
    await controller.converge(
        runtime, emu.get(KVCACHES, "calm", NS), _indexes(cluster), controller.CacheState(), LOGGER
    )
    assert _writes(cluster) == first
    assert not [c for c in emu.calls if c[0] == "list"]  # reads come from the indexes


async def test_tuner_stores_its_values_on_the_configmap_and_a_restart_keeps_them(
    cluster: Cluster, runtime: controller.Runtime
) -> None:
    emu = cluster.emu
    tuning = {"mode": "Auto", "maxTokensMin": 256, "maxTokensMax": 4096, "intervalSeconds": 30}
    emu.create(KVCACHES, make_kvcache("tuned", tuning=tuning, autoscaling={"mode": "Off"}))
    state = controller.CacheState()
    await controller.converge(runtime, emu.get(KVCACHES, "tuned", NS), _indexes(cluster), state, LOGGER)
    settle_statefulset(emu, "tuned", 2)  # no rollout under way: the policy may act
    now = time.time()
    state.samples.extend(
        policy.Sample(
            time_s=now - 40 + i, memory_pressure=0.95, hit_rate=0.2, p95_latency_ms=2.0, ready_replicas=2
        )
        for i in range(40)
    )
    body = emu.get(KVCACHES, "tuned", NS)
    await controller.control_pass(runtime, body, _indexes(cluster), state, LOGGER)

    cm = emu.get("v1/configmaps", "tuned-config", NS)
    stored = json.loads(cm["metadata"]["annotations"][controller.TUNED_ANNOTATION])
    assert stored == {"useCompression": True}  # compressionRatio 0.5 is spec.cache's own: not stored
    assert "useCompression: true" in cm["data"]["config.yaml"]
    status = emu.get(KVCACHES, "tuned", NS)["status"]
    assert status["effectiveConfig"]["useCompression"] is True
    assert not [key for key in status if "tun" in key.lower()]  # status reports; it stores nothing
    assert [d["kind"] for d in status["decisions"]] == ["Tune"]
    assert [r for r, _ in runtime.events] == ["TuneApplied"]  # type: ignore[attr-defined]

    # restart: a fresh state (from status) reads the tuned values back from the ConfigMap, changes nothing
    before = _writes(cluster)
    restarted = controller.Runtime(runtime.kube, runtime.http, OperatorMetrics())
    fresh = controller.cache_state(restarted, emu.get(KVCACHES, "tuned", NS))
    assert fresh.last_tune_s is not None  # the tuning cooldown survives too
    await controller.converge(runtime, emu.get(KVCACHES, "tuned", NS), _indexes(cluster), fresh, LOGGER)
    assert _writes(cluster) == before

    # the user sets the field the tuner changed: their value wins and the annotation goes
    emu.patch(KVCACHES, "tuned", {"spec": {"cache": {"useCompression": False}}}, NS)
    await controller.converge(
        runtime, emu.get(KVCACHES, "tuned", NS), _indexes(cluster), fresh, LOGGER, reset={"use_compression"}
    )
    cm = emu.get("v1/configmaps", "tuned-config", NS)
    assert controller.TUNED_ANNOTATION not in (cm["metadata"].get("annotations") or {})
    assert "useCompression: false" in cm["data"]["config.yaml"]


async def test_an_applied_scale_is_written_as_last_scale(
    cluster: Cluster, runtime: controller.Runtime
) -> None:
    emu = cluster.emu
    autoscaling = {"mode": "Auto", "minReplicas": 1, "maxReplicas": 3, "scaleUpStabilizationSeconds": 10}
    emu.create(KVCACHES, make_kvcache("grow", autoscaling=autoscaling))
    state = controller.CacheState()
    await controller.converge(runtime, emu.get(KVCACHES, "grow", NS), _indexes(cluster), state, LOGGER)
    settle_statefulset(emu, "grow", 2)
    now = time.time()
    state.samples.extend(
        policy.Sample(time_s=now - 12 + i, memory_pressure=0.99, hit_rate=0.1, ready_replicas=2)
        for i in range(12)
    )
    await controller.control_pass(runtime, emu.get(KVCACHES, "grow", NS), _indexes(cluster), state, LOGGER)
    assert emu.get("apps/v1/statefulsets", "grow", NS)["spec"]["replicas"] == 3
    status = emu.get(KVCACHES, "grow", NS)["status"]
    last = status["lastScale"]
    assert (last["fromReplicas"], last["toReplicas"]) == (2, 3) and "memory pressure" in last["reason"]
    assert last["time"] == status["decisions"][-1]["time"]
    # a restarted operator restores the cooldown and the record from status
    restored = controller.cache_state(
        controller.Runtime(runtime.kube, runtime.http, OperatorMetrics()), emu.get(KVCACHES, "grow", NS)
    )
    assert restored.last_scale == last and restored.last_scale_s is not None


def test_status_keeps_as_many_decisions_as_the_schema_allows() -> None:
    schema_max = next(
        m.max_length for m in api.KVCacheStatus.model_fields["decisions"].metadata if hasattr(m, "max_length")
    )
    assert status_mod.MAX_DECISIONS == schema_max == 20
    kvc = api.parse_kvcache(make_kvcache("many"))
    decisions = [{"time": f"t{i}", "kind": "Scale", "mode": "Auto", "applied": True} for i in range(25)]
    status = status_mod.build_status(
        kvc=kvc,
        generation=1,
        desired=2,
        statefulset=None,
        pods=[],
        rolling=True,
        paused=False,
        effective_config=None,
        observation=None,
        decisions=decisions,
        last_backup=None,
        previous={},
        now="t",
    )
    assert status["decisions"] == decisions[-20:]


# --- RBAC for the watches and the peering check ----------------------------------------------------------


@pytest.mark.parametrize("namespaced", [False, True])
def test_the_watched_kinds_may_be_listed_and_watched(namespaced: bool) -> None:
    granted = rbac.permission_set(namespaced=namespaced)
    needed = {(k.group, k.plural, verb) for k in k8s.WATCHED for verb in ("list", "watch")}
    assert needed - granted == set()
    assert k8s.API_CALLS - granted == set()
    peering = rbac.permission_set(namespaced=namespaced, peering=True)
    kind = k8s.KOPFPEERINGS if namespaced else k8s.CLUSTERKOPFPEERINGS
    assert (kind.group, kind.plural, "get") in peering & k8s.PEERING_CALLS


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30.0), ("500ms", 1.0), ("0s", 1.0), ("2m", 120.0), ("2h", 3600.0)]
)
def test_the_control_loop_interval_stays_within_the_apis_bounds(text: str, seconds: float) -> None:
    """A scrapeInterval stored before the webhook refused it (0s) must not make the loop spin."""
    assert controller.parse_duration(text) == seconds


def test_the_control_loop_interval_refuses_what_is_not_a_duration() -> None:
    with pytest.raises(ValueError, match="not a duration"):
        controller.parse_duration("30 seconds")


async def test_a_deletion_the_watch_never_reported_ends_the_loop_after_one_get(
    cluster: Cluster, runtime: controller.Runtime
) -> None:
    """``_still_exists``: free while the index shows the StatefulSet (or never did); once a
    StatefulSet it showed is gone, one GET decides (a re-created namesake has another uid)."""
    emu = cluster.emu
    emu.create(KVCACHES, make_kvcache("lost"))
    body = emu.get(KVCACHES, "lost", NS)
    state = controller.CacheState()

    def gets() -> int:
        return sum(1 for v, p, *_ in emu.calls if v == "get" and p == "kvcaches")

    assert await controller._still_exists(runtime, body, _indexes(cluster), state) is True  # no sts yet
    await controller.converge(runtime, body, _indexes(cluster), state, LOGGER)
    assert await controller._still_exists(runtime, body, _indexes(cluster), state) is True
    assert state.had_statefulset and gets() == 0
    emu.patch("apps/v1/statefulsets", "lost", {"metadata": {"labels": {"x": "y"}}}, NS)  # still there
    assert await controller._still_exists(runtime, body, _indexes(cluster), state) is True
    assert gets() == 0
    emu.delete("apps/v1/statefulsets", "lost", NS)  # someone deleted the StatefulSet only
    assert await controller._still_exists(runtime, body, _indexes(cluster), state) is True
    assert gets() == 1
    emu.delete(KVCACHES, "lost", NS)  # the KVCache itself (its DELETED event lost)
    assert await controller._still_exists(runtime, body, _indexes(cluster), state) is False
    emu.create(KVCACHES, make_kvcache("lost"))  # a namesake: not the cache this loop served
    assert await controller._still_exists(runtime, body, _indexes(cluster), state) is False
    assert gets() == 3


_LABELS = st.dictionaries(st.sampled_from(["a", "b", "kvcache.dev/x"]), st.text(max_size=3), max_size=3)
_ANNOTATIONS = st.dictionaries(
    st.sampled_from(
        [
            "keep",
            "kvcache.dev/last-handled-configuration",
            "kvcache.dev/reconcile_handler",
            "kubectl.kubernetes.io/last-applied-configuration",
            "other.zalando.org/kopf-managed",
            "other.zalando.org/handler",
            "x.kopf.zalando.org/y",
        ]
    ),
    st.text(max_size=3),
    max_size=5,
)


@given(
    spec=st.dictionaries(st.sampled_from(["replicas", "cache"]), st.integers() | st.text(max_size=3)),
    labels=_LABELS,
    annotations=_ANNOTATIONS,
    status=st.dictionaries(st.sampled_from(["phase", "x"]), st.text(max_size=3)),
)
def test_the_diffbase_essence_of_a_kvcache_is_kopfs_and_index_only_kinds_have_none(
    spec: dict[str, Any], labels: dict[str, str], annotations: dict[str, str], status: dict[str, str]
) -> None:
    """``MemoryDiffBase.build`` hands Kopf only what the essence keeps: the same essence as Kopf's
    own storage builds (and cleared of progress keys the same way), never sharing the body's
    objects; a child or a pod (index handlers only) gets an empty one and no stored base."""
    meta = {"name": "c", "namespace": NS, "uid": "u1", "labels": labels, "annotations": annotations}
    body = {"apiVersion": "kvcache.dev/v1alpha1", "kind": "KVCache", "metadata": meta, "spec": spec}
    if status:
        body["status"] = status
    ours, progress = controller.MemoryDiffBase(), controller.ProgressAnnotations(prefix="kvcache.dev")
    kopfs = kopf.AnnotationsDiffBaseStorage(prefix="kvcache.dev", key="last-handled-configuration")
    essence = ours.build(body=kopf.Body(body))
    assert essence == kopfs.build(body=kopf.Body(body))
    assert progress.clear(essence=essence) == kopf.AnnotationsProgressStorage(prefix="kvcache.dev").clear(
        essence=essence
    )
    if spec:
        assert essence["spec"] == spec and essence["spec"] is not spec
    child = {**body, "apiVersion": "v1", "kind": "ConfigMap"}
    assert ours.build(body=kopf.Body(child)) == {} and ours.fetch(body=kopf.Body(child)) is None
