"""Pure manifest builders: one KVCache → the dict manifests of its children (no API calls).

Contract for the operator (H5)::

    build_children(
        kvcache: Mapping[str, Any] | KVCache,   # the custom object (kopf body as a dict) or a parsed model
        *,
        replicas: int | None = None,            # engine replicas to render; None = spec.replicas
                                                # (with autoscaling Auto the operator passes its own count)
        token: str | None = None,               # generated API token; None = a fresh random one
                                                # (only used when spec.auth.existingSecret is unset)
        admin_token: str | None = None,         # the generated <name>-admin-token; None = random
        live_overrides: LiveConfig | None = None,
                                                # tuned live fields (contract.LiveConfig)
                                                # rendered into the engine ConfigMap; they never change
                                                # the pod template's config hash (so no restart)
    ) -> list[dict[str, Any]]

Raises ``api.SpecError`` (a ValueError) naming the field (``spec.autoscaling.minReplicas: ...``).
Every child carries ``metadata.namespace`` and the ``app.kubernetes.io/*`` labels; owner references are
NOT set here (the caller adds them). Children annotated ``kvcache.dev/create-only: "true"`` (the
generated token Secrets) must be created when missing and never patched; children annotated
``kvcache.dev/retain-on-delete: "true"`` (backup PVC with backup.onDelete=Retain) must not get an owner
reference. The pod template annotation ``kvcache.dev/config-hash`` covers only restart-requiring config.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import secrets
import shlex
from collections.abc import Mapping
from typing import Any

import yaml

from kvcache_engine.contract import (
    LIVE_FIELDS,
    WARM_GATE,
    KVCacheConfig,
    LiveConfig,
    ShardMap,
    persist_grace_seconds,
    pool_bytes,
    tier_bytes,
)
from kvcache_operator import api
from kvcache_operator.api import KVCache, KVCacheSpec

Manifest = dict[str, Any]

_YAML_DUMPER: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
CONFIG_DIR = "/etc/kvcache"
CONFIG_FILE = f"{CONFIG_DIR}/config.yaml"
TOKEN_DIR = "/var/run/kvcache/token"
TOKEN_FILE = f"{TOKEN_DIR}/token"
ADMIN_TOKEN_DIR = "/var/run/kvcache/admin-token"
ADMIN_TOKEN_FILE = f"{ADMIN_TOKEN_DIR}/token"
ADMIN_TOKEN_KEY = "token"
DATA_DIR = "/var/lib/kvcache"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"  # the Kubernetes default, named explicitly
BACKUP_DIR = "/backups"
STAGING_DIR = "/staging"
"""Object-store backups: one replica's snapshot is staged here, uploaded, then removed."""
S3_CA_DIR = "/etc/kvcache-s3-ca"
PERSIST_DIR = f"{DATA_DIR}/cache"
"""The engine's persistence_path on its PVC (where a restore init container writes a backup)."""
RESTORE_BACKUPS_DIR = "/restore-backups"
RESTORE_CONTAINER = "restore"
RUN_AS_USER = 10001
CONNECTION_FORMAT_VERSION = 1
CONFIG_HASH_ANNOTATION = "kvcache.dev/config-hash"
CREATE_ONLY_ANNOTATION = "kvcache.dev/create-only"
RETAIN_ANNOTATION = "kvcache.dev/retain-on-delete"
METRICS_LABEL = "kvcache.dev/metrics"


# --- names and labels ----------------------------------------------------------------------------


def headless_service_name(name: str) -> str:
    return f"{name}-headless"


def admin_token_secret_name(kvc: KVCache) -> str:
    """``<name>-admin-token``: the admin role's token (docs/security.md), always the operator's own;
    held by the engines, the operator and the backup Job, never named in ``<name>-connection``."""
    return f"{kvc.name}-admin-token"


def token_secret_name(kvc: KVCache) -> str:
    return kvc.spec.auth.existing_secret or f"{kvc.name}-token"


def backup_claim_name(kvc: KVCache) -> str:
    return kvc.spec.backup.claim_name or f"{kvc.name}-backups"


def selector_labels(name: str, component: str = "engine") -> dict[str, str]:
    """Labels that select one KVCache's pods of one component (immutable in a StatefulSet)."""
    return {
        "app.kubernetes.io/name": "kvcache",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
    }


