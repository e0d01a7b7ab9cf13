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

import difflib
import enum
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from kvcache_engine.contract import (
    STAGING_MB_DEFAULT,
    CacheStrategy,
    Codec,
    KVCacheConfig,
    achieved_compression_ratio,
    pool_bytes,
)
from kvcache_engine.contract import memory_request_bytes as engine_memory_bytes
from kvcache_operator import validation as v
from kvcache_operator.validation import format_bytes, parse_quantity

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

DEFAULT_BACKUP_SCHEDULE = "0 */6 * * *"

# Sane bounds on sizes: what a real node, GPU or volume can hold (a larger value is a typo, or
# an attack on the reconcile loop's arithmetic), in bytes or cores.
GiB, TiB, PiB = 2**30, 2**40, 2**50
MAX_POD_MEMORY_BYTES = 16 * TiB
"""Largest host memory an engine pod may request (the largest cloud machines have 24-32 TiB)."""
MAX_GPU_POOL_BYTES = 1 * TiB
"""Largest block pool one GPU may hold (the largest GPUs have under 300 GiB)."""
MAX_MEMORY_OVERHEAD_BYTES = 64 * GiB
MAX_VOLUME_BYTES = 1 * PiB
MAX_CPU_CORES = 1024
MIN_SCRAPE_INTERVAL, MAX_SCRAPE_INTERVAL = "1s", "1h"

# The engine container's own mounts (resources.py): a model may not be mounted over them.
ENGINE_MOUNT_PATHS = ("/tmp", "/etc/kvcache", "/var/run/kvcache", "/var/lib/kvcache", "/dev")


class SpecError(ValueError):
    """An invalid KVCache; the message names each field path (``spec.autoscaling.minReplicas: ...``)."""


def _refuse(problem: str) -> PydanticCustomError:
    """A field's problem in words (its path is put in front by _format_error)."""
    return PydanticCustomError("kvcache_field", "{problem}", {"problem": problem})


@dataclass(frozen=True)
class Checked:
    """Annotated metadata of a string field: at most ``max_length`` characters, then ``rules`` in order.
    The rules that have CEL go into the CRD as ``x-kubernetes-validations`` (with the same words)."""

    rules: tuple[v.FieldRule, ...]
    max_length: int

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(
            self._validate, core_schema.str_schema(max_length=self.max_length)
        )

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        validations = [entry for rule in self.rules for entry in rule.validations()]
        if validations:
            json_schema["x-kubernetes-validations"] = validations
        return json_schema

    def _validate(self, value: str) -> str:
        problem = v.first_problem(self.rules, value)
        if problem is not None:
            raise _refuse(problem)
        return value


@dataclass(frozen=True)
class LabelMap:
    """Annotated metadata of a ``dict[str, str]`` of Kubernetes labels: keys and values checked."""

    max_items: int = 64

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._validate, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema["maxProperties"] = self.max_items
        return json_schema

    def _validate(self, labels: dict[str, str]) -> dict[str, str]:
        if len(labels) > self.max_items:
            raise _refuse(f"at most {self.max_items} labels, got {len(labels)}")
        problems = v.check_labels(labels)
        if problems:
            raise _refuse("; ".join(problems))
        return labels


def _relative_path_ok(path: str) -> bool:
    return not path.startswith("/") and ".." not in path.split("/")


def _mount_path_ok(path: str) -> bool:
    parts = path.split("/")
    if not path.startswith("/") or path == "/" or ".." in parts:
        return False
    normal = "/" + "/".join(p for p in parts if p)
    return not any(normal == m or normal.startswith(m + "/") for m in ENGINE_MOUNT_PATHS)


_IMAGE_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_IMAGE_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def _image_ok(image: str) -> bool:
    """``[registry[:port]/]repository[:tag][@sha256:digest]``, the repository in lowercase."""
    if not image or any(c.isspace() for c in image):
        return False
    name, at, digest = image.partition("@")
    if at and _IMAGE_DIGEST.fullmatch(digest) is None:
        return False
    first, _, rest = name.partition("/")
    path = rest if rest and ("." in first or ":" in first or first == "localhost") else name
    repository, colon, tag = path.partition(":")
    parts = repository.split("/")
    return (
        all(parts)
        and repository == repository.lower()
        and (not colon or _IMAGE_TAG.fullmatch(tag) is not None)
    )


