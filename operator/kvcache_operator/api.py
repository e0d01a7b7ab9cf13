"""The KVCache API (``kvcache.dev/v1alpha1``): pydantic models of spec and status.

The CRD's openAPIV3Schema is generated from these models (``crd.py``); ``spec.cache`` *is* the
engine's ``KVCacheConfig`` (one schema). Fields are snake_case in Python and camelCase in
manifests (aliases); both spellings are accepted on input.

Cross-field rules live once, in ``CROSS_FIELD_RULES``: each has a CEL expression (rendered into the
CRD as ``x-kubernetes-validations``, enforced by the API server) and a Python predicate (enforced by
``parse_kvcache``, so the operator rejects exactly what the API server would). Tests check that the
two agree.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from kvcache_engine.contract import STAGING_MB_DEFAULT, KVCacheConfig, achieved_compression_ratio
from kvcache_engine.contract import memory_request_bytes as engine_memory_bytes

GROUP = "kvcache.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "KVCache"
PLURAL = "kvcaches"
SINGULAR = "kvcache"
SHORT_NAMES = ("kvc",)

DEFAULT_IMAGE = "ghcr.io/kvcache-operator/kvcache-engine:0.1.0"
ENGINE_PORT = 8080
ENGINE_STAGING_MB = STAGING_MB_DEFAULT
"""``serve --staging-mb`` of every engine pod; memory_request_bytes counts the same value."""
MAX_NAME_LENGTH = 40
"""Longest KVCache name: children append suffixes (``-connection``, ``-backup``, pod ordinals and the
StatefulSet's 63-character ``controller-revision-hash`` label) that must stay valid names."""

# Kubernetes resource.Quantity (the API server's own regular expression).
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
DURATION_PATTERN = r"^[0-9]+(ms|s|m|h)$"
CRON_PATTERN = r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|\S+( +\S+){4})$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class SpecError(ValueError):
    """An invalid KVCache; the message names each field path (``spec.autoscaling.minReplicas: ...``)."""


class Mode(enum.StrEnum):
    """How a controller loop acts: ``Off`` (nothing), ``DryRun`` (decide, record, do not act), ``Auto``."""

    OFF = "Off"
    DRY_RUN = "DryRun"
    AUTO = "Auto"


class Retention(enum.StrEnum):
    """What happens to a volume when its owner goes away."""

    RETAIN = "Retain"
    DELETE = "Delete"


class Phase(enum.StrEnum):
    """Coarse lifecycle of a KVCache (conditions carry the detail)."""

    PENDING = "Pending"
    PROGRESSING = "Progressing"
    READY = "Ready"
    DEGRADED = "Degraded"
    FAILED = "Failed"


CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "BackupSucceeded", "Autoscaling")


