"""The Kubernetes permissions the operator needs: one declared table, granted verbatim by the chart.

Invariants:

* ``RULES`` is the single source of truth. The Helm chart renders exactly these
  (apiGroup, resource, verb) triples — no wildcard, nothing extra, nothing missing — and a
  delivery test compares the rendered ClusterRole/Role rules with ``permission_set()``.
  The operator tests check this table against the API calls the code makes and against the kinds
  it indexes (``k8s.WATCHED``: Kopf lists and watches them to feed the indexes, so they need
  ``list`` and ``watch``).
* A ``NAMESPACED`` rule is granted in every watched namespace (a Role per namespace when
  ``watchNamespaces`` is set, the ClusterRole otherwise). A ``CLUSTER`` rule concerns
  cluster-scoped objects or cluster-wide observation and always goes to a ClusterRole.
* ``peering`` rules are granted only when the chart runs several replicas with Kopf peering
  (``ha.enabled``); namespaced peering objects in namespaced mode, cluster ones otherwise.
* ``webhook`` rules are granted only when the operator manages its own admission webhook
  configuration (``webhook.enabled`` with a self-signed certificate, the chart's default).
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass

import yaml

__all__ = [
    "CHART_RULES_FILE",
    "RULES",
    "Rule",
    "Scope",
    "chart_rules_yaml",
    "main",
    "permission_set",
    "rules_for",
]

# The chart cannot import Python: it renders its RBAC from this generated copy of RULES
# (``python -m kvcache_operator.rbac > helm/kvcache-operator/files/rbac-rules.yaml``).
CHART_RULES_FILE = "helm/kvcache-operator/files/rbac-rules.yaml"


class Scope(enum.StrEnum):
    """Where a rule is granted."""

    NAMESPACED = "namespaced"
    CLUSTER = "cluster"


@dataclass(frozen=True)
class Rule:
    """One RBAC rule: verbs on one resource (``resource/subresource`` for subresources) of one group."""

    api_group: str
    resource: str
    verbs: tuple[str, ...]
    scope: Scope = Scope.NAMESPACED
    # "always", "peering" (HA only) with the peering mode it applies to, or "webhook" (the operator
    # manages its ValidatingWebhookConfiguration).
    when: str = "always"
    why: str = ""


_READ = ("get", "list", "watch")
_MANAGE = ("get", "list", "watch", "create", "update", "patch", "delete")

RULES: tuple[Rule, ...] = (
    # --- the custom resource ----------------------------------------------------------------------
    Rule(
        "kvcache.dev",
        "kvcaches",
        ("get", "list", "watch", "patch"),
        why="Kopf watches KVCaches, patches its progress annotations, removes older versions' finalizer",
    ),
    Rule("kvcache.dev", "kvcaches/status", ("get", "patch", "update"), why="status, conditions"),
    Rule("kvcache.dev", "kvcaches/scale", ("get",), why="read the scale subresource it reports"),
    # --- children built by resources.py ---------------------------------------------------------
    Rule("apps", "statefulsets", _MANAGE, why="engine pods"),
    Rule("", "services", _MANAGE, why="headless and client Services"),
    Rule("", "configmaps", _MANAGE, why="engine config"),
    Rule("", "secrets", _MANAGE, why="engine API token"),
    Rule("batch", "cronjobs", _MANAGE, why="scheduled backups"),
    Rule(
        "batch",
        "jobs",
        ("get", "list", "watch", "create", "delete"),
        why="backup-now jobs; watched (index) for status.lastBackup",
    ),
    Rule(
        "",
        "persistentvolumeclaims",
        ("get", "list", "watch", "create", "patch", "delete"),
        why="the backup PVC (a child of the KVCache); observe per-replica PVCs; delete them on scale-in",
    ),
    Rule("policy", "poddisruptionbudgets", _MANAGE, why="PDB per cache"),
    Rule("monitoring.coreos.com", "servicemonitors", _MANAGE, why="optional ServiceMonitor per cache"),
    Rule("networking.k8s.io", "networkpolicies", _MANAGE, why="optional NetworkPolicy per cache"),
    # --- observation --------------------------------------------------------------------------------
    Rule("", "pods", _READ, why="watched (index): the ready engine pods to scrape, their restarts"),
    Rule("", "pods/status", ("patch",), why="the warm join: a new pod's readiness gate kvcache.dev/warm"),
    Rule("", "events", ("create", "patch"), why="Kopf and the operator post Events"),
    Rule("events.k8s.io", "events", ("create", "patch"), why="events.k8s.io Events"),
    # --- Kopf framework ---------------------------------------------------------------------------
    Rule(
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        ("list", "watch"),
        scope=Scope.CLUSTER,
        why="Kopf observes CRDs so the KVCache resource is picked up when installed later",
    ),
    Rule(
        "kopf.dev",
        "kopfpeerings",
        ("get", "list", "watch", "patch"),
        when="peering",
        why="Kopf peering (namespaced mode): only the highest-priority replica is active",
    ),
    Rule(
        "kopf.dev",
        "clusterkopfpeerings",
        ("get", "list", "watch", "patch"),
        scope=Scope.CLUSTER,
        when="peering",
        why="Kopf peering (cluster-wide mode)",
    ),
    Rule(
        "admissionregistration.k8s.io",
        "validatingwebhookconfigurations",
        ("create", "patch"),
        scope=Scope.CLUSTER,
        when="webhook",
        why="Kopf creates the admission webhook's configuration and patches in its endpoint and CA",
    ),
)


def rules_for(*, namespaced: bool, peering: bool, webhook: bool = True) -> list[Rule]:
    """The rules granted for one install mode: ``namespaced`` = watchNamespaces set, ``webhook`` = the
    operator manages its webhook configuration (self-signed, the default)."""
    chosen: list[Rule] = []
    for rule in RULES:
        if rule.when == "webhook" and not webhook:
            continue
        if rule.when == "peering":
            if not peering:
                continue
            # Kopf uses namespaced peering objects when it serves namespaces, cluster ones otherwise.
            if (rule.resource == "kopfpeerings") != namespaced:
                continue
        chosen.append(rule)
    return chosen


def permission_set(
    *, namespaced: bool = False, peering: bool = False, webhook: bool = True
) -> set[tuple[str, str, str]]:
    """Every (apiGroup, resource, verb) triple granted in one install mode."""
    return {
        (r.api_group, r.resource, verb)
        for r in rules_for(namespaced=namespaced, peering=peering, webhook=webhook)
        for verb in r.verbs
    }


def chart_rules_yaml() -> str:
    """RULES as the YAML document the chart's RBAC templates read (``rules: [...]``)."""
    rules = [
        {
            "apiGroup": r.api_group,
            "resource": r.resource,
            "verbs": list(r.verbs),
            "scope": r.scope.value,
            "when": r.when,
            "why": r.why,
        }
        for r in RULES
    ]
    header = (
        f"# Generated from operator/kvcache_operator/rbac.py; do not edit. Regenerate:\n"
        f"#   python -m kvcache_operator.rbac > {CHART_RULES_FILE}\n"
    )
    return header + yaml.safe_dump({"rules": rules}, sort_keys=False, width=120)


def main() -> int:
    sys.stdout.write(chart_rules_yaml())
    return 0


if __name__ == "__main__":
    sys.exit(main())