CpuQuantity = Annotated[
    str,
    Checked(
        v.quantity_rules(
            what="a CPU amount",
            example="500m or 2",
            maximum=Decimal(MAX_CPU_CORES),
            minimum=Decimal("0.001"),
            unit="cores",
        ),
        max_length=32,
    ),
]
MemoryQuantity = Annotated[
    str,
    Checked(
        v.quantity_rules(what="a memory size", example="16Gi", maximum=Decimal(MAX_POD_MEMORY_BYTES)),
        max_length=32,
    ),
]
OverheadQuantity = Annotated[
    str,
    Checked(
        v.quantity_rules(
            what="a memory size", example="1Gi", maximum=Decimal(MAX_MEMORY_OVERHEAD_BYTES), positive=False
        ),
        max_length=32,
    ),
]
VolumeSize = Annotated[
    str,
    Checked(
        v.quantity_rules(what="a size", example="20Gi", maximum=Decimal(MAX_VOLUME_BYTES)), max_length=32
    ),
]
CronSchedule = Annotated[str, Checked(v.cron_rules(), max_length=100)]
ScrapeInterval = Annotated[
    str,
    Checked(
        v.duration_rules(
            what="the scrape interval", minimum=MIN_SCRAPE_INTERVAL, maximum=MAX_SCRAPE_INTERVAL
        ),
        max_length=16,
    ),
]
ClaimName = Annotated[str, Checked(v.dns_subdomain_rules("claim name", "models"), max_length=253)]
SecretName = Annotated[str, Checked(v.dns_subdomain_rules("Secret name", "llama-token"), max_length=253)]
StorageClassName = Annotated[
    str, Checked(v.dns_subdomain_rules("StorageClass name", "fast-ssd"), max_length=253)
]
PriorityClassName = Annotated[
    str, Checked(v.dns_subdomain_rules("PriorityClass name", "inference-high"), max_length=253)
]
NamespaceName = Annotated[str, Checked(v.dns_label_rules("namespace", "kvcache-system"), max_length=63)]
ObjectStoreEndpoint = Annotated[
    str,
    Checked(
        (
            v.FieldRule(
                '"{value}" is not an object store endpoint: use http(s)://host[:port] '
                "(e.g. https://s3.eu-west-1.amazonaws.com or http://minio.storage:9000)",
                *v.matching("https?://[-.a-zA-Z0-9]+(:[0-9]{1,5})?/?"),
            ),
        ),
        max_length=253,
    ),
]
BucketName = Annotated[
    str,
    Checked(
        (
            v.FieldRule(
                "\"{value}\" is not a bucket name: 3-63 lowercase letters, digits, '-' and '.', "
                "starting and ending with a letter or digit (e.g. kvcache-backups)",
                *v.matching("[a-z0-9][-.a-z0-9]{1,61}[a-z0-9]"),
            ),
        ),
        max_length=63,
    ),
]
ObjectPrefix = Annotated[
    str,
    Checked(
        (
            v.FieldRule(
                "\"{value}\" is not a key prefix: use letters, digits, '-', '_', '.' and '/' (e.g. prod/kv)",
                *v.matching("[-._/a-zA-Z0-9]*"),
            ),
        ),
        max_length=200,
    ),
]
ObjectStoreRegion = Annotated[
    str,
    Checked(
        (
            v.FieldRule(
                "\"{value}\" is not a region: lowercase letters, digits and '-' (e.g. us-east-1)",
                *v.matching("[a-z0-9][-a-z0-9]*"),
            ),
        ),
        max_length=63,
    ),
]
BackupRef = Annotated[
    str,
    Checked(
        (
            v.FieldRule(
                '"{value}" is not a backup: use latest or the name of one '
                "(e.g. kvcache-backup-20260101T000000Z)",
                *v.matching("latest|kvcache-backup-[0-9]{8}T[0-9]{6}Z(-[0-9]+)?"),
            ),
        ),
        max_length=80,
    ),
]
KVCacheRef = Annotated[str, Checked(v.dns_label_rules("KVCache name", "cache-a"), max_length=MAX_NAME_LENGTH)]
SecretKey = Annotated[
    str,
    Checked(
        (
            v.FieldRule(
                "\"{value}\" is not a Secret key: use letters, digits, '-', '_' and '.' (e.g. token)",
                *v.matching("[-._a-zA-Z0-9]+"),
            ),
        ),
        max_length=253,
    ),
]
ExtendedResourceName = Annotated[
    str,
    Checked(
        (
            v.FieldRule(
                "\"{value}\" is not an extended resource name: use a domain, '/' and a name "
                "(e.g. nvidia.com/gpu or amd.com/gpu)",
                *v.matching(f"{v.DNS_SUBDOMAIN}/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"),
            ),
        ),
        max_length=317,
    ),
]
ModelPath = Annotated[
    str,
    Checked(
        (
            v.FieldRule(
                "\"{value}\" is not a path inside the claim: use a relative path without '..' "
                "(e.g. llama-3-8b or models/llama.gguf; empty: the claim's root)",
                _relative_path_ok,
                "!self.startsWith('/') && !self.matches('(^|/)[.][.](/|$)')",
            ),
        ),
        max_length=1024,
    ),
]
MountPath = Annotated[
    str,
    Checked(
        (
            v.FieldRule(
                "\"{value}\" cannot be the model's mount path: use an absolute path without '..' outside "
                f"the engine's own mounts ({', '.join(ENGINE_MOUNT_PATHS)}), e.g. /models",
                _mount_path_ok,
            ),
        ),
        max_length=1024,
    ),
]
ImageReference = Annotated[
    str,
    Checked(
        (
            v.FieldRule(
                '"{value}" is not an image reference: use registry/repository:tag without spaces, '
                "the repository in lowercase (e.g. ghcr.io/kvcache-operator/kvcache-engine:0.1.0)",
                _image_ok,
            ),
        ),
        max_length=512,
    ),
]
Labels = Annotated[dict[str, str], LabelMap()]


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


CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "BackupSucceeded", "Autoscaling", "RestartPending")


class _Model(BaseModel):
    """Base of every API model: camelCase aliases, snake_case names, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_assignment=True
    )


# --- spec ------------------------------------------------------------------------------------------


class ModelSource(_Model):
    """A model for ``process_request``, read from a PersistentVolumeClaim mounted read-only."""

    claim_name: ClaimName = Field(description="PVC holding the model files.")
    path: ModelPath = Field(
        "", description="Hugging Face directory or GGUF file inside the claim (relative; empty: its root)."
    )
    mount_path: MountPath = Field(
        "/models", description="Where the claim is mounted in the engine container."
    )


class Resources(_Model):
    """Compute resources of each engine pod. Memory is sized from ``spec.cache`` unless overridden."""

    gpus: int = Field(0, ge=0, le=16, description="GPUs per engine pod (0: the pool lives in host memory).")
    gpu_resource_name: ExtendedResourceName = Field(
        "nvidia.com/gpu", description="Extended resource name of the GPU (device plugin)."
    )
    cpu: CpuQuantity = Field("1", description="CPU request per engine pod.")
    cpu_limit: CpuQuantity | None = Field(None, description="CPU limit (unset: none; at least cpu).")
    memory: MemoryQuantity | None = Field(
        None,
        description=(
            "Memory request and limit; unset: host-resident pool bytes + CPU tier + the server's "
            "get staging buffers + memoryOverhead. When set, at least the pool and staging buffers."
        ),
    )
    memory_overhead: OverheadQuantity = Field(
        "1Gi", description="Memory added to the computed pool size (runtime, buffers, HTTP server)."
    )


class Toleration(_Model):
    """A core/v1 Toleration."""

    key: str | None = Field(None, max_length=316, description="Taint key (empty with Exists: every taint).")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal (default Equal).")
    value: str | None = Field(None, max_length=63, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match (empty: all)."
    )
    toleration_seconds: int | None = Field(None, description="How long a NoExecute taint is tolerated.")

    @model_validator(mode="after")
    def _as_kubernetes_validates_it(self) -> Toleration:
        problems = []
        if self.key and (problem := v.check_label_key(self.key)) is not None:
            problems.append(f"key {problem}")
        if self.value and (problem := v.check_label_value(self.value)) is not None:
            problems.append(f"value {problem}")
        if self.operator == "Exists" and self.value:
            problems.append("operator Exists takes no value (remove value, or use operator Equal)")
        if not self.key and self.operator != "Exists":
            problems.append("an empty key matches every taint only with operator Exists")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            problems.append("tolerationSeconds applies only to effect NoExecute")
        if problems:
            raise _refuse("; ".join(problems))
        return self


class Scheduling(_Model):
    """Where engine pods run."""

    node_selector: Labels = Field(default_factory=dict, description="Node labels the pods require.")
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=64, description="Taints the pods tolerate."
    )
    affinity: dict[str, Any] | None = Field(None, description="A core/v1 Affinity, passed through as is.")
    topology_spread_constraints: list[dict[str, Any]] = Field(
        default_factory=list,
        max_length=32,
        description="core/v1 TopologySpreadConstraints, passed through as is.",
    )
    priority_class_name: PriorityClassName | None = Field(None, description="PriorityClass of the pods.")

    @field_validator("affinity")
    @classmethod
    def _affinity_kinds(cls, affinity: dict[str, Any] | None) -> dict[str, Any] | None:
        unknown = sorted(set(affinity or {}) - {"nodeAffinity", "podAffinity", "podAntiAffinity"})
        if unknown:
            raise _refuse(
                f"unknown field {unknown[0]!r}; an affinity has nodeAffinity, podAffinity and podAntiAffinity"
            )
        return affinity

    @field_validator("topology_spread_constraints")
    @classmethod
    def _spread_constraints(cls, constraints: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, c in enumerate(constraints):
            skew = c.get("maxSkew")
            if not isinstance(skew, int) or isinstance(skew, bool) or skew < 1:
                raise _refuse(f"[{i}].maxSkew must be an integer of at least 1 (e.g. 1)")
            if not isinstance(c.get("topologyKey"), str) or not c["topologyKey"]:
                raise _refuse(f"[{i}].topologyKey must name a node label (e.g. topology.kubernetes.io/zone)")
            if c.get("whenUnsatisfiable") not in ("DoNotSchedule", "ScheduleAnyway"):
                raise _refuse(f"[{i}].whenUnsatisfiable must be DoNotSchedule or ScheduleAnyway")
        return constraints


class Persistence(_Model):
    """A PersistentVolumeClaim per replica where the engine persists its cache and reloads it on start."""

    enabled: bool = Field(False, description="Give each replica a PVC and persist the cache to it.")
    size: VolumeSize = Field("10Gi", description="Size of each replica's PVC.")
    storage_class_name: StorageClassName | None = Field(
        None, description="StorageClass of the PVCs (unset: the default)."
    )
    when_deleted: Retention = Field(Retention.RETAIN, description="PVCs when the KVCache is deleted.")
    when_scaled: Retention = Field(Retention.RETAIN, description="PVCs of replicas removed by a scale-down.")


class ObjectStoreCredentials(_Model):
    """The Secret holding the object store's access keys (read by the backup and restore Jobs only)."""

    secret_name: SecretName = Field(description="Secret in the KVCache's namespace.")
    access_key_id_key: SecretKey = Field("AWS_ACCESS_KEY_ID", description="Key of the access key id.")
    secret_access_key_key: SecretKey = Field(
        "AWS_SECRET_ACCESS_KEY", description="Key of the secret access key."
    )
    session_token_key: SecretKey | None = Field(
        None, description="Key of a session token (temporary credentials); unset: none."
    )


