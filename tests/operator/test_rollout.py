"""The cache-aware rolling update (rollout.gated): a template change restarts the highest ordinal
first; the partition moves down one replica at a time, only past replicas that run the new template,
are ready and report a warm ratio of at least MIN_WARM_RATIO; scaling or idle passes never roll."""

from __future__ import annotations

from typing import Any

from kvcache_operator import resources, rollout
from tests.api import helpers as h


def _sts(image: str = "engine:1", replicas: int = 3) -> dict[str, Any]:
    spec = {"image": image, "replicas": replicas}
    built = resources.build_children(h.make_kvcache(spec), token="t")
    return next(c for c in built if c["kind"] == "StatefulSet")


def _observed(desired: dict[str, Any], partition: int, update: str = "rev-new") -> dict[str, Any]:
    out, _ = rollout.gated(desired, None, [], {})
    out["spec"]["updateStrategy"]["rollingUpdate"]["partition"] = partition
    out["status"] = {"updateRevision": update, "currentRevision": "rev-old"}
    return out


def _pod(ordinal: int, revision: str, ready: bool) -> dict[str, Any]:
    return {
        "metadata": {"name": f"kvc-{ordinal}", "labels": {rollout.REVISION_LABEL: revision}},
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def _partition(sts: dict[str, Any]) -> int:
    return int(sts["spec"]["updateStrategy"]["rollingUpdate"]["partition"])


def test_new_statefulset_has_no_partition_and_carries_its_template_hash() -> None:
    out, why = rollout.gated(_sts(), None, [], {})
    assert _partition(out) == 0 and why is None
    assert out["metadata"]["annotations"][rollout.TEMPLATE_HASH] == rollout.template_hash(_sts())
    h.kube_validate(out)


def test_template_change_starts_at_the_highest_ordinal() -> None:
    observed = _observed(_sts("engine:1"), 0, update="rev-old")
    out, why = rollout.gated(_sts("engine:2"), observed, [], {})
    assert _partition(out) == 2 and why is not None and "kvc-2 restarts first" in why
    # an idle pass (same template, nothing rolling) keeps partition 0
    out, why = rollout.gated(_sts("engine:1"), observed, [], {})
    assert _partition(out) == 0 and why is None


def test_partition_moves_only_past_a_ready_warm_replica_on_the_new_template() -> None:
    desired = _sts("engine:2")
    observed = _observed(desired, 2)
    old = [_pod(0, "rev-old", True), _pod(1, "rev-old", True)]
    cases = [
        ([_pod(2, "rev-old", True)], {}, 2, "to restart"),
        ([_pod(2, "rev-new", False)], {}, 2, "become ready"),
        ([_pod(2, "rev-new", True)], {"kvc-2": 0.5}, 2, "warm 50% < 90%"),
        ([_pod(2, "rev-new", True)], {"kvc-2": 0.95}, 1, None),
        ([_pod(2, "rev-new", True)], {"kvc-2": None}, 1, None),  # an engine that does not say: readiness
    ]
    for top, warm, want, words in cases:
        out, why = rollout.gated(desired, observed, old + top, warm)
        assert _partition(out) == want, (top, warm, why)
        assert (why is None) if words is None else (why is not None and words in why), why
    # at partition 1: kvc-1 must be warm too before kvc-0 restarts
    observed = _observed(desired, 1)
    pods = [_pod(0, "rev-old", True), _pod(1, "rev-new", True), _pod(2, "rev-new", True)]
    assert _partition(rollout.gated(desired, observed, pods, {"kvc-1": 0.2, "kvc-2": 1.0})[0]) == 1
    assert _partition(rollout.gated(desired, observed, pods, {"kvc-1": 1.0, "kvc-2": 1.0})[0]) == 0
    assert rollout.pods_to_check(observed, pods) == ["kvc-1", "kvc-2"]


def test_scale_in_clamps_the_partition_and_missing_pods_hold_it() -> None:
    observed = _observed(_sts(replicas=3), 2)
    out, why = rollout.gated(_sts(replicas=2), observed, [], {})
    assert _partition(out) == 1 and why is not None and "kvc-1 to exist" in why
