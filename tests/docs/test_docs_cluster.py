"""The ``sh cluster`` blocks of both docs, against the local cluster of ``make demo`` (slow).

One local cluster (emulated API server, the real operator, engines as real processes) runs
``crds/samples/local-demo.yaml`` (the cache ``demo`` the docs use); then every cluster block of
troubleshooting.md and then operations.md runs in document order with kubectl and the
``kubectl kvcache`` plugin. Blocks tagged ``real`` (a Helm install or upgrade, a client-side
validated ``kubectl apply``) need a real API server; the test checks there are only those few
and that the chart they install renders (the local cluster applies the same sample itself).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.docs.harness import DOCS, REPO, TOOLS, check, parse, report, run_sh, scratch_checkout

pytestmark = pytest.mark.slow

REAL_BLOCKS_MAX = 3


def test_cluster_blocks(tmp_path: Path) -> None:
    from e2e.localcluster.cluster import LocalCluster

    blocks = [b for doc in DOCS for b in parse(doc) if b.cluster]
    real_only = [b for b in blocks if "real" in b.tags]
    assert len(real_only) <= REAL_BLOCKS_MAX, [b.where for b in real_only]
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