class ObjectStoreTLS(_Model):
    """How the Jobs verify the endpoint's certificate (https endpoints)."""

    ca_secret_name: SecretName | None = Field(
        None, description="Secret holding a PEM CA bundle for a private CA; unset: the system CAs."
    )
    ca_key: SecretKey = Field("ca.crt", description="Key of the CA bundle in that Secret.")
    insecure_skip_verify: bool = Field(
        False, description="Do not verify the certificate (test setups only: anyone on the path can read)."
    )


class ObjectStore(_Model):
    """Backups in an S3-compatible object store (AWS S3, MinIO, Ceph RGW, ...) through the S3 API."""

    endpoint: ObjectStoreEndpoint = Field(description="http(s)://host[:port] of the S3 API.")
    bucket: BucketName = Field(description="Bucket (it must exist).")
    prefix: ObjectPrefix = Field(
        "", description="Key prefix; backups go under <prefix>/<kvcache>/<replica>/<backup>/."
    )
    region: ObjectStoreRegion = Field("us-east-1", description="Region the requests are signed for.")
    credentials: ObjectStoreCredentials = Field(description="Access keys, from a Secret.")
    tls: ObjectStoreTLS = Field(default_factory=ObjectStoreTLS, description="Certificate verification.")
    part_size_mb: int = Field(
        64, ge=5, le=5120, description="Multipart part size in MiB (S3 requires 5..5120); larger segments."
    )


class Backup(_Model):
    """Scheduled backups of every replica's persisted cache into one backup PVC or an object store
    (needs persistence)."""

    enabled: bool | None = Field(
        None, description="Run the backup CronJob (unset: false; required when schedule is set)."
    )
    schedule: CronSchedule | None = Field(
        None,
        description=(
            f"Cron schedule of backups (UTC): five fields or a macro such as @daily; unset: "
            f"{DEFAULT_BACKUP_SCHEDULE!r}. Setting it requires enabled (true, or false to keep it off)."
        ),
    )
    keep: int = Field(7, ge=1, le=1000, description="Backups kept per replica (the oldest are pruned).")
    claim_name: ClaimName | None = Field(None, description="Backup PVC name; unset: <name>-backups.")
    size: VolumeSize = Field("50Gi", description="Size of the backup PVC.")
    storage_class_name: StorageClassName | None = Field(None, description="StorageClass of the backup PVC.")
    suspend: bool = Field(False, description="Suspend the CronJob (no new backups).")
    on_delete: Retention = Field(Retention.RETAIN, description="The backup PVC when the KVCache is deleted.")
    object_store: ObjectStore | None = Field(
        None,
        description=(
            "Back up to an S3-compatible object store instead of the backup PVC (no PVC is made); "
            "keep is then applied in the store."
        ),
    )
    starting_deadline_seconds: int = Field(
        300, ge=10, le=86400, description="A run that cannot start within this many seconds is skipped."
    )
    backoff_limit: int = Field(2, ge=0, le=10, description="Retries of a failed backup Job.")
    active_deadline_seconds: int = Field(3600, ge=60, le=86400, description="Time limit of one backup Job.")
    successful_jobs_history_limit: int = Field(3, ge=0, le=100, description="Finished Jobs kept.")
    failed_jobs_history_limit: int = Field(3, ge=0, le=100, description="Failed Jobs kept.")

    @property
    def cron(self) -> str:
        """The schedule the CronJob runs: ``schedule``, or the default when unset."""
        return self.schedule or DEFAULT_BACKUP_SCHEDULE


class Restore(_Model):
    """Start every replica whose data volume is empty (a new KVCache, or a replica whose PVC was
    replaced) from a backup: an init container verifies it and writes it into the volume, so the
    engine loads it before it reports ready. A replica that already holds a cache keeps it."""

    from_backup: BackupRef = Field("latest", description="A backup's name or latest (the newest complete).")
    source_name: KVCacheRef | None = Field(
        None,
        description="The KVCache whose backups to read (replica i reads <sourceName>-i's); unset: this one.",
    )
    object_store: ObjectStore | None = Field(
        None, description="Read from this object store; unset: spec.backup.objectStore, else the backup PVC."
    )
    claim_name: ClaimName | None = Field(
        None, description="Backup PVC to read when no object store is used; unset: <sourceName>-backups."
    )