def labels(name: str, component: str = "engine") -> dict[str, str]:
    """Every child's labels: the selector labels plus managed-by and part-of."""
    return {
        **selector_labels(name, component),
        "app.kubernetes.io/managed-by": "kvcache-operator",
        "app.kubernetes.io/part-of": "kvcache",
    }


def selector_string(name: str) -> str:
    """The engine pods' label selector as ``status.selector`` (scale subresource) wants it."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(name).items())


def _meta(kvc: KVCache, name: str, component: str, **extra: Any) -> Manifest:
    return {"name": name, "namespace": kvc.namespace, "labels": labels(kvc.name, component), **extra}


def pod_url(kvc: KVCache, ordinal: int) -> str:
    """Stable URL of one replica through the headless Service."""
    host = f"{kvc.name}-{ordinal}.{headless_service_name(kvc.name)}.{kvc.namespace}.svc"
    return f"http://{host}:{api.ENGINE_PORT}"


# --- engine config --------------------------------------------------------------------------------


def as_live(values: LiveConfig | Mapping[str, Any] | None) -> LiveConfig:
    """Tuned live values as a LiveConfig (a mapping may use either case); SpecError naming a field
    that is not live."""
    if isinstance(values, LiveConfig):
        return values
    try:
        return LiveConfig.parse(dict(values or {}), "live_overrides")
    except ValueError as exc:
        raise api.SpecError(str(exc)) from exc


def engine_config(
    kvc: KVCache, live_overrides: LiveConfig | Mapping[str, Any] | None = None
) -> KVCacheConfig:
    """spec.cache as the engine runs it in a pod: paths point at the mounts, an ``auto`` device is
    resolved from the GPU request, tuned live fields (``live_overrides``) applied."""
    spec = kvc.spec
    update: dict[str, Any] = {}
    if spec.persistence.enabled:
        update["persistence_path"] = PERSIST_DIR
    if spec.model is not None:
        update["model_path"] = "/".join(p for p in (spec.model.mount_path.rstrip("/"), spec.model.path) if p)
    if spec.cache.device == "auto":
        update["device"] = "cuda" if spec.resources.gpus > 0 else "cpu"
    base = KVCacheConfig.model_validate({**spec.cache.model_dump(), **update})
    try:
        return as_live(live_overrides).apply(base, "live_overrides")
    except ValueError as exc:
        raise api.SpecError(str(exc)) from exc


def config_hash(config: KVCacheConfig) -> str:
    """Hash of the restart-requiring config: live fields (config.LIVE_FIELDS) are excluded, so
    retuning them never rolls the pods."""
    restart = {k: v for k, v in config.model_dump(mode="json").items() if k not in LIVE_FIELDS}
    return hashlib.sha256(json.dumps(restart, sort_keys=True).encode()).hexdigest()[:16]


def build_configmap(kvc: KVCache, config: KVCacheConfig) -> Manifest:
    """``<name>-config``: the engine's config file (camelCase, every field)."""
    # libyaml's emitter when present: the same text, ~5x faster (the operator renders this per change)
    text = yaml.dump(config.to_file_dict(), Dumper=_YAML_DUMPER, sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(kvc, f"{kvc.name}-config", "engine"),
        "data": {"config.yaml": text},
    }


def build_token_secret(kvc: KVCache, token: str | None) -> Manifest | None:
    """``<name>-token`` with a random token, unless spec.auth.existingSecret names one. Create-only."""
    if kvc.spec.auth.existing_secret is not None:
        return None
    value = token if token is not None else secrets.token_urlsafe(32)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _meta(
            kvc, token_secret_name(kvc), "engine", annotations={CREATE_ONLY_ANNOTATION: "true"}
        ),
        "data": {kvc.spec.auth.secret_key: base64.b64encode(value.encode()).decode()},
    }


def build_admin_token_secret(kvc: KVCache, token: str | None = None) -> Manifest:
    """``<name>-admin-token`` with a random token (``token``: a fixed one, for tests). Create-only."""
    value = token if token is not None else secrets.token_urlsafe(32)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _meta(
            kvc, admin_token_secret_name(kvc), "engine", annotations={CREATE_ONLY_ANNOTATION: "true"}
        ),
        "data": {ADMIN_TOKEN_KEY: base64.b64encode(value.encode()).decode()},
    }


# --- services -------------------------------------------------------------------------------------