class _Model(BaseModel):
    """Base of every API model: camelCase aliases, snake_case names, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_assignment=True
    )


# --- spec ------------------------------------------------------------------------------------------


class ModelSource(_Model):
    """A model for ``process_request``, read from a PersistentVolumeClaim mounted read-only."""

    claim_name: str = Field(
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="PVC holding the model files.",
    )
    path: str = Field(
        "",
        max_length=1024,
        pattern=r"^[^/].*$|^$",
        description="Hugging Face directory or GGUF file inside the claim (relative; empty: its root).",
    )
    mount_path: str = Field(
        "/models", pattern=r"^/.+", description="Where the claim is mounted in the engine container."
    )


class Resources(_Model):
    """Compute resources of each engine pod. Memory is sized from ``spec.cache`` unless overridden."""

    gpus: int = Field(0, ge=0, le=16, description="GPUs per engine pod (0: the pool lives in host memory).")
    gpu_resource_name: str = Field(
        "nvidia.com/gpu",
        pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$",
        description="Extended resource name of the GPU (device plugin).",
    )
    cpu: str = Field("1", pattern=QUANTITY_PATTERN, description="CPU request per engine pod.")
    cpu_limit: str | None = Field(None, pattern=QUANTITY_PATTERN, description="CPU limit (unset: none).")
    memory: str | None = Field(
        None,
        pattern=QUANTITY_PATTERN,
        description=(
            "Memory request and limit; unset: host-resident pool bytes + CPU tier + the server's "
            "get staging buffers + memoryOverhead."
        ),
    )
    memory_overhead: str = Field(
        "1Gi",
        pattern=QUANTITY_PATTERN,
        description="Memory added to the computed pool size (runtime, buffers, HTTP server).",
    )


class Toleration(_Model):
    """A core/v1 Toleration."""

    key: str | None = Field(None, description="Taint key (empty with Exists: every taint).")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal (default Equal).")
    value: str | None = Field(None, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match (empty: all)."
    )
    toleration_seconds: int | None = Field(None, description="How long a NoExecute taint is tolerated.")


class Scheduling(_Model):
    """Where engine pods run."""

    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods require.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Taints the pods tolerate.")
    affinity: dict[str, Any] | None = Field(None, description="A core/v1 Affinity, passed through as is.")
    topology_spread_constraints: list[dict[str, Any]] = Field(
        default_factory=list, description="core/v1 TopologySpreadConstraints, passed through as is."
    )
    priority_class_name: str | None = Field(None, max_length=253, description="PriorityClass of the pods.")


class Persistence(_Model):
    """A PersistentVolumeClaim per replica where the engine persists its cache and reloads it on start."""

    enabled: bool = Field(False, description="Give each replica a PVC and persist the cache to it.")
    size: str = Field("10Gi", pattern=QUANTITY_PATTERN, description="Size of each replica's PVC.")
    storage_class_name: str | None = Field(None, description="StorageClass of the PVCs (unset: the default).")
    when_deleted: Retention = Field(Retention.RETAIN, description="PVCs when the KVCache is deleted.")
    when_scaled: Retention = Field(Retention.RETAIN, description="PVCs of replicas removed by a scale-down.")


class Backup(_Model):
    """Scheduled backups of every replica's persisted cache into one backup PVC (needs persistence)."""

    enabled: bool = Field(False, description="Run the backup CronJob.")
    schedule: str = Field(
        "0 */6 * * *",
        max_length=100,
        pattern=CRON_PATTERN,
        description="Cron schedule of backups: five fields or a macro such as @daily.",
    )
    keep: int = Field(7, ge=1, le=1000, description="Backups kept per replica (the oldest are pruned).")
    claim_name: str | None = Field(
        None,
        pattern=DNS_SUBDOMAIN_PATTERN,
        max_length=253,
        description="Backup PVC name; unset: <name>-backups.",
    )
    size: str = Field("50Gi", pattern=QUANTITY_PATTERN, description="Size of the backup PVC.")
    storage_class_name: str | None = Field(None, description="StorageClass of the backup PVC.")
    suspend: bool = Field(False, description="Suspend the CronJob (no new backups).")
    on_delete: Retention = Field(Retention.RETAIN, description="The backup PVC when the KVCache is deleted.")
    starting_deadline_seconds: int = Field(
        300, ge=10, le=86400, description="A run that cannot start within this many seconds is skipped."
    )
    backoff_limit: int = Field(2, ge=0, le=10, description="Retries of a failed backup Job.")
    active_deadline_seconds: int = Field(3600, ge=60, le=86400, description="Time limit of one backup Job.")
    successful_jobs_history_limit: int = Field(3, ge=0, le=100, description="Finished Jobs kept.")
    failed_jobs_history_limit: int = Field(3, ge=0, le=100, description="Failed Jobs kept.")