class Autoscaling(_Model):
    """Replica autoscaling from the engines' memory pressure and hit rate."""

    mode: Mode = Field(Mode.OFF, description="Off, DryRun (decide and record only) or Auto.")
    min_replicas: int = Field(1, ge=1, le=100, description="Fewest replicas the autoscaler keeps.")
    max_replicas: int = Field(4, ge=1, le=100, description="Most replicas the autoscaler creates.")
    target_memory_pressure: float = Field(
        0.8, gt=0.0, le=1.0, description="Scale up when mean memory pressure (used/capacity) exceeds this."
    )
    target_hit_rate: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description=(
            "Hit rate to size for: the smallest capacity the engines' miss-ratio curve predicts it at "
            "(the knee when no size reaches it); below it, more capacity is considered."
        ),
    )
    min_gain_per_doubling: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description=(
            "Least hit rate a doubling of the capacity must buy, per the engines' curve: no replica is "
            "added that buys less (per doubling of what it adds); past the knee capacity stops growing."
        ),
    )
    scale_up_stabilization_seconds: int = Field(
        60, ge=0, le=3600, description="A scale-up signal must hold this long before acting."
    )
    scale_down_stabilization_seconds: int = Field(
        300, ge=0, le=86400, description="A scale-down signal must hold this long before acting."
    )
    max_scale_up_step: int = Field(2, ge=1, le=100, description="Most replicas added in one decision.")
    max_scale_down_step: int = Field(1, ge=1, le=100, description="Most replicas removed in one decision.")
    scale_in_on_drain_failure: bool = Field(
        False,
        description=(
            "Scale in even when the leaving replicas could not hand their blocks over (they are "
            "lost, with whenScaled: Delete their volumes too); off: a failed drain stops the "
            "scale-in (status and a ScaleInBlocked Event say why) until a drain succeeds."
        ),
    )


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

    existing_secret: SecretName | None = Field(None, description="Secret holding the token.")
    secret_key: SecretKey = Field("token", description="Key of the token in the Secret.")


class Metrics(_Model):
    """Prometheus scraping of the engines' /metrics."""

    service_monitor: bool = Field(False, description="Create a ServiceMonitor (prometheus-operator).")
    scrape_interval: ScrapeInterval = Field(
        "30s",
        description=(
            f"How often the operator and Prometheus scrape the engines ({MIN_SCRAPE_INTERVAL} to "
            f"{MAX_SCRAPE_INTERVAL}); the control loop runs at this pace."
        ),
    )
    service_monitor_labels: Labels = Field(
        default_factory=dict,
        description="Extra labels on the ServiceMonitor (to match a Prometheus selector).",
    )
    auth: bool = Field(
        False,
        description=(
            "Require a token on the engines' /metrics (the data token, as the ServiceMonitor sends, "
            "or the admin token, as the operator sends); off: /metrics is open like the probes."
        ),
    )


class NetworkPolicy(_Model):
    """Ingress to the engines limited to clients, the operator, Prometheus and the cache's own pods."""

    enabled: bool = Field(False, description="Create a NetworkPolicy for the engine pods.")
    client_pod_selector: Labels = Field(
        default_factory=dict, description="Labels of inference pods allowed in (empty: every pod)."
    )
    client_namespace_selector: Labels | None = Field(
        None, description="Labels of namespaces clients may run in (unset: this namespace only)."
    )
    operator_namespace: NamespaceName = Field("kvcache-system", description="Namespace of the operator.")
    metrics_namespace_selector: Labels | None = Field(
        None, description="Labels of the namespace Prometheus runs in (unset: no extra metrics access)."
    )


class KVCacheSpec(_Model):
    """Desired state of a KV cache: engines, sizing, storage, backups and the control loops."""

    replicas: int = Field(
        1, ge=0, le=100, description="Engine replicas (the truth while autoscaling is Off)."
    )
    image: ImageReference = Field(DEFAULT_IMAGE, description="Engine container image.")
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
    restore: Restore | None = Field(
        None, description="Start replicas with an empty data volume from a backup (needs persistence)."
    )
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="Replica autoscaling.")
    tuning: Tuning = Field(default_factory=Tuning, description="Live tuning of max_tokens and compression.")
    auth: Auth = Field(default_factory=Auth, description="API token.")
    metrics: Metrics = Field(default_factory=Metrics, description="Prometheus scraping.")
    network_policy: NetworkPolicy = Field(default_factory=NetworkPolicy, description="Ingress restrictions.")
    termination_grace_period_seconds: int = Field(
        120, ge=10, le=3600, description="Time a stopping engine gets to persist (preStop + SIGTERM)."
    )

    @field_validator("cache", mode="before")
    @classmethod
    def _cache_enums_as_written(cls, value: Any) -> Any:
        """The engine's own loader also takes ``lru`` or ``fp16``; a manifest takes what the CRD's
        enums take, exactly (the API server would refuse the rest)."""
        if isinstance(value, Mapping):
            for key, allowed in _CACHE_ENUMS.items():
                got = value.get(key, allowed[0])
                if got not in allowed:
                    raise _refuse(f"spec.cache.{key}: {_shown(got)} is not one of {', '.join(allowed)}")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> KVCacheSpec:
        problems = [rule.message for rule in CROSS_FIELD_RULES if not rule.check(self)]
        problems += [p for check in ADMISSION_CHECKS if (p := check(self)) is not None]
        if problems:
            raise _refuse("\n".join(problems))
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