def _service_ports() -> list[Manifest]:
    return [{"name": "http", "port": api.ENGINE_PORT, "targetPort": "http", "protocol": "TCP"}]


def build_headless_service(kvc: KVCache) -> Manifest:
    """Per-pod DNS names for the StatefulSet; lists not-ready pods too (peers drain to each other)."""
    meta = _meta(kvc, headless_service_name(kvc.name), "engine")
    meta["labels"][METRICS_LABEL] = "true"
    spec = {
        "clusterIP": "None",
        "publishNotReadyAddresses": True,
        "selector": selector_labels(kvc.name),
        "ports": _service_ports(),
    }
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def build_client_service(kvc: KVCache) -> Manifest:
    """``<name>``: the ClusterIP Service clients connect to (ready pods only)."""
    spec = {"type": "ClusterIP", "selector": selector_labels(kvc.name), "ports": _service_ports()}
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(kvc, kvc.name, "engine"), "spec": spec}


# --- the engine StatefulSet ----------------------------------------------------------------------------


def container_security_context() -> Manifest:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> Manifest:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def engine_resources(spec: KVCacheSpec) -> Manifest:
    """Requests/limits: memory from the engine's pool formula (api.memory_request_bytes), limit =
    request (an engine over its pool is a bug, not a burst); GPUs as limits."""
    memory = api.format_mebibytes(api.memory_request_bytes(spec))
    res = spec.resources
    requests: dict[str, str] = {"cpu": res.cpu, "memory": memory}
    limits: dict[str, str] = {"memory": memory}
    if res.cpu_limit is not None:
        limits["cpu"] = res.cpu_limit
    if res.gpus > 0:
        limits[res.gpu_resource_name] = str(res.gpus)
    return {"requests": requests, "limits": limits}


def _probe(path: str, period: int, failures: int) -> Manifest:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def engine_command() -> list[str]:
    return [
        "kvcache-engine",
        "serve",
        "--config",
        CONFIG_FILE,
        "--host",
        "0.0.0.0",
        "--port",
        str(api.ENGINE_PORT),
        "--token-file",
        TOKEN_FILE,
        "--admin-token-file",
        ADMIN_TOKEN_FILE,
        "--staging-mb",
        str(api.ENGINE_STAGING_MB),  # counted in the memory request (api.memory_request_bytes)
    ]


def _engine_mounts(kvc: KVCache) -> list[Manifest]:
    mounts: list[Manifest] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
        {"name": "admin-token", "mountPath": ADMIN_TOKEN_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if kvc.spec.persistence.enabled:
        mounts.append({"name": "data", "mountPath": DATA_DIR})
    if kvc.spec.model is not None:
        mounts.append({"name": "model", "mountPath": kvc.spec.model.mount_path, "readOnly": True})
    return mounts


def build_engine_container(kvc: KVCache) -> Manifest:
    """The engine: ``kvcache-engine serve``, probes on /healthz and /readyz (503 until the persisted
    cache is loaded), and a preStop persist when persistence is on."""
    spec = kvc.spec
    container: Manifest = {
        "name": "engine",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": engine_command() + (["--auth-metrics"] if spec.metrics.auth else []),
        "ports": [{"name": "http", "containerPort": api.ENGINE_PORT, "protocol": "TCP"}],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "HOME", "value": "/tmp"},
            # serve writes why it could not start here; the kubelet puts it in lastState.terminated
            {"name": "KVCACHE_TERMINATION_MESSAGE_PATH", "value": TERMINATION_MESSAGE_PATH},
        ],
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": engine_resources(spec),
        # startup covers loading a large persisted cache (up to 10 minutes) before liveness applies.
        "startupProbe": _probe("/healthz", 5, 120),
        "readinessProbe": _probe("/readyz", 5, 3),
        "livenessProbe": _probe("/healthz", 10, 6),
        "securityContext": container_security_context(),
        "volumeMounts": _engine_mounts(kvc),
    }
    if spec.persistence.enabled:
        persist = [
            "kvcache-engine",
            "persist",
            "--url",
            f"http://127.0.0.1:{api.ENGINE_PORT}",
            "--token-file",
            ADMIN_TOKEN_FILE,  # persist is an admin call
        ]
        container["lifecycle"] = {"preStop": {"exec": {"command": persist}}}
    return container