class Autoscaling(_Model):
    """Replica autoscaling from the engines' memory pressure and hit rate."""

    mode: Mode = Field(Mode.OFF, description="Off, DryRun (decide and record only) or Auto.")
    min_replicas: int = Field(1, ge=1, le=100, description="Fewest replicas the autoscaler keeps.")
    max_replicas: int = Field(4, ge=1, le=100, description="Most replicas the autoscaler creates.")
    target_memory_pressure: float = Field(
        0.8, gt=0.0, le=1.0, description="Scale up when mean memory pressure (used/capacity) exceeds this."
    )
    target_hit_rate: float = Field(
        0.5, ge=0.0, le=1.0, description="Hit rate below which more capacity is considered."
    )
    scale_up_stabilization_seconds: int = Field(
        60, ge=0, le=3600, description="A scale-up signal must hold this long before acting."
    )
    scale_down_stabilization_seconds: int = Field(
        300, ge=0, le=86400, description="A scale-down signal must hold this long before acting."
    )
    max_scale_up_step: int = Field(2, ge=1, le=100, description="Most replicas added in one decision.")
    max_scale_down_step: int = Field(1, ge=1, le=100, description="Most replicas removed in one decision.")


class Tuning(_Model):
    """Live retuning of max_tokens and compression within bounds (no restart)."""

    mode: Mode = Field(Mode.OFF, description="Off, DryRun (decide and record only) or Auto.")
    max_tokens_min: int = Field(1024, ge=16, le=2**31, description="Lower bound for cache.maxTokens.")
    max_tokens_max: int = Field(1048576, ge=16, le=2**31, description="Upper bound for cache.maxTokens.")
    compression_ratio_min: float = Field(
        0.25, ge=0.1, le=1.0, description="Lowest compression ratio (most compression) tuning may set."
    )
    compression_ratio_max: float = Field(1.0, ge=0.1, le=1.0, description="Highest compression ratio.")
    interval_seconds: int = Field(300, ge=30, le=86400, description="Least time between two tuning changes.")


class Auth(_Model):
    """The engines' API token: an existing Secret, or one the operator generates (<name>-token)."""

    existing_secret: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="Secret holding the token.",
    )
    secret_key: str = Field(
        "token", min_length=1, max_length=253, description="Key of the token in the Secret."
    )


class Metrics(_Model):
    """Prometheus scraping of the engines' /metrics."""

    service_monitor: bool = Field(False, description="Create a ServiceMonitor (prometheus-operator).")
    scrape_interval: str = Field("30s", pattern=DURATION_PATTERN, description="Scrape interval.")
    service_monitor_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Extra labels on the ServiceMonitor (to match a Prometheus selector).",
    )


class NetworkPolicy(_Model):
    """Ingress to the engines limited to clients, the operator, Prometheus and the cache's own pods."""

    enabled: bool = Field(False, description="Create a NetworkPolicy for the engine pods.")
    client_pod_selector: dict[str, str] = Field(
        default_factory=dict, description="Labels of inference pods allowed in (empty: every pod)."
    )
    client_namespace_selector: dict[str, str] | None = Field(
        None, description="Labels of namespaces clients may run in (unset: this namespace only)."
    )
    operator_namespace: str = Field(
        "kvcache-system", pattern=DNS_LABEL_PATTERN, max_length=63, description="Namespace of the operator."
    )
    metrics_namespace_selector: dict[str, str] | None = Field(
        None, description="Labels of the namespace Prometheus runs in (unset: no extra metrics access)."
    )