class RestoreRecord(_Model):
    """What a replica's restore init container wrote into its volume."""

    pod: str = Field(description="The engine pod.")
    backup: str | None = Field(None, description="The backup restored.")
    source: str | None = Field(None, description="Where it was read (s3://bucket/prefix/ or a path).")
    blocks_verified: int | None = Field(None, description="Blocks whose checksums were verified.")
    time: str | None = Field(None, description="When (UTC).")
    message: str | None = Field(None, description="Why nothing was restored, or why it failed.")


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
    predicted_hit_rate: float | None = Field(
        None, description="Hit rate the engines' miss-ratio curve predicts at the current capacity (0..1)."
    )
    predicted_ceiling: float | None = Field(
        None, description="Hit rate the curve predicts for an unbounded cache: no size passes it (0..1)."
    )
    recommended_capacity: int | None = Field(
        None, description="Effective blocks (all replicas) the autoscaler sizes for, from the curve."
    )
    misses_by_reason: dict[str, float] | None = Field(
        None,
        description=(
            "Blocks missed per reason since the engines started (never_seen, capacity, retune, cleared, "
            "namespace_mismatch, client_timeout, client_error; the first four estimated by the curve)."
        ),
    )
    restored: list[RestoreRecord] = Field(
        default_factory=list, description="Replicas started from a backup (spec.restore), by pod."
    )
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
        ("spec", "backup"),
        "!has(self.schedule) || has(self.enabled)",
        "spec.backup.schedule is set but spec.backup.enabled is not, so no backup would run: "
        "add enabled: true (or enabled: false to keep backups off on purpose)",
        lambda s: s.backup.schedule is None or s.backup.enabled is not None,
    ),
    Rule(
        ("spec",),
        "!has(self.restore) || self.persistence.enabled",
        "spec.restore requires spec.persistence.enabled (a backup is restored into the replica's volume)",
        lambda s: s.restore is None or s.persistence.enabled,
    ),
    Rule(
        ("spec",),
        "!has(self.backup.enabled) || !self.backup.enabled || self.persistence.enabled",
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

METADATA_RULE_CEL = (
    f"size(self.metadata.name) <= {MAX_NAME_LENGTH}"
    " && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')"
)
METADATA_RULE_MESSAGE = (
    f"metadata.name must start with a letter and be at most {MAX_NAME_LENGTH} characters of lowercase "
    "letters, digits and '-' (its Services need a letter first; children add suffixes such as -headless)"
)


# --- checks only Python can make (the admission webhook and the operator's reconcile) ----------------


def _cpu_limit_covers_request(s: KVCacheSpec) -> str | None:
    limit, request = s.resources.cpu_limit, s.resources.cpu
    if limit is None or parse_quantity(limit) >= parse_quantity(request):
        return None
    return (
        f'spec.resources.cpuLimit: "{limit}" is below spec.resources.cpu "{request}"; '
        "a limit must be at least the request"
    )


def _ceiling_field(s: KVCacheSpec) -> str:
    return "spec.tuning.maxTokensMax" if s.tuning.mode != Mode.OFF else "spec.cache.maxTokens"


def engine_needs_bytes(spec: KVCacheSpec) -> int:
    """Host bytes an engine cannot run without: the host-resident pool (or the CPU tier behind a GPU
    pool) over the live envelope, plus the get staging buffers (``memory_request_bytes`` less the
    overhead)."""
    return engine_memory_bytes(
        spec.cache,
        pool_on_gpu=pool_on_gpu(spec),
        overhead_bytes=0,
        staging_mb=ENGINE_STAGING_MB,
        max_tokens_ceiling=max_tokens_ceiling(spec),
    )


def _memory_covers_the_pool(s: KVCacheSpec) -> str | None:
    if s.resources.memory is None:
        return None
    need = engine_needs_bytes(s)
    if parse_quantity(s.resources.memory) >= need:
        return None
    return (
        f'spec.resources.memory: "{s.resources.memory}" is less than the {format_bytes(need)} the engine '
        f"needs for its pool ({_ceiling_field(s)} {max_tokens_ceiling(s)}) and its staging buffers; "
        f"raise it to at least {format_mebibytes(need)} or leave it unset to have it computed"
    )


def _pod_fits_a_node(s: KVCacheSpec) -> str | None:
    if s.resources.memory is not None:  # bounded by its own field rule and by _memory_covers_the_pool
        return None
    total = memory_request_bytes(s)
    if total <= MAX_POD_MEMORY_BYTES:
        return None
    return (
        f"{_ceiling_field(s)}: {max_tokens_ceiling(s)} tokens of this geometry need {format_bytes(total)} of "
        f"host memory per engine pod, more than the {format_bytes(MAX_POD_MEMORY_BYTES)} any node offers; "
        "lower it, or store fewer layers/heads per engine"
    )


def _gpu_pool_fits_a_gpu(s: KVCacheSpec) -> str | None:
    if not pool_on_gpu(s):
        return None
    ceiling = max_tokens_ceiling(s)
    pool = max(
        pool_bytes(s.cache.model_copy(update={"compression_codec": c, "max_tokens": ceiling}))
        for c in get_args(Codec)
    )
    if pool <= MAX_GPU_POOL_BYTES:
        return None
    return (
        f"{_ceiling_field(s)}: {ceiling} tokens of this geometry need a {format_bytes(pool)} block pool on "
        f"one GPU, more than the {format_bytes(MAX_GPU_POOL_BYTES)} any GPU holds; lower it, or run more "
        "replicas (clients shard chains over them)"
    )


ADMISSION_CHECKS: tuple[Callable[[KVCacheSpec], str | None], ...] = (
    _cpu_limit_covers_request,
    _memory_covers_the_pool,
    _pod_fits_a_node,
    _gpu_pool_fits_a_gpu,
)
"""Spec-level rules CEL cannot express (quantities compared, the sizing formula): enforced by the
admission webhook and, with the same words, by ``parse_kvcache`` (render, validate, the operator)."""


# --- parsing and derived values ---------------------------------------------------------------------


_CACHE_ENUMS: dict[str, list[str]] = {
    "cacheStrategy": [m.value for m in CacheStrategy],
    "dtype": list(get_args(KVCacheConfig.model_fields["dtype"].annotation)),
}
PATTERN_WORDS = {"spec.cache.device": "use auto, cpu, cuda or cuda:N (e.g. cuda:0)"}
"""Fields the engine's own model checks with a pattern: what to write instead, in words. The CRD turns
each pattern into a CEL rule with these words (crd.py), so no message ever shows a pattern."""


def _shown(value: Any) -> str:
    """A value as a manifest would spell it: strings in double quotes, true/false, numbers."""
    if isinstance(value, dict | list):
        return "an object" if isinstance(value, dict) else "a list"
    return json.dumps(value, default=str)


def _known_fields(loc: tuple[str | int, ...]) -> list[str]:
    """The camelCase fields of the model at ``loc`` (under KVCache), for 'did you mean' hints."""
    model: Any = KVCache
    for part in loc:
        fields = {f.alias or name: f for name, f in model.model_fields.items()}
        if part not in fields:
            return []
        model = next(
            (
                a
                for a in (fields[part].annotation, *get_args(fields[part].annotation))
                if isinstance(a, type) and issubclass(a, BaseModel)
            ),
            None,
        )
        if model is None:
            return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _problem(item: Any, path: str) -> str:
    """One pydantic error in words: what is wrong with the value and what is expected."""
    kind, ctx, got = item["type"], item.get("ctx") or {}, item.get("input")
    value = _shown(got)
    words = {
        "kvcache_field": str(ctx.get("problem", "")),
        "missing": "is required",
        "bool_type": f"{value} is not a boolean; write true or false",
        "int_type": f"{value} is not an integer; write a whole number without quotes (e.g. 3)",
        "float_type": f"{value} is not a number; write it without quotes (e.g. 0.7)",
        "string_type": f"{value} is not a string; quote it",
        "model_type": f"{value} is not an object; write the block as fields under its name",
        "dict_type": f"{value} is not a mapping; write it as key: value pairs",
        "list_type": f"{value} is not a list; write it as a YAML list",
        "enum": f"{value} is not one of {ctx.get('expected', '')}",
        "literal_error": f"{value} is not one of {ctx.get('expected', '')}",
        "greater_than_equal": f"{value} is too small: the least allowed is {ctx.get('ge')}",
        "greater_than": f"{value} is too small: it must be more than {ctx.get('gt')}",
        "less_than_equal": f"{value} is too large: the most allowed is {ctx.get('le')}",
        "less_than": f"{value} is too large: it must be less than {ctx.get('lt')}",
        "string_too_short": "must not be empty",
        "string_too_long": f"is too long: at most {ctx.get('max_length')} characters",
        "too_long": f"has too many items: at most {ctx.get('max_length')}",
        "string_pattern_mismatch": f"{value} is not valid; {PATTERN_WORDS.get(path, 'see its description')}",
    }
    if kind == "value_error" and path == "spec.cache":  # the engine's own cross-field checks
        return _CACHE_FIELD.sub(lambda m: f"spec.cache.{_CACHE_ALIASES[m.group(0)]}", _problem_text(item))
    if kind == "extra_forbidden":
        parent = tuple(p for p in item["loc"][:-1])
        close = difflib.get_close_matches(str(item["loc"][-1]), _known_fields(parent), n=1)
        hint = f"; did you mean {close[0]}?" if close else " (field names are camelCase, e.g. maxTokens)"
        return f"unknown field{hint}"
    return words.get(kind) or _problem_text(item)


def _problem_text(item: Any) -> str:
    return str(item["msg"]).removeprefix("Value error, ")


_CACHE_ALIASES = {name: f.alias or name for name, f in KVCacheConfig.model_fields.items()}
_CACHE_FIELD = re.compile(r"\b(" + "|".join(sorted(_CACHE_ALIASES, key=len, reverse=True)) + r")\b")


def _format_error(err: ValidationError) -> str:
    """One line per problem, each starting with the field path in manifest (camelCase) spelling; the
    value and what is expected in words (never a pattern, never a traceback)."""
    lines = []
    for item in err.errors():
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in item["loc"]).lstrip(".")
        problem = _problem(item, path)
        # Cross-field messages already name their fields: no parent path in front of them.
        lines.extend(problem.splitlines() if problem.startswith("spec.") else [f"{path}: {problem}"])
    return "\n".join(lines)