def _token_volume(kvc: KVCache) -> Manifest:
    items = [{"key": kvc.spec.auth.secret_key, "path": "token"}]
    secret = {"secretName": token_secret_name(kvc), "items": items, "defaultMode": 0o440}
    return {"name": "token", "secret": secret}


def _admin_token_volume(kvc: KVCache, name: str = "admin-token") -> Manifest:
    items = [{"key": ADMIN_TOKEN_KEY, "path": "token"}]
    secret = {"secretName": admin_token_secret_name(kvc), "items": items, "defaultMode": 0o440}
    return {"name": name, "secret": secret}


def _engine_volumes(kvc: KVCache) -> list[Manifest]:
    volumes = [
        {"name": "config", "configMap": {"name": f"{kvc.name}-config"}},
        _token_volume(kvc),
        _admin_token_volume(kvc),
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
    ]
    if kvc.spec.model is not None:
        claim = {"claimName": kvc.spec.model.claim_name, "readOnly": True}
        volumes.append({"name": "model", "persistentVolumeClaim": claim})
    return volumes


def _scheduling(spec: KVCacheSpec) -> Manifest:
    sched = spec.scheduling
    out: Manifest = {}
    if sched.node_selector:
        out["nodeSelector"] = dict(sched.node_selector)
    if sched.tolerations:
        out["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in sched.tolerations]
    if sched.affinity:
        out["affinity"] = sched.affinity
    if sched.topology_spread_constraints:
        out["topologySpreadConstraints"] = sched.topology_spread_constraints
    if sched.priority_class_name:
        out["priorityClassName"] = sched.priority_class_name
    return out


def restore_store(kvc: KVCache) -> api.ObjectStore | None:
    """The object store ``spec.restore`` reads (its own, else the backups'); None: the backup PVC."""
    restore = kvc.spec.restore
    if restore is None:
        return None
    return restore.object_store or kvc.spec.backup.object_store


def restore_script(kvc: KVCache) -> str:
    """The restore init container's script: replica ``i`` (from the pod name) writes backup
    ``fromBackup`` of ``<source>-i`` into its data directory unless it already holds a cache, and
    reports what it did in its termination message (read back into ``status.restored``)."""
    restore = kvc.spec.restore
    assert restore is not None
    source = restore.source_name or kvc.name
    args = [
        "kvcache-engine", "restore", "--from", restore.from_backup, "--to-dir", PERSIST_DIR, "--if-empty",
        "--report-file", TERMINATION_MESSAGE_PATH, "--staging", DATA_DIR,
    ]  # fmt: skip
    store = restore_store(kvc)
    if store is None:
        line = f'{shlex.join(args)} --backup-root {RESTORE_BACKUPS_DIR}/{shlex.quote(source)}-"$i"'
    else:
        args += object_store_args(kvc, store, None, source)
        line = f'{shlex.join(args)} --replica {shlex.quote(source)}-"$i"'
    return f'i="${{POD_NAME##*-}}"\nexec {line}\n'


def build_restore_container(kvc: KVCache) -> Manifest | None:
    """The init container of ``spec.restore`` (None without it): before the engine starts, so the
    engine loads the restored cache before it reports ready."""
    if kvc.spec.restore is None:
        return None
    store = restore_store(kvc)
    mounts: list[Manifest] = [{"name": "data", "mountPath": DATA_DIR}, {"name": "tmp", "mountPath": "/tmp"}]
    if store is None:
        mounts.append({"name": "restore-backups", "mountPath": RESTORE_BACKUPS_DIR, "readOnly": True})
    elif store.tls.ca_secret_name is not None:
        mounts.append({"name": "s3-ca", "mountPath": S3_CA_DIR, "readOnly": True})
    container: Manifest = {
        "name": RESTORE_CONTAINER,
        "image": kvc.spec.image,
        "imagePullPolicy": kvc.spec.image_pull_policy,
        "command": ["sh", "-c", restore_script(kvc)],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "HOME", "value": "/tmp"},
            *(object_store_env(store) if store is not None else []),
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": container_security_context(),
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        # a failure exits before writing the report: the kubelet then keeps the log's last lines
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": mounts,
    }
    return container


def _restore_volumes(kvc: KVCache) -> list[Manifest]:
    restore = kvc.spec.restore
    if restore is None:
        return []
    store = restore_store(kvc)
    if store is None:
        claim = restore.claim_name or f"{restore.source_name or kvc.name}-backups"
        return [{"name": "restore-backups", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}]
    if store.tls.ca_secret_name is not None:
        return [{"name": "s3-ca", "secret": {"secretName": store.tls.ca_secret_name}}]
    return []