class KVCacheSpec(_Model):
    """Desired state of a KV cache: engines, sizing, storage, backups and the control loops."""

    replicas: int = Field(
        1, ge=0, le=100, description="Engine replicas (the truth while autoscaling is Off)."
    )
    image: str = Field(DEFAULT_IMAGE, min_length=1, description="Engine container image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Pull policy of the engine image."
    )
    cache: KVCacheConfig = Field(default_factory=KVCacheConfig, description="The engine's configuration.")
    model: ModelSource | None = Field(None, description="Optional model for process_request.")
    resources: Resources = Field(default_factory=Resources, description="Per-pod compute resources.")
    scheduling: Scheduling = Field(default_factory=Scheduling, description="Pod placement.")
    persistence: Persistence = Field(
        default_factory=Persistence, description="Per-replica cache persistence."
    )
    backup: Backup = Field(default_factory=Backup, description="Scheduled backups.")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="Replica autoscaling.")
    tuning: Tuning = Field(default_factory=Tuning, description="Live tuning of max_tokens and compression.")
    auth: Auth = Field(default_factory=Auth, description="API token.")
    metrics: Metrics = Field(default_factory=Metrics, description="Prometheus scraping.")
    network_policy: NetworkPolicy = Field(default_factory=NetworkPolicy, description="Ingress restrictions.")
    termination_grace_period_seconds: int = Field(
        120, ge=10, le=3600, description="Time a stopping engine gets to persist (preStop + SIGTERM)."
    )

    @model_validator(mode="after")
    def _cross_field(self) -> KVCacheSpec:
        problems = [rule.message for rule in CROSS_FIELD_RULES if not rule.check(self)]
        if problems:
            raise ValueError("; ".join(problems))
        return self


# --- status ----------------------------------------------------------------------------------------


