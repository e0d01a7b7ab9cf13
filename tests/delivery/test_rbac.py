"""The chart grants exactly the permissions declared in kvcache_operator/rbac.py, in every mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvcache_operator import rbac

from .conftest import CHART, NAMESPACE, ROOT, Render, by_kind

Triple = tuple[str, str, str]

MODES = [  # (values file, namespaced, peering, webhook configuration managed by the operator)
    (None, False, False, True),
    (CHART / "ci" / "namespaced-values.yaml", True, False, True),
    (CHART / "ci" / "ha-values.yaml", False, True, False),  # HA: cert-manager's certificate
    (CHART / "ci" / "ha-namespaced-values.yaml", True, True, False),
    (CHART / "ci" / "webhook-issuer-values.yaml", False, False, False),
]
MODE_IDS = ["cluster", "namespaced", "ha-cluster", "ha-namespaced", "webhook-cert-manager"]


def triples(role: dict[str, Any]) -> set[Triple]:
    """Every (apiGroup, resource, verb) a Role/ClusterRole grants; wildcards and extras fail loudly."""
    granted: set[Triple] = set()
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, f"unexpected rule fields: {rule}"
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {role['metadata']['name']}: {rule}"
        granted |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return granted


def scoped(scope: rbac.Scope, *, namespaced: bool, peering: bool, webhook: bool) -> set[Triple]:
    return {
        (r.api_group, r.resource, v)
        for r in rbac.rules_for(namespaced=namespaced, peering=peering, webhook=webhook)
        if r.scope is scope
        for v in r.verbs
    }


@pytest.mark.parametrize(("values", "namespaced", "peering", "webhook"), MODES, ids=MODE_IDS)
def test_chart_rules_equal_the_declared_table(
    render: Render, values: Path | None, namespaced: bool, peering: bool, webhook: bool
) -> None:
    docs = render(values)
    cluster_roles = by_kind(docs, "ClusterRole")
    roles = by_kind(docs, "Role")
    assert len(cluster_roles) == 1
    granted = triples(cluster_roles[0])
    if namespaced:
        watched = docs_namespaces(docs)
        assert sorted(r["metadata"]["namespace"] for r in roles) == watched
        assert granted == scoped(rbac.Scope.CLUSTER, namespaced=True, peering=peering, webhook=webhook)
        for role in roles:
            assert triples(role) == scoped(
                rbac.Scope.NAMESPACED, namespaced=True, peering=peering, webhook=webhook
            )
            granted |= triples(role)
    else:
        assert roles == []
    assert granted == rbac.permission_set(namespaced=namespaced, peering=peering, webhook=webhook)
    managed = ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "patch") in granted
    assert managed == webhook


def docs_namespaces(docs: list[dict[str, Any]]) -> list[str]:
    (deployment,) = by_kind(docs, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return sorted(a.removeprefix("--namespace=") for a in args if a.startswith("--namespace="))


@pytest.mark.parametrize(("values", "namespaced", "peering", "webhook"), MODES, ids=MODE_IDS)
def test_bindings_tie_each_role_to_the_operator(
    render: Render, values: Path | None, namespaced: bool, peering: bool, webhook: bool
) -> None:
    docs = render(values)
    (deployment,) = by_kind(docs, "Deployment")
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    for kind, binding_kind in (("ClusterRole", "ClusterRoleBinding"), ("Role", "RoleBinding")):
        roles = {(r["metadata"].get("namespace"), r["metadata"]["name"]) for r in by_kind(docs, kind)}
        bound = set()
        for binding in by_kind(docs, binding_kind):
            assert binding["roleRef"]["kind"] == kind
            assert binding["subjects"] == [
                {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
            ]
            bound.add((binding["metadata"].get("namespace"), binding["roleRef"]["name"]))
        assert bound == roles


def test_rules_cover_what_the_operator_manages() -> None:
    """The table itself: the custom resource with its subresources, and each child kind it builds."""
    granted = rbac.permission_set()
    for resource in ("kvcaches", "kvcaches/status"):
        assert ("kvcache.dev", resource, "patch") in granted
    for group, resource in (
        ("apps", "statefulsets"),
        ("", "services"),
        ("", "configmaps"),
        ("", "secrets"),
        ("batch", "cronjobs"),
        ("policy", "poddisruptionbudgets"),
    ):
        assert {
            (group, resource, v) for v in ("get", "list", "watch", "create", "patch", "delete")
        } <= granted
    assert ("", "pods", "create") not in granted and ("", "pods", "watch") in granted
    assert all("*" not in triple for triple in granted)


def test_chart_copy_of_the_table_is_current() -> None:
    """files/rbac-rules.yaml is generated from rbac.py; a stale copy would grant the wrong rules."""
    assert (ROOT / rbac.CHART_RULES_FILE).read_text() == rbac.chart_rules_yaml(), (
        f"regenerate: python -m kvcache_operator.rbac > {rbac.CHART_RULES_FILE}"
    )