def grace_period_seconds(kvc: KVCache, config: KVCacheConfig) -> int:
    """``terminationGracePeriodSeconds``: the spec's, raised with persistence on to what a final
    persist of a full cache needs (contract.persist_grace_seconds), so SIGTERM's persist finishes."""
    grace = kvc.spec.termination_grace_period_seconds
    if kvc.spec.persistence.enabled:
        grace = max(grace, persist_grace_seconds(pool_bytes(config) + tier_bytes(config)))
    return grace


def build_pod_template(kvc: KVCache, config: KVCacheConfig) -> Manifest:
    spec: Manifest = {
        "serviceAccountName": "default",
        "automountServiceAccountToken": False,
        # Ready (routed to) only once the operator had the peers copy it its share (warm join)
        "readinessGates": [{"conditionType": WARM_GATE}],
        "terminationGracePeriodSeconds": grace_period_seconds(kvc, config),
        "securityContext": pod_security_context(),
        "containers": [build_engine_container(kvc)],
        "volumes": _engine_volumes(kvc) + _restore_volumes(kvc),
        **_scheduling(kvc.spec),
    }
    restore = build_restore_container(kvc)
    if restore is not None:
        spec["initContainers"] = [restore]
    meta = {"labels": labels(kvc.name), "annotations": {CONFIG_HASH_ANNOTATION: config_hash(config)}}
    return {"metadata": meta, "spec": spec}


def _data_claim_template(kvc: KVCache) -> Manifest:
    persistence = kvc.spec.persistence
    spec: Manifest = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": persistence.size}},
    }
    if persistence.storage_class_name is not None:
        spec["storageClassName"] = persistence.storage_class_name
    return {"metadata": {"name": "data", "labels": labels(kvc.name)}, "spec": spec}


def build_statefulset(kvc: KVCache, config: KVCacheConfig, replicas: int) -> Manifest:
    """``<name>``: one engine per pod, a PVC per replica when persistence is on."""
    persistence = kvc.spec.persistence
    spec: Manifest = {
        "replicas": replicas,
        "serviceName": headless_service_name(kvc.name),
        "selector": {"matchLabels": selector_labels(kvc.name)},
        # Engines are independent: start and stop them in parallel.
        "podManagementPolicy": "Parallel",
        "updateStrategy": {"type": "RollingUpdate"},
        "template": build_pod_template(kvc, config),
    }
    if persistence.enabled:
        spec["volumeClaimTemplates"] = [_data_claim_template(kvc)]
        spec["persistentVolumeClaimRetentionPolicy"] = {
            "whenDeleted": persistence.when_deleted.value,
            "whenScaled": persistence.when_scaled.value,
        }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(kvc, kvc.name, "engine"),
        "spec": spec,
    }


# --- backups ----------------------------------------------------------------------------------------


def object_store_args(
    kvc: KVCache, store: api.ObjectStore, ordinal: int | None, source: str | None = None
) -> list[str]:
    """``kvcache-engine backup|restore`` arguments that address replica ``ordinal``'s folder in the
    object store (``<prefix>/<kvcache>/<kvcache>-<ordinal>/``, ``<kvcache>`` = ``source`` or this
    one); credentials come from the environment. ``ordinal`` None: no ``--replica`` (the caller adds
    one computed in the pod)."""
    name = source or kvc.name
    args = [
        "--s3-endpoint", store.endpoint, "--s3-bucket", store.bucket,
        "--s3-prefix", "/".join(p for p in (store.prefix.strip("/"), name) if p),
        "--s3-region", store.region, "--s3-part-size-mb", str(store.part_size_mb),
    ]  # fmt: skip
    if ordinal is not None:
        args += ["--replica", f"{name}-{ordinal}"]
    if store.tls.ca_secret_name is not None:
        args += ["--s3-ca-file", f"{S3_CA_DIR}/{store.tls.ca_key}"]
    if store.tls.insecure_skip_verify:
        args.append("--s3-insecure-skip-verify")
    return args