class Condition(_Model):
    """A metav1.Condition."""

    type: str = Field(description="Ready, Progressing, Degraded, BackupSucceeded or Autoscaling.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field("", description="CamelCase reason.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: str | None = Field(None, description="RFC 3339 time of the last status change.")
    observed_generation: int | None = Field(None, description="metadata.generation this was computed for.")


class BackupRecord(_Model):
    """The last backup run."""

    time: str | None = Field(None, description="RFC 3339 completion time.")
    succeeded: bool | None = Field(None, description="Whether every replica was backed up.")
    job: str | None = Field(None, description="Name of the Job.")
    message: str | None = Field(None, description="Failure detail.")


class ScaleRecord(_Model):
    """The last replica change made by the autoscaler."""

    time: str | None = Field(None, description="RFC 3339 time.")
    from_replicas: int | None = Field(None, description="Replicas before.")
    to_replicas: int | None = Field(None, description="Replicas after.")
    reason: str | None = Field(None, description="Why.")


class Decision(_Model):
    """One autoscaling or tuning decision (applied, or recorded only in DryRun)."""

    time: str | None = Field(None, description="RFC 3339 time.")
    kind: Literal["Scale", "Tune"] = Field(description="Scale or Tune.")
    mode: Mode = Field(description="The mode the decision was made in.")
    applied: bool = Field(False, description="False in DryRun or when blocked.")
    action: str = Field("", description="What was (or would be) done, e.g. 'replicas 2 -> 3'.")
    reason: str = Field("", description="The signal that led to it.")
    drain_failures: list[str] = Field(
        default_factory=list, description="Scale-in: leaving replicas whose blocks could not be handed over."
    )


class EngineRecord(_Model):
    """One engine pod as its kubelet and its metrics report it."""

    name: str = Field(description="The pod.")
    ready: bool = Field(False, description="Whether it serves.")
    restarts: int = Field(0, description="Restarts of its engine container.")
    reason: str | None = Field(
        None, description="While failing: the engine's own reason (termination message) or the kubelet's."
    )
    message: str | None = Field(None, description="While it is failing: why.")
    persist_failing: bool | None = Field(None, description="Its persists fail (true until one succeeds).")


class KVCacheStatus(_Model):
    """Observed state, written by the operator."""

    phase: Phase | None = Field(None, description="Pending, Progressing, Ready, Degraded or Failed.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready, Progressing, Degraded, ...")
    observed_generation: int | None = Field(None, description="The metadata.generation last reconciled.")
    replicas: int | None = Field(None, description="Engine pods (the scale subresource's status replicas).")
    ready_replicas: int | None = Field(None, description="Ready engine pods.")
    selector: str | None = Field(None, description="Label selector of the engine pods (scale subresource).")
    endpoints: list[str] = Field(default_factory=list, description="URLs of the ready engines.")
    effective_config: dict[str, Any] | None = Field(
        None, description="The config the engines run (spec.cache after tuning), camelCase."
    )
    codec: str | None = Field(None, description="Codec(s) the engines report storing blocks with.")
    achieved_compression_ratio: float | None = Field(
        None, description="Stored bytes / fp16 bytes, as the engines report it (mean over the engines)."
    )
    restarts: int | None = Field(None, description="Restarts of the engine containers of the current pods.")
    engines: list[EngineRecord] = Field(default_factory=list, description="Each engine pod, by name.")
    hit_rate: float | None = Field(None, description="Token hit rate over the last scrape window (0..1).")
    memory_pressure: float | None = Field(None, description="Mean used/capacity over the engines (0..1).")
    last_backup: BackupRecord | None = Field(None, description="The last backup run.")
    last_scale: ScaleRecord | None = Field(None, description="The last autoscaler change.")
    decisions: list[Decision] = Field(
        default_factory=list, max_length=20, description="Recent decisions, newest last (at most 20)."
    )


class KVCache(_Model):
    """A KVCache custom object (metadata kept as a plain dict)."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["kvcache.dev/v1alpha1"] = "kvcache.dev/v1alpha1"
    kind: Literal["KVCache"] = "KVCache"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: KVCacheSpec = Field(default_factory=KVCacheSpec)
    status: KVCacheStatus | None = None

    @property
    def name(self) -> str:
        return str(self.metadata["name"])

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace") or "default")


# --- cross-field rules (CEL in the CRD, Python in parse_kvcache) -------------------------------------


@dataclass(frozen=True)
class Rule:
    """A cross-field rule: ``cel`` is evaluated with ``self`` bound to the object at ``path`` (defaults
    applied); ``check`` is the same rule on the parsed spec. ``message`` names the field."""

    path: tuple[str, ...]  # schema path under the CRD root, e.g. ("spec", "autoscaling")
    cel: str
    message: str
    check: Callable[[KVCacheSpec], bool]


def _tuning_holds_max_tokens(s: KVCacheSpec) -> bool:
    if s.tuning.mode == Mode.OFF:
        return True
    return s.tuning.max_tokens_min <= s.cache.max_tokens <= s.tuning.max_tokens_max


CROSS_FIELD_RULES: tuple[Rule, ...] = (
    Rule(
        ("spec", "cache"),
        "!has(self.persistencePath)",
        "spec.cache.persistencePath is set by the operator (the replica's volume); "
        "use spec.persistence.enabled instead",
        lambda s: s.cache.persistence_path is None,
    ),
    Rule(
        ("spec", "cache"),
        "!has(self.modelPath)",
        "spec.cache.modelPath is set by the operator (the mounted model); use spec.model instead",
        lambda s: s.cache.model_path is None,
    ),
    Rule(
        ("spec", "cache"),
        "!has(self.memoryPoolSize)",
        "spec.cache.memoryPoolSize is not used by the operator: size the cache with spec.cache.maxTokens "
        "(the pod's memory is sized from it)",
        lambda s: s.cache.memory_pool_size is None,
    ),
    Rule(
        ("spec", "autoscaling"),
        "self.minReplicas <= self.maxReplicas",
        "spec.autoscaling.minReplicas must be less than or equal to spec.autoscaling.maxReplicas",
        lambda s: s.autoscaling.min_replicas <= s.autoscaling.max_replicas,
    ),
    Rule(
        ("spec", "tuning"),
        "self.maxTokensMin <= self.maxTokensMax",
        "spec.tuning.maxTokensMin must be less than or equal to spec.tuning.maxTokensMax",
        lambda s: s.tuning.max_tokens_min <= s.tuning.max_tokens_max,
    ),
    Rule(
        ("spec", "tuning"),
        "self.compressionRatioMin <= self.compressionRatioMax",
        "spec.tuning.compressionRatioMin must be less than or equal to spec.tuning.compressionRatioMax",
        lambda s: s.tuning.compression_ratio_min <= s.tuning.compression_ratio_max,
    ),
    Rule(
        ("spec",),
        "self.tuning.mode == 'Off' || (self.cache.maxTokens >= self.tuning.maxTokensMin"
        " && self.cache.maxTokens <= self.tuning.maxTokensMax)",
        "spec.cache.maxTokens must lie within spec.tuning.maxTokensMin..maxTokensMax when tuning is on",
        _tuning_holds_max_tokens,
    ),
    Rule(
        ("spec",),
        "!self.backup.enabled || self.persistence.enabled",
        "spec.backup.enabled requires spec.persistence.enabled (backups copy the persisted cache)",
        lambda s: not s.backup.enabled or s.persistence.enabled,
    ),
    Rule(
        ("spec",),
        "!self.cache.device.startsWith('cuda') || self.resources.gpus >= 1",
        "spec.cache.device 'cuda' requires spec.resources.gpus >= 1",
        lambda s: not s.cache.device.startswith("cuda") or s.resources.gpus >= 1,
    ),
    Rule(
        ("spec", "cache"),
        "self.maxTokens >= self.blockTokens",
        "spec.cache.maxTokens must be at least spec.cache.blockTokens",
        lambda s: s.cache.max_tokens >= s.cache.block_tokens,
    ),
    Rule(
        ("spec",),
        "self.autoscaling.mode == 'Off' || self.replicas == 0"
        " || (self.replicas >= self.autoscaling.minReplicas"
        " && self.replicas <= self.autoscaling.maxReplicas)",
        "spec.replicas must lie within spec.autoscaling.minReplicas..maxReplicas when autoscaling is on",
        lambda s: (
            s.autoscaling.mode == Mode.OFF
            or s.replicas == 0
            or s.autoscaling.min_replicas <= s.replicas <= s.autoscaling.max_replicas
        ),
    ),
)

METADATA_RULE_CEL = f"size(self.metadata.name) <= {MAX_NAME_LENGTH}"
METADATA_RULE_MESSAGE = f"metadata.name must be at most {MAX_NAME_LENGTH} characters (children add suffixes)"


# --- parsing and derived values ---------------------------------------------------------------------


def _format_error(err: ValidationError) -> str:
    """One line per problem, each starting with the field path in manifest (camelCase) spelling."""
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"])
        msg = item["msg"].removeprefix("Value error, ")
        got = item.get("input")
        shown = "" if isinstance(got, dict | list) or item["type"] == "missing" else f" (got {got!r})"
        # A cross-field message already names its fields; do not prefix it with the parent path.
        lines.append(msg if msg.startswith("spec.") else f"{loc}: {msg}{shown}")
    return "\n".join(lines)


def parse_spec(spec: Mapping[str, Any] | None) -> KVCacheSpec:
    """Validate a ``spec`` mapping; errors name ``spec.<field path>``."""
    try:
        data = {"metadata": {"name": "x"}, "spec": dict(spec or {})}
        return KVCache.model_validate(data, by_alias=True, by_name=False).spec
    except ValidationError as exc:
        raise SpecError(_format_error(exc)) from exc


def parse_kvcache(obj: Mapping[str, Any] | KVCache) -> KVCache:
    """Validate a KVCache object (a dict as read from the API or a file); raises SpecError naming the
    field path (``spec.autoscaling.minReplicas: ...``). Like the API server, only camelCase field names
    are accepted. Status is not validated (the operator writes it)."""
    if isinstance(obj, KVCache):
        return obj
    data = {k: v for k, v in obj.items() if k != "status"}
    name = (data.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not re.fullmatch(DNS_LABEL_PATTERN, name):
        raise SpecError(f"metadata.name: must be a DNS label (lowercase alphanumerics and '-'), got {name!r}")
    if len(name) > MAX_NAME_LENGTH:
        raise SpecError(METADATA_RULE_MESSAGE)
    try:
        return KVCache.model_validate(data, by_alias=True, by_name=False)
    except ValidationError as exc:
        raise SpecError(_format_error(exc)) from exc


_QUANTITY_SUFFIXES = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "m": 1e-3,
}


def parse_quantity(text: str) -> float:
    """A Kubernetes quantity (``512Mi``, ``1.5G``, ``100m``, ``1e3``) as a number of base units."""
    match = re.fullmatch(r"([+-]?[0-9.]+)([eE][-+]?[0-9]+|[a-zA-Z]*)", text.strip())
    if match is None:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    number, suffix = match.groups()
    if suffix[:1] in ("e", "E"):
        return float(number + suffix)
    if suffix not in _QUANTITY_SUFFIXES:
        raise ValueError(f"unknown quantity suffix {suffix!r} in {text!r}")
    return float(number) * _QUANTITY_SUFFIXES[suffix]


def pool_on_gpu(spec: KVCacheSpec) -> bool:
    """Whether the engine's primary pool lives in GPU memory (else in the pod's host memory)."""
    return spec.resources.gpus > 0 and spec.cache.device != "cpu"


def max_tokens_ceiling(spec: KVCacheSpec) -> int:
    """The largest ``maxTokens`` the live path may set without a restart: ``spec.tuning.maxTokensMax``
    while tuning is on (the tuner and users' edits stay inside it), else ``spec.cache.maxTokens``
    (then a maxTokens edit resizes the pod: a restart, reported as RestartPending)."""
    if spec.tuning.mode != Mode.OFF:
        return max(spec.tuning.max_tokens_max, spec.cache.max_tokens)
    return spec.cache.max_tokens


def memory_request_bytes(spec: KVCacheSpec) -> int:
    """Host memory of an engine pod: ``resources.memory`` when set, else the contract's formula over the
    live envelope (every codec, up to ``max_tokens_ceiling``) + the get staging buffers + overhead."""
    if spec.resources.memory is not None:
        return math.ceil(parse_quantity(spec.resources.memory))
    return engine_memory_bytes(
        spec.cache,
        pool_on_gpu=pool_on_gpu(spec),
        overhead_bytes=math.ceil(parse_quantity(spec.resources.memory_overhead)),
        staging_mb=ENGINE_STAGING_MB,
        max_tokens_ceiling=max_tokens_ceiling(spec),
    )


def spec_warnings(spec: KVCacheSpec) -> list[str]:
    """Accepted values the engines will not run as written: one sentence each, naming the field and
    what runs instead (admission warnings and Events)."""
    warnings: list[str] = []
    cache = spec.cache
    if cache.codec in ("int8", "int4"):
        achieved = achieved_compression_ratio(cache)
        # Status always shows the achieved ratio; warn when it is materially (25 %) above the request.
        if cache.compression_codec == "auto" and achieved > cache.compression_ratio * 1.25:
            warnings.append(
                f"spec.cache.compressionRatio {cache.compression_ratio:g} is below what {cache.codec} "
                f"stores for this geometry: the engines store {achieved:.3f} of the fp16 bytes"
            )
    if cache.device == "auto" and spec.resources.gpus == 0:
        if cache.enable_prefetch:
            warnings.append("spec.cache.enablePrefetch does nothing on CPU engines (resources.gpus is 0)")
        if cache.cpu_tier_tokens > 0:
            warnings.append("spec.cache.cpuTierTokens does nothing on CPU engines (resources.gpus is 0)")
    return warnings


def format_mebibytes(n_bytes: int) -> str:
    """Bytes rounded up to whole MiB, as a quantity string (``1536Mi``)."""
    return f"{-(-n_bytes // 2**20)}Mi"
