"""kubectl against the local cluster, piece by piece: discovery, OpenAPI validation, tables,
logs, exec, port-forward, scale, strategic merge patch, the pod's own temp directory.

One module-scoped cluster without the operator; the pods are tiny Python programs. (The whole
flow with the operator and real engines is test_dev_cluster.py.)
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.localcluster.cluster import LocalCluster

from tests.e2e_fast.kubectl import REPO, Kubectl, tool_env

pytestmark = pytest.mark.timeout(300)

# Serves its working directory over HTTP on :8080 and says where its temp directory is.
WEB = (
    "import http.server, os, tempfile; "
    "print('serving', os.environ['HOSTNAME'], 'tmp=' + tempfile.gettempdir(), flush=True); "
    "http.server.HTTPServer(('0.0.0.0', 8080), http.server.SimpleHTTPRequestHandler).serve_forever()"
)


def statefulset(name: str, replicas: int = 1, ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [
                        {
                            "name": "web",
                            "image": "python:3.11",
                            "command": ["python", "-c", WEB],
                            "ports": ports or [{"name": "http", "containerPort": 8080}],
                            "readinessProbe": {"httpGet": {"path": "/", "port": 8080}},
                        }
                    ],
                },
            },
        },
    }


def wait_ready(kubectl: Kubectl, pod: str, timeout_s: float = 60) -> None:
    """``kubectl wait`` answers NotFound for a pod not created yet: wait for it to exist first."""
    deadline = time.monotonic() + timeout_s
    while kubectl.run("get", "pod", pod, check=False).returncode != 0:
        assert time.monotonic() < deadline, f"pod {pod} was not created within {timeout_s} s"
        time.sleep(0.2)
    kubectl("wait", "--for=condition=Ready", f"pod/{pod}", f"--timeout={int(timeout_s)}s")


@pytest.fixture(scope="module")
def kubectl(bare_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kubectl]:
    home = tmp_path_factory.mktemp("kubectl-home")
    kubectl = Kubectl(tool_env(home, bare_cluster.kubeconfig))
    kubectl("apply", "-f", "-", input=yaml.safe_dump(statefulset("web")))
    wait_ready(kubectl, "web-0")
    yield kubectl


def test_discovery_has_short_names_and_categories(kubectl: Kubectl) -> None:
    rows = {r[0]: r for r in kubectl.table("api-resources") if len(r) == 5}
    assert rows["kvcaches"][1:] == ["kvc", "kvcache.dev/v1alpha1", "true", "KVCache"]
    assert rows["statefulsets"][1] == "sts"
    assert rows["customresourcedefinitions"][1] == "crd,crds"
    assert kubectl.table("get", "crd")[1][0] == "kvcaches.kvcache.dev"
    everything = kubectl("get", "all")  # the "all" category
    assert "pod/web-0" in everything and "statefulset.apps/web" in everything
    assert kubectl("get", "sts", "-o", "name").split() == ["statefulset.apps/web"]


WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget", "shortNames": ["wd"]},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "object", "properties": {"size": {"type": "integer"}}}
                        },
                    }
                },
                "additionalPrinterColumns": [{"name": "Size", "type": "integer", "jsonPath": ".spec.size"}],
            }
        ],
    },
}


def test_a_crd_applied_with_kubectl_is_served_like_the_kvcache_one(kubectl: Kubectl) -> None:
    kubectl("apply", "-f", "-", input=yaml.safe_dump(WIDGET_CRD))
    widget = {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": "w"},
        "spec": {"size": 3},
    }
    assert kubectl("apply", "-f", "-", input=yaml.safe_dump(widget)).strip() == "widget.example.com/w created"
    assert kubectl.table("get", "wd")[:2] == [["NAME", "SIZE"], ["w", "3"]]
    widget["spec"] = {"sise": 3}
    refused = kubectl.run("apply", "-f", "-", input=yaml.safe_dump(widget), check=False)
    assert refused.returncode == 1 and 'strict decoding error: unknown field "spec.sise"' in refused.stderr
    assert refused.stderr.count("unknown field") == 1  # apiVersion, kind, metadata are every object's


def test_apply_validates_on_the_server_with_the_served_openapi(kubectl: Kubectl, tmp_path: Path) -> None:
    bad = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "cm", "labelz": {}},
        "data": {"a": "b"},
    }
    refused = kubectl.run("apply", "-f", "-", input=yaml.safe_dump(bad), check=False)
    assert refused.returncode == 1
    assert (
        'ConfigMap in version "v1" cannot be handled as a ConfigMap: strict decoding error: '
        'unknown field "metadata.labelz"' in refused.stderr
    )
    cache = yaml.safe_load((REPO / "crds" / "samples" / "local-demo.yaml").read_text())
    cache["metadata"]["name"] = "invalid"
    cache["spec"]["replicas"] = -1
    invalid = kubectl.run("apply", "-f", "-", input=yaml.safe_dump(cache), check=False)
    assert invalid.returncode == 1
    assert invalid.stderr.startswith('The KVCache "invalid" is invalid: spec.replicas: '), invalid.stderr
    good = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "dry"}, "data": {"a": "b"}}
    assert "(server dry run)" in kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(good))
    assert kubectl.run("get", "cm", "dry", check=False).returncode == 1  # a dry run stores nothing
    assert "FIELD: replicas <integer>" in kubectl("explain", "kvc.spec.replicas")


def test_get_prints_the_server_side_columns(kubectl: Kubectl, bare_cluster: LocalCluster) -> None:
    rows = kubectl.table("get", "sts", "web")
    assert rows[0] == ["NAME", "READY", "AGE"] and rows[1][:2] == ["web", "1/1"]
    wide = kubectl.table("get", "pods", "web-0", "-o", "wide")
    assert wide[0][:7] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"]
    pod_ip = (bare_cluster.get("Pod", "web-0") or {})["status"]["podIP"]
    assert wide[1][:3] == ["web-0", "1/1", "Running"] and wide[1][5:7] == [pod_ip, "localcluster"]
    assert kubectl.table("get", "nodes")[1][:2] == ["localcluster", "Ready"]
    cache = yaml.safe_load((REPO / "crds" / "samples" / "local-demo.yaml").read_text())
    cache["metadata"]["name"] = "printed"
    kubectl("apply", "-f", "-", input=yaml.safe_dump(cache))
    crd = next(d for d in yaml.safe_load_all((REPO / "crds" / "kvcache.dev_kvcaches.yaml").read_text()) if d)
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    header = kubectl("get", "kvc", "printed", "-o", "wide").splitlines()[0].split()
    assert header == ["NAME"] + [c["name"].upper() for c in columns]  # no operator: the cells are empty
    kubectl("delete", "kvc", "printed")


def test_logs_follow_previous_and_tail(kubectl: Kubectl) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "crasher"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "c",
                    "image": "busybox",
                    "command": ["sh", "-c", "echo start $(date +%s%N); sleep 1; echo end; exit 3"],
                }
            ],
        },
    }
    kubectl("apply", "-f", "-", input=yaml.safe_dump(pod))
    deadline = time.monotonic() + 30
    while kubectl.run("get", "pod", "crasher", check=False).returncode != 0:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    kubectl("wait", "--for=jsonpath={.status.phase}=Running", "pod/crasher", "--timeout=30s")
    t0 = time.monotonic()
    followed = kubectl("logs", "-f", "crasher", timeout=30)  # returns when the run ends
    assert followed.startswith("start ") and followed.endswith("end\n") and time.monotonic() - t0 < 20
    deadline = time.monotonic() + 30
    while "start" not in kubectl.run("logs", "crasher", "--previous", check=False).stdout:
        assert time.monotonic() < deadline, "no previous run after 30 s"
        time.sleep(0.3)
    previous = kubectl("logs", "crasher", "--previous")
    current = kubectl("logs", "crasher")
    assert previous.startswith("start ") and current.startswith("start ") and previous != current
    assert kubectl("logs", "crasher", "--previous", "--tail=1") == "end\n"
    missing = kubectl.run("logs", "web-0", "--previous", check=False)
    assert missing.returncode == 1
    assert 'previous terminated container "web" in pod "web-0" not found' in missing.stderr
    kubectl("delete", "pod", "crasher", "--wait=false")


def test_exec_streams_exit_codes_stdin_and_the_container_environment(kubectl: Kubectl) -> None:
    result = kubectl.run("exec", "web-0", "--", "sh", "-c", "echo out; echo err >&2; exit 3", check=False)
    assert (result.returncode, result.stdout) == (3, "out\n")
    assert "err" in result.stderr and "command terminated with exit code 3" in result.stderr
    assert kubectl("exec", "-i", "web-0", "--", "cat", input="hello\n") == "hello\n"
    assert kubectl("exec", "web-0", "--", "printenv", "HOSTNAME") == "web-0\n"
    missing = kubectl.run("exec", "web-0", "--", "no-such-command", check=False)
    assert (
        missing.returncode == 127 and 'exec: "no-such-command": executable file not found' in missing.stdout
    )


def test_port_forward_relays_bytes_and_reports_a_closed_port(kubectl: Kubectl) -> None:
    kubectl("exec", "web-0", "--", "python", "-c", "import os; open('blob', 'wb').write(os.urandom(3 << 20))")
    digest = "import hashlib; print(hashlib.sha256(open('blob', 'rb').read()).hexdigest())"
    expected = kubectl("exec", "web-0", "--", "python", "-c", digest)
    with kubectl.port_forward("pod/web-0", 8080) as url:
        for _ in range(3):  # one connection after another through the same tunnel
            with urllib.request.urlopen(f"{url}/blob", timeout=30) as response:
                assert hashlib.sha256(response.read()).hexdigest() == expected.strip()
    with kubectl.port_forward("pod/web-0", 9999) as url, pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=10)


def test_a_containers_temp_files_stay_in_its_pod(
    kubectl: Kubectl, bare_cluster: LocalCluster, tmp_path: Path
) -> None:
    line = kubectl("logs", "web-0").splitlines()[0]
    tmp = Path(line.split("tmp=", 1)[1])
    assert tmp.is_relative_to(bare_cluster.state_dir / "pods"), line
    assert not tmp.is_relative_to(tempfile.gettempdir()) or tmp.is_relative_to(bare_cluster.state_dir)
    program = "import tempfile; f = tempfile.NamedTemporaryFile(delete=False); print(f.name)"
    written = kubectl("exec", "web-0", "--", "python", "-c", program)
    assert Path(written.strip()).parent == tmp and Path(written.strip()).exists()
    marker = f"/tmp/written-in-a-pod-{uuid.uuid4().hex}"  # an absolute path under the pod's /tmp
    kubectl("exec", "web-0", "--", "sh", "-c", f"echo hi > {marker}")
    assert not Path(marker).exists() and (tmp / Path(marker).name).read_text() == "hi\n"
    source = tmp_path / "cp-source"  # kubectl cp: tar through exec, into the pod's /tmp
    source.write_text("copied\n")
    kubectl("cp", str(source), "web-0:/tmp/copied")
    assert kubectl("exec", "web-0", "--", "cat", "/tmp/copied") == "copied\n"
    assert (tmp / "copied").read_text() == "copied\n" and not Path("/tmp/copied").exists()


def test_scale_and_wait_through_the_scale_subresource(kubectl: Kubectl) -> None:
    assert kubectl("scale", "sts", "web", "--replicas=2").strip() == "statefulset.apps/web scaled"
    wait_ready(kubectl, "web-1")
    assert json.loads(kubectl("get", "--raw", "/apis/apps/v1/namespaces/default/statefulsets/web/scale"))[
        "spec"
    ] == {"replicas": 2}
    kubectl("scale", "sts", "web", "--replicas=1")


def test_reapplying_a_statefulset_merges_its_lists_by_key(kubectl: Kubectl) -> None:
    ports = [{"name": "http", "containerPort": 8080}, {"name": "metrics", "containerPort": 9090}]
    assert "configured" in kubectl("apply", "-f", "-", input=yaml.safe_dump(statefulset("web", ports=ports)))
    kubectl("set", "image", "sts/web", "web=python:3.12")
    kubectl("rollout", "status", "sts/web", "--timeout=60s")
    containers = json.loads(kubectl("get", "sts", "web", "-o", "json"))["spec"]["template"]["spec"][
        "containers"
    ]
    assert [(c["name"], c["image"]) for c in containers] == [("web", "python:3.12")]
    assert containers[0]["ports"] == ports and containers[0]["command"][0] == "python"