def object_store_env(store: api.ObjectStore) -> list[Manifest]:
    """The access keys from ``credentials.secretName``, as the AWS SDK variables the CLI reads."""
    creds = store.credentials
    pairs = [
        ("AWS_ACCESS_KEY_ID", creds.access_key_id_key),
        ("AWS_SECRET_ACCESS_KEY", creds.secret_access_key_key),
    ]
    if creds.session_token_key is not None:
        pairs.append(("AWS_SESSION_TOKEN", creds.session_token_key))
    return [
        {"name": env, "valueFrom": {"secretKeyRef": {"name": creds.secret_name, "key": key}}}
        for env, key in pairs
    ]


def backup_script(kvc: KVCache, replicas: int) -> str:
    """Back up every replica; one failure does not stop the others, but fails the Job."""
    keep = kvc.spec.backup.keep
    store = kvc.spec.backup.object_store
    lines = ["rc=0"]
    for i in range(replicas):
        dest = f"{BACKUP_DIR}/{kvc.name}-{i}" if store is None else STAGING_DIR
        args = [
            "kvcache-engine",
            "backup",
            "--url",
            pod_url(kvc, i),
            "--dest",
            dest,
            "--keep",
            str(keep),
            "--token-file",
            TOKEN_FILE,
        ]
        if store is not None:
            args += object_store_args(kvc, store, i)
        lines.append(f"{shlex.join(args)} || rc=1")
    lines.append("exit $rc")
    return "\n".join(lines) + "\n"


def build_backup_cronjob(kvc: KVCache, replicas: int) -> Manifest | None:
    """``<name>-backup``: streams each replica's snapshot into the backup PVC or, staged one replica at a
    time, into the object store (Forbid: one run at a time)."""
    backup = kvc.spec.backup
    if not backup.enabled:
        return None
    store = backup.object_store
    mounts: list[Manifest] = [
        {"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    # the Job's calls (snapshot, persist) are admin calls: its "token" volume holds the admin token
    volumes: list[Manifest] = [
        _admin_token_volume(kvc, "token"),
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
    ]
    if store is None:
        mounts.insert(0, {"name": "backups", "mountPath": BACKUP_DIR})
        volumes.insert(0, {"name": "backups", "persistentVolumeClaim": {"claimName": backup_claim_name(kvc)}})
    else:
        # one replica staged at a time (removed after its upload): at most one replica's cache
        mounts.insert(0, {"name": "staging", "mountPath": STAGING_DIR})
        volumes.insert(0, {"name": "staging", "emptyDir": {"sizeLimit": kvc.spec.persistence.size}})
        if store.tls.ca_secret_name is not None:
            mounts.append({"name": "s3-ca", "mountPath": S3_CA_DIR, "readOnly": True})
            volumes.append({"name": "s3-ca", "secret": {"secretName": store.tls.ca_secret_name}})
    container: Manifest = {
        "name": "backup",
        "image": kvc.spec.image,
        "imagePullPolicy": kvc.spec.image_pull_policy,
        "command": ["sh", "-c", backup_script(kvc, replicas)],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
    }
    if store is not None:
        container["env"] = object_store_env(store)
    pod_spec = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    job_spec = {
        "backoffLimit": backup.backoff_limit,
        "activeDeadlineSeconds": backup.active_deadline_seconds,
        "template": {"metadata": {"labels": labels(kvc.name, "backup")}, "spec": pod_spec},
    }
    spec = {
        "schedule": backup.cron,
        "suspend": backup.suspend,
        "concurrencyPolicy": "Forbid",
        "startingDeadlineSeconds": backup.starting_deadline_seconds,
        "successfulJobsHistoryLimit": backup.successful_jobs_history_limit,
        "failedJobsHistoryLimit": backup.failed_jobs_history_limit,
        "jobTemplate": {"metadata": {"labels": labels(kvc.name, "backup")}, "spec": job_spec},
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": _meta(kvc, f"{kvc.name}-backup", "backup"),
        "spec": spec,
    }


def build_backup_pvc(kvc: KVCache) -> Manifest | None:
    """The backup PVC (none with an object store); with backup.onDelete=Retain it is annotated so the
    caller does not own it."""
    backup = kvc.spec.backup
    if not backup.enabled or backup.object_store is not None:
        return None
    spec: Manifest = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": backup.size}}}
    if backup.storage_class_name is not None:
        spec["storageClassName"] = backup.storage_class_name
    meta = _meta(kvc, backup_claim_name(kvc), "backup")
    if backup.on_delete == api.Retention.RETAIN:
        meta["annotations"] = {RETAIN_ANNOTATION: "true"}
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def restore_job_script(kvc: KVCache, replicas: int, from_backup: str, source: str | None = None) -> str:
    """Restore every running replica ``i`` from backup ``from_backup`` of ``<source>-i`` (default:
    this KVCache's own), streamed into the live engine; one failure does not stop the others."""
    store = kvc.spec.backup.object_store
    name = source or kvc.name
    lines = ["rc=0"]
    for i in range(replicas):
        args = [
            "kvcache-engine", "restore", "--url", pod_url(kvc, i), "--token-file", TOKEN_FILE,
            "--from", from_backup,
        ]  # fmt: skip
        if store is None:
            args += ["--backup-root", f"{BACKUP_DIR}/{name}-{i}"]
        else:
            args += ["--staging", STAGING_DIR, *object_store_args(kvc, store, i, name)]
        lines.append(f"{shlex.join(args)} || rc=1")
    lines.append("exit $rc")
    return "\n".join(lines) + "\n"


def build_restore_job(
    kvc: KVCache, replicas: int, from_backup: str, job_name: str, source: str | None = None
) -> Manifest:
    """A one-off Job (``kubectl kvcache restore``) that streams a backup into the running engines:
    the backup CronJob's pod (token, backup PVC or object-store keys and CA) with a restore script.
    ValueError when the KVCache has no backups configured."""
    cronjob = build_backup_cronjob(kvc, replicas)
    if cronjob is None:
        raise ValueError(
            f"KVCache {kvc.namespace}/{kvc.name} has no spec.backup: enable backups (a PVC or "
            "spec.backup.objectStore) so the restore knows where the backups are"
        )
    job_spec = copy.deepcopy(cronjob["spec"]["jobTemplate"]["spec"])
    container = job_spec["template"]["spec"]["containers"][0]
    container["name"] = "restore"
    container["command"] = ["sh", "-c", restore_job_script(kvc, replicas, from_backup, source)]
    job_spec["template"]["metadata"]["labels"] = labels(kvc.name, "restore")
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(kvc, job_name, "restore"),
        "spec": job_spec,
    }


# --- availability, monitoring, network ---------------------------------------------------------------


def build_pdb(kvc: KVCache) -> Manifest:
    """At most one engine voluntarily disrupted at a time (each holds a shard of the prefixes)."""
    spec = {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(kvc.name)}}
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(kvc, kvc.name, "engine"),
        "spec": spec,
    }


