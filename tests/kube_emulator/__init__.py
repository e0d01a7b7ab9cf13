"""A Kubernetes API emulator good enough for Kopf, built on kmock's ``KubernetesEmulator``.

Use it as a context manager together with kmock's ``Server``::

    async with KubeEmulator() as emu, kmock.Server(emu) as server:
        emu.register("kvcache.dev/v1alpha1/kvcaches", kind="KVCache", subresources=("status", "scale"))
        emu.create("v1/configmaps", {"metadata": {"name": "c", "namespace": "ns"}})
        kubeconfig = write_kubeconfig(tmp_path, server.url)

See ``emulator.py`` for what it adds on top of kmock and what it deliberately leaves out.
"""

from tests.kube_emulator.emulator import (
    DEFAULT_RESOURCES,
    Fault,
    KubeEmulator,
    ResourceSpec,
    match_labels,
    write_kubeconfig,
)

__all__ = [
    "DEFAULT_RESOURCES",
    "Fault",
    "KubeEmulator",
    "ResourceSpec",
    "match_labels",
    "write_kubeconfig",
]
