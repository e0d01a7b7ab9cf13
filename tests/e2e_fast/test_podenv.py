"""How the local kubelet turns a container spec into a host process (pure functions)."""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e.localcluster import podenv

MOUNTS = {"/etc/kvcache": "/s/cfg", "/var/lib/kvcache": "/s/pvc", "/tmp": "/s/tmp"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/etc/kvcache/config.yaml", "/s/cfg/config.yaml"),
        ("--config=/etc/kvcache/config.yaml", "--config=/s/cfg/config.yaml"),
        ("persistencePath: /var/lib/kvcache/cache\n", "persistencePath: /s/pvc/cache\n"),
        ('{"path": "/tmp"}', '{"path": "/s/tmp"}'),
        ("/var/lib/kvcachex", "/var/lib/kvcachex"),  # not a path boundary
        ("/x/tmp/y", "/x/tmp/y"),  # not a path start
        ("/tmpfile", "/tmpfile"),
    ],
)
def test_remap_paths_rewrites_mount_prefixes_at_path_boundaries(text: str, expected: str) -> None:
    assert podenv.remap_paths(text, MOUNTS) == expected


def test_remap_paths_is_one_pass_even_when_host_paths_contain_mount_paths() -> None:
    mounts = {"/tmp": "/tmp/localcluster-1/pod/tmp", "/data": "/tmp/localcluster-1/pvc"}
    assert (
        podenv.remap_paths("/tmp/a /data/b", mounts)
        == "/tmp/localcluster-1/pod/tmp/a /tmp/localcluster-1/pvc/b"
    )


def test_rewrite_hosts_pod_addresses_and_service_names() -> None:
    names = {"demo.ns.svc": "127.9.9.2", "demo-0.demo-headless.ns.svc": "127.9.9.5"}

    def fix(text: str) -> str:
        return podenv.rewrite_hosts(text, "127.9.9.7", names.get)

    assert fix("0.0.0.0") == "127.9.9.7"
    assert fix("http://127.0.0.1:8080") == "http://127.9.9.7:8080"
    assert fix("http://localhost:8080/x") == "http://127.9.9.7:8080/x"
    assert fix("--url http://demo-0.demo-headless.ns.svc:8080 ") == "--url http://127.9.9.5:8080 "
    assert fix("http://demo.ns.svc.cluster.local:8080") == "http://127.9.9.2:8080"
    assert fix("http://other.ns.svc:80") == "http://other.ns.svc:80"  # unknown: left alone
    assert fix("10.0.0.0") == "10.0.0.0"


def test_expand_vars_follows_kubernetes_rules() -> None:
    env = {"A": "1", "B": "two"}
    assert podenv.expand_vars("$(A)-$(B)-$(C)-$$(A)", env) == "1-two-$(C)-$(A)"


def test_container_argv_uses_command_or_the_image_entrypoint() -> None:
    assert podenv.container_argv({"command": ["a"], "args": ["b"]}, {}) == ["a", "b"]
    entry = podenv.DEFAULT_ENTRYPOINTS
    argv = podenv.container_argv({"image": "ghcr.io/x/kvcache-engine:0.1.0", "args": ["serve"]}, entry)
    assert argv == ["kvcache-engine", "serve"]
    with pytest.raises(ValueError, match="no command and no local entrypoint for image 'busybox'"):
        podenv.container_argv({"name": "c", "image": "busybox"}, entry)


def test_resolve_executable_prefers_the_venv(tmp_path: Path) -> None:
    (tmp_path / "kvcache-engine").write_text("")
    assert podenv.resolve_executable("/opt/venv/bin/kvcache-engine", tmp_path) == str(
        tmp_path / "kvcache-engine"
    )


def test_quantities_and_resource_field_refs() -> None:
    assert podenv.parse_quantity("512Mi") == 512 * 2**20
    assert podenv.parse_quantity("250m") == 0.25
    container = {"resources": {"limits": {"memory": "1Gi", "cpu": "1500m"}}}
    assert podenv.resource_field_ref(container, {"resource": "limits.memory", "divisor": "1Mi"}) == "1024"
    assert podenv.resource_field_ref(container, {"resource": "limits.cpu"}) == "2"  # ceil, like the kubelet
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        podenv.parse_quantity("lots")


def test_ip_pool_hands_out_distinct_loopback_addresses() -> None:
    pool = podenv.IPPool("127.33.44")
    a, b = pool.allocate(), pool.allocate()
    assert a != b and a.startswith("127.33.44.")
    pool.release(a)
    assert pool.allocate() != a  # a released address is reused last
    with pytest.raises(ValueError, match="ip prefix"):
        podenv.IPPool("10.0.0")