def build_service_monitor(kvc: KVCache) -> Manifest | None:
    """A prometheus-operator ServiceMonitor on the headless Service (one target per pod)."""
    metrics = kvc.spec.metrics
    if not metrics.service_monitor:
        return None
    meta = _meta(kvc, kvc.name, "engine")
    meta["labels"].update(metrics.service_monitor_labels)
    credentials = {"name": token_secret_name(kvc), "key": kvc.spec.auth.secret_key}
    endpoint = {
        "port": "http",
        "path": "/metrics",
        "interval": metrics.scrape_interval,
        "authorization": {"type": "Bearer", "credentials": credentials},
        # The `kvcache` label the Grafana dashboard groups by (same as the chart's PodMonitor).
        "relabelings": [
            {
                "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
                "targetLabel": "kvcache",
            }
        ],
    }
    selector = {"matchLabels": {**selector_labels(kvc.name), METRICS_LABEL: "true"}}
    spec = {
        "selector": selector,
        "namespaceSelector": {"matchNames": [kvc.namespace]},
        "endpoints": [endpoint],
    }
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": meta,
        "spec": spec,
    }


def _peers(kvc: KVCache) -> list[Manifest]:
    np = kvc.spec.network_policy
    same_instance = {
        "matchLabels": {"app.kubernetes.io/instance": kvc.name, "app.kubernetes.io/name": "kvcache"}
    }
    client: Manifest = {"podSelector": {"matchLabels": dict(np.client_pod_selector)}}
    if np.client_namespace_selector is not None:
        client["namespaceSelector"] = {"matchLabels": dict(np.client_namespace_selector)}
    operator_ns = {"matchLabels": {"kubernetes.io/metadata.name": np.operator_namespace}}
    peers = [{"podSelector": same_instance}, client, {"namespaceSelector": operator_ns}]
    if np.metrics_namespace_selector is not None:
        peers.append({"namespaceSelector": {"matchLabels": dict(np.metrics_namespace_selector)}})
    return peers