def _as_json(data: Any) -> str:
    """The object as JSON, as the API server receives it from kubectl: YAML timestamps become strings,
    integral floats integers (``1.0`` is a valid integer there too)."""

    def normal(x: Any) -> Any:
        if isinstance(x, dict):
            return {str(k): normal(val) for k, val in x.items()}
        if isinstance(x, list | tuple):
            return [normal(val) for val in x]
        if isinstance(x, float) and x.is_integer():
            return int(x)
        return x

    return json.dumps(normal(data), default=str)


def _validate(data: Mapping[str, Any]) -> KVCache:
    """Strict validation, as the API server's schema does: no "yes" for true, no "0.7" for 0.7."""
    try:
        return KVCache.model_validate_json(_as_json(data), strict=True, by_alias=True, by_name=False)
    except ValidationError as exc:
        raise SpecError(_format_error(exc)) from exc


def parse_spec(spec: Mapping[str, Any] | None) -> KVCacheSpec:
    """Validate a ``spec`` mapping; errors name ``spec.<field path>``."""
    return _validate({"metadata": {"name": "x"}, "spec": dict(spec or {})}).spec


def check_name(name: Any) -> str | None:
    """The problem with a KVCache's name (the CRD's metadata rule, same words), or None."""
    if not isinstance(name, str):
        return f"metadata.name: is required (got {_shown(name)})"
    if len(name) > MAX_NAME_LENGTH or v.check_service_name(name) is not None:
        return f'metadata.name: "{name}": {METADATA_RULE_MESSAGE.removeprefix("metadata.name ")}'
    return None


