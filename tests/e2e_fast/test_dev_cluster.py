"""``kvcache-operator dev up``, driven the whole way with the real kubectl (issue 19).

One test, as a new user would go: start the cluster in the background, apply the sample with
kubectl's validation on (a bad field is refused by the server), wait for it, read the printer
columns, the engine's logs, send requests through ``kubectl port-forward``, validate the persisted
cache with ``kubectl exec``, scale through the scale subresource, ``kubectl kvcache status``,
then ``dev down``: no process of the cluster may be left.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from e2e.localcluster.dev import processes_in

from tests.e2e_fast.kubectl import REPO, VENV_BIN, Kubectl, run, tool_env

SAMPLE = REPO / "crds" / "samples" / "local-demo.yaml"
CRD = REPO / "crds" / "kvcache.dev_kvcaches.yaml"

pytestmark = pytest.mark.timeout(420)


def printer_columns() -> list[str]:
    crd = next(d for d in yaml.safe_load_all(CRD.read_text()) if d)
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    return ["NAME"] + [c["name"].upper() for c in columns if not c.get("priority")]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[1].startswith("Z"))


def test_kubectl_drives_dev_up_from_apply_to_down(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = tool_env(tmp_path / "home", KVCACHE_CHECKOUT=str(REPO))
    dev = [str(VENV_BIN / "kvcache-operator"), "dev"]
    up = run([*dev, "up", "--state", str(state)], env)
    assert up.returncode == 0, up.stderr
    assert up.stdout.splitlines()[0] == f"export KUBECONFIG={state / 'kubeconfig'}"
    kubectl = Kubectl({**env, "KUBECONFIG": str(state / "kubeconfig")})
    processes: list[int] = []
    try:
        # apply, with kubectl's own validation (server-side, from the served OpenAPI)
        assert kubectl("apply", "-f", str(SAMPLE)).strip() == "kvcache.kvcache.dev/demo created"
        bad = tmp_path / "bad.yaml"
        manifest = yaml.safe_load(SAMPLE.read_text())
        manifest["metadata"]["name"] = "bad"
        manifest["spec"]["cache"]["maxTokenz"] = 5
        bad.write_text(yaml.safe_dump(manifest))
        refused = kubectl.run("apply", "-f", str(bad), check=False)
        assert refused.returncode == 1
        assert 'strict decoding error: unknown field "spec.cache.maxTokenz"' in refused.stderr
        assert "failed to download openapi" not in refused.stderr

        kubectl("wait", "--for=condition=Ready", "kvc/demo", "--timeout=120s")
        rows = kubectl.table("get", "kvc")
        assert rows[0] == printer_columns()
        row = dict(zip(rows[0], rows[1], strict=False))
        assert (row["NAME"], row["PHASE"], row["READY"]) == ("demo", "Ready", "1")
        assert kubectl.table("get", "pods")[1][:3] == ["demo-0", "1/1", "Running"]

        assert "kvcache-engine: listening on http://" in kubectl("logs", "demo-0")

        # requests through port-forward: the packaged trace, then a persist of what it stored (an
        # admin call: the admin token, which may do everything the data token may)
        token = base64.b64decode(
            kubectl("get", "secret", "demo-admin-token", "-o", "jsonpath={.data.token}")
        ).decode()
        with kubectl.port_forward("pod/demo-0", 8080) as url:
            engine = {**env, "KVCACHE_TOKEN": token}
            bench = run([str(VENV_BIN / "kvcache-engine"), "bench", "--url", url, "--requests", "20",
                         "--concurrency", "1", "--json"], engine)  # fmt: skip
            assert bench.returncode == 0, bench.stderr
            result = json.loads(bench.stdout)
            assert (result["requests"], result["errors"]) == (20, 0), result
            persist = run([str(VENV_BIN / "kvcache-engine"), "persist", "--url", url], engine)
            assert persist.returncode == 0, persist.stderr

        # the engine's temp files (profiles) go to its pod's /tmp volume, in the state directory
        assert kubectl("exec", "demo-0", "--", "printenv", "TMPDIR").startswith(str(state / "pods"))

        # exec: the engine's own validator, on the pod's PVC path
        report = json.loads(
            kubectl("exec", "demo-0", "--", "kvcache-engine", "validate", "/var/lib/kvcache/cache")
        )
        assert report["is_valid"] is True and report["blocks"] > 0, report

        # scale (the scale subresource) once autoscaling no longer owns the replicas, then wait
        kubectl("patch", "kvc", "demo", "--type", "merge", "-p", '{"spec": {"autoscaling": {"mode": "Off"}}}')
        assert kubectl("scale", "kvc/demo", "--replicas=2").strip() == "kvcache.kvcache.dev/demo scaled"
        kubectl("wait", "--for=jsonpath={.status.readyReplicas}=2", "kvc/demo", "--timeout=120s")
        kubectl("wait", "--for=condition=Ready", "pod/demo-1", "--timeout=60s")

        summary = kubectl("kvcache", "status", "demo").splitlines()
        assert summary[1].split()[:3] == ["demo", "Ready", "2/2"], summary

        status = run([*dev, "status", "--state", str(state), "--json"], env)
        assert status.returncode == 0, status.stderr
        processes = json.loads(status.stdout)["processes"]
        assert len(processes) >= 4, processes  # the service, the operator, two engines
    finally:
        down = run([*dev, "down", "--state", str(state)], env)
    assert down.returncode == 0, down.stderr
    assert "local cluster stopped" in down.stderr and "leftover" not in down.stderr, down.stderr
    assert [p for p in processes if alive(p)] == []
    assert processes_in(state) == []
    after = run([*dev, "status", "--state", str(state)], env)
    assert after.returncode == 2 and "no local cluster running" in after.stderr


def test_the_operator_package_does_not_import_the_local_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = (
        "import sys, kvcache_operator.cli as cli; cli.build_parser().parse_args(['dev', 'status']); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('e2e', 'tests')))"
    )
    assert run([sys.executable, "-c", probe], tool_env(tmp_path / "home")).stdout.strip() == "[]"
    from kvcache_operator import dev

    monkeypatch.setattr(dev, "__file__", str(tmp_path / "site-packages" / "kvcache_operator" / "dev.py"))
    monkeypatch.delenv("KVCACHE_CHECKOUT", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"needs a source checkout .* run `make cluster` there"):
        dev.checkout()