def build_network_policy(kvc: KVCache) -> Manifest | None:
    """Ingress to the engines' port from clients, the operator, Prometheus and the cache's own pods."""
    if not kvc.spec.network_policy.enabled:
        return None
    ingress = [{"from": _peers(kvc), "ports": [{"protocol": "TCP", "port": api.ENGINE_PORT}]}]
    spec = {
        "podSelector": {"matchLabels": selector_labels(kvc.name)},
        "policyTypes": ["Ingress"],
        "ingress": ingress,
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(kvc, kvc.name, "engine"),
        "spec": spec,
    }


# --- the connection contract (issue 9) ---------------------------------------------------------------


def connection_info(kvc: KVCache, config: KVCacheConfig, shard_map: ShardMap | None = None) -> dict[str, Any]:
    """What an inference client needs to connect (``connection.json`` in ``<name>-connection``).

    Keys (format version 1): formatVersion, name, namespace, url (client Service), service,
    headlessService, port, tokenSecretName, tokenSecretKey, numLayers, numKvHeads, headDim,
    blockTokens, dtype, codec, cacheNamespace (the model/namespace key mixed into block hashes),
    routeDepth (placement: chains are sharded by their block at this depth; engines drain by it too);
    once a replica is warm, the shard map: shardMapEpoch and members (contract.ShardMap).
    """
    ns = kvc.namespace
    return {
        "formatVersion": CONNECTION_FORMAT_VERSION,
        "name": kvc.name,
        "namespace": ns,
        "url": f"http://{kvc.name}.{ns}.svc:{api.ENGINE_PORT}",
        "service": f"{kvc.name}.{ns}.svc",
        "headlessService": f"{headless_service_name(kvc.name)}.{ns}.svc",
        "port": api.ENGINE_PORT,
        "tokenSecretName": token_secret_name(kvc),
        "tokenSecretKey": kvc.spec.auth.secret_key,
        "numLayers": config.num_layers,
        "numKvHeads": config.num_kv_heads,
        "headDim": config.head_dim,
        "blockTokens": config.block_tokens,
        "dtype": config.dtype,
        "codec": config.codec,
        "cacheNamespace": config.namespace,
        "routeDepth": config.route_depth,
        **(shard_map.to_connection() if shard_map is not None else {}),
    }


def build_connection_configmap(
    kvc: KVCache, config: KVCacheConfig, shard_map: ShardMap | None = None
) -> Manifest:
    """``<name>-connection``: ``connection.json`` plus each key as its own file (for env/envFrom;
    a list joined with commas)."""
    info = connection_info(kvc, config, shard_map)
    data = {"connection.json": json.dumps(info, indent=2, sort_keys=True) + "\n"}
    data.update(
        {key: ",".join(value) if isinstance(value, list) else str(value) for key, value in info.items()}
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(kvc, f"{kvc.name}-connection", "connection"),
        "data": data,
    }


# --- all children ----------------------------------------------------------------------------------


def build_children(
    kvcache: Mapping[str, Any] | KVCache,
    *,
    replicas: int | None = None,
    token: str | None = None,
    admin_token: str | None = None,
    live_overrides: LiveConfig | Mapping[str, Any] | None = None,
    shard_map: ShardMap | None = None,
) -> list[Manifest]:
    """Every child manifest of one KVCache, in apply order (see the module docstring);
    ``shard_map``: the warm replicas clients place over, published in ``<name>-connection``."""
    kvc = api.parse_kvcache(kvcache)
    count = kvc.spec.replicas if replicas is None else replicas
    if count < 0:
        raise api.SpecError(f"replicas: must be >= 0, got {count}")
    config = engine_config(kvc, live_overrides)
    children = [
        build_configmap(kvc, config),
        build_token_secret(kvc, token),
        build_admin_token_secret(kvc, admin_token),
        build_connection_configmap(kvc, config, shard_map),
        build_headless_service(kvc),
        build_client_service(kvc),
        build_statefulset(kvc, config, count),
        build_pdb(kvc),
        build_backup_pvc(kvc),
        build_backup_cronjob(kvc, count),
        build_service_monitor(kvc),
        build_network_policy(kvc),
    ]
    return [child for child in children if child is not None]
