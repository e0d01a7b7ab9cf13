"""The ``sh cluster`` blocks of both docs, against the local cluster (slow).

One local cluster (emulated API server, the real operator, engines as real processes: what
``kvcache-operator dev up`` runs) runs ``crds/samples/local-demo.yaml`` (the cache ``demo`` the
docs use); then every cluster block of troubleshooting.md and then operations.md runs in
document order with the real kubectl (apply with its validation, get, describe, logs, exec,
port-forward, patch, scale) and the ``kubectl kvcache`` plugin.

Not run here, and why: the blocks tagged ``real`` are the two Helm ones (``helm upgrade
--install`` and ``helm upgrade --reuse-values``, both ``--wait``): the chart runs the operator
as a Deployment, and the local cluster has no Deployment controller and runs the operator as a
process of its own (the test checks that the chart renders instead). Commands the docs mention
in prose only: ``kubectl logs demo-0 --previous`` (the healthy demo has no previous run; the
kubectl tests in tests/e2e_fast/test_kubectl.py run it on a crashing pod) and
``kvcache-engine restore --from /backups/...`` (run by the backup/restore scenario, e2e/).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.docs.harness import DOCS, REPO, TOOLS, check, parse, report, run_sh, scratch_checkout

pytestmark = pytest.mark.slow

REAL_BLOCKS_MAX = 2


def test_cluster_blocks(tmp_path: Path) -> None:
    from e2e.localcluster.cluster import LocalCluster

    blocks = [b for doc in DOCS for b in parse(doc) if b.cluster]
    real_only = [b for b in blocks if "real" in b.tags]
    assert len(real_only) <= REAL_BLOCKS_MAX, [b.where for b in real_only]
    assert all(b.code.startswith("helm ") for b in real_only), [b.where for b in real_only]
    rendered = subprocess.run(
        [str(TOOLS / "helm"), "template", "kvcache-operator", str(REPO / "helm" / "kvcache-operator")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert rendered.returncode == 0 and "kind: CustomResourceDefinition" in rendered.stdout, rendered.stderr
    work = scratch_checkout(tmp_path / "work")
    failures = []
    with LocalCluster(shutdown_grace_s=5.0) as cluster:
        cluster.apply(REPO / "crds" / "samples" / "local-demo.yaml")
        cluster.wait_for(
            lambda: (
                len(cluster.ready_pods({"app.kubernetes.io/instance": "demo"})) >= 1
                and (cluster.get("KVCache", "demo") or {}).get("status", {}).get("phase") == "Ready"
            ),
            timeout_s=180,
            what="KVCache demo Ready",
        )
        env = {"KUBECONFIG": str(cluster.kubeconfig), "HOME": str(tmp_path)}
        for block in (b for b in blocks if "real" not in b.tags):
            result = run_sh(block, work, env)
            problems = check(block, result)
            if problems:
                failures.append(report(block, result, problems))
        log = cluster.operator_log()
    assert not failures, "\n\n".join(failures) + f"\n--- operator log (tail) ---\n{log[-3000:]}"