def parse_kvcache(obj: Mapping[str, Any] | KVCache) -> KVCache:
    """Validate a KVCache object (a dict as read from the API or a file); raises SpecError naming the
    field path of every problem (``spec.autoscaling.minReplicas: ...``, one per line). Like the API
    server, only camelCase field names and strictly typed values are accepted. Status is not
    validated (the operator writes it)."""
    if isinstance(obj, KVCache):
        return obj
    data = {k: val for k, val in obj.items() if k != "status"}
    name_problem = check_name((data.get("metadata") or {}).get("name"))
    try:
        kvc = _validate(data)
    except SpecError as exc:
        raise SpecError("\n".join(filter(None, (name_problem, str(exc))))) from exc
    if name_problem is not None:
        raise SpecError(name_problem)
    return kvc


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
    return engine_needs_bytes(spec) + math.ceil(parse_quantity(spec.resources.memory_overhead))


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
    if not pool_on_gpu(spec):
        why = "resources.gpus is 0" if spec.resources.gpus == 0 else "spec.cache.device is cpu"
        if cache.enable_prefetch:
            warnings.append(f"spec.cache.enablePrefetch does nothing on CPU engines ({why})")
        if cache.cpu_tier_tokens > 0:
            warnings.append(f"spec.cache.cpuTierTokens does nothing on CPU engines ({why})")
        if "pin_memory" in cache.model_fields_set and cache.pin_memory:
            warnings.append(f"spec.cache.pinMemory does nothing on CPU engines ({why})")
    if spec.resources.gpus > 0 and cache.device == "cpu":
        warnings.append(
            f"spec.resources.gpus asks for {spec.resources.gpus} GPU(s) per pod that the engine does not "
            "use: spec.cache.device is cpu"
        )
    if spec.backup.enabled is False and spec.backup.schedule is not None:
        warnings.append(
            f'spec.backup.enabled is false: the schedule "{spec.backup.schedule}" runs no backups '
            "(set enabled: true to run them; suspend: true pauses them)"
        )
    warnings += _rounding_warnings(spec)
    warnings += _volume_warnings(spec)
    return warnings


def _rounding_warnings(spec: KVCacheSpec) -> list[str]:
    cache, out = spec.cache, []
    if cache.max_tokens % cache.block_tokens:
        held = cache.max_tokens // cache.block_tokens * cache.block_tokens
        out.append(
            f"spec.cache.maxTokens {cache.max_tokens} is not a multiple of spec.cache.blockTokens "
            f"{cache.block_tokens}: the engines budget whole blocks, {held} tokens"
        )
    return out


def _volume_warnings(spec: KVCacheSpec) -> list[str]:
    if not spec.persistence.enabled:
        return []
    pool = pool_bytes(spec.cache.model_copy(update={"max_tokens": max_tokens_ceiling(spec)}))
    size = parse_quantity(spec.persistence.size)
    if size >= pool:
        return []
    return [
        f"spec.persistence.size {spec.persistence.size} is smaller than a full pool ({format_bytes(pool)}): "
        "once the cache fills, persisting it to the volume fails"
    ]


def format_mebibytes(n_bytes: int) -> str:
    """Bytes rounded up to whole MiB, as a quantity string (``1536Mi``)."""
    return f"{-(-n_bytes // 2**20)}Mi"
