"""``kubectl-kvcache``: a kubectl plugin for KVCaches (``kubectl kvcache status NAME``).

Subcommands: ``status`` (replicas, hit rate, memory pressure, conditions, last decisions),
``render`` (the children the operator builds, from the live object or a file), ``backup-now``
(a Job from the cache's backup CronJob, as ``kubectl create job --from=cronjob/...`` does),
``pause`` / ``resume`` (the ``kvcache.dev/reconcile: paused`` annotation the operator honours),
``validate -f FILE...`` (offline: the checks of the API server and the operator's webhook).

The formatting and manifest-building functions are pure; ``Cluster`` is the only part that talks
to the API server (through the ``kubernetes`` client and the user's kubeconfig, like kubectl).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from kvcache_operator import api
from kvcache_operator.reconcile import PAUSE_ANNOTATION, PAUSE_VALUE

Manifest = dict[str, Any]

DECISIONS_SHOWN = 5
# Kubernetes object names are at most 63 characters for Jobs (the Job controller labels pods with it).
JOB_NAME_MAX = 63


# --- pure helpers ------------------------------------------------------------------------------------


def _percent(value: Any) -> str:
    return "-" if value is None else f"{float(value) * 100:.1f}%"


def _table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, like kubectl's tables."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _curve_tables(status: Mapping[str, Any]) -> list[str]:
    """What the engines' miss-ratio curve predicts (at the current size, unbounded, the size the
    autoscaler sizes for) and why lookups missed, when the status has them."""
    out = []
    if status.get("predictedHitRate") is not None:
        capacity = status.get("recommendedCapacity")
        rows = [
            ["PREDICTED HIT RATE", "PREDICTED CEILING", "RECOMMENDED CAPACITY"],
            [
                _percent(status.get("predictedHitRate")),
                _percent(status.get("predictedCeiling")),
                "- (curve warming up)" if capacity is None else f"{int(capacity):,} blocks",
            ],
        ]
        out.append(_table(rows))
    misses = {k: float(v) for k, v in (status.get("missesByReason") or {}).items() if float(v) > 0}
    if misses:
        total = sum(misses.values())
        rows = [["MISS REASON", "BLOCKS", "SHARE"]]
        rows += [
            [reason, f"{blocks:,.0f}", _percent(blocks / total)]
            for reason, blocks in sorted(misses.items(), key=lambda item: -item[1])
        ]
        out.append(_table(rows))
    return out


def format_status(obj: Mapping[str, Any]) -> str:
    """The human view of one KVCache: a summary table, its conditions and the last decisions."""
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    status = obj.get("status") or {}
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    paused = (meta.get("annotations") or {}).get(PAUSE_ANNOTATION) == PAUSE_VALUE
    summary = [
        ["NAME", "PHASE", "REPLICAS", "READY", "HIT RATE", "PRESSURE", "CODEC", "GENERATION", "PAUSED"],
        [
            str(meta.get("name", "?")),
            str(status.get("phase") or "-"),
            f"{status.get('replicas', '-')}/{spec.get('replicas', '-')}",
            str(status.get("readyReplicas", "-")),
            _percent(status.get("hitRate")),
            _percent(status.get("memoryPressure")),
            str(status.get("codec") or "-"),
            f"{observed if observed is not None else '-'}/{generation if generation is not None else '-'}",
            "yes" if paused else "no",
        ],
    ]
    parts = [_table(summary)]
    parts += _curve_tables(status)
    conditions = status.get("conditions") or []
    if conditions:
        rows = [["CONDITION", "STATUS", "REASON", "MESSAGE"]]
        rows += [
            [
                str(c.get("type", "")),
                str(c.get("status", "")),
                str(c.get("reason", "")),
                str(c.get("message", "")),
            ]
            for c in conditions
        ]
        parts.append(_table(rows))
    decisions = (status.get("decisions") or [])[-DECISIONS_SHOWN:]
    if decisions:
        rows = [["TIME", "KIND", "MODE", "APPLIED", "ACTION", "REASON"]]
        rows += [
            [
                str(d.get("time") or "-"),
                str(d.get("kind", "")),
                str(d.get("mode", "")),
                "yes" if d.get("applied") else "no",
                str(d.get("action", "")),
                str(d.get("reason", "")),
            ]
            for d in reversed(decisions)
        ]
        parts.append("Last decisions (newest first):\n" + _table(rows))
    else:
        parts.append("No scaling or tuning decisions yet.")
    return "\n\n".join(parts) + "\n"


def pause_patch(paused: bool) -> Manifest:
    """Merge patch that sets (or removes, with null) the pause annotation."""
    return {"metadata": {"annotations": {PAUSE_ANNOTATION: PAUSE_VALUE if paused else None}}}


def backup_cronjob_name(name: str) -> str:
    return f"{name}-backup"


def manual_job(cronjob: Mapping[str, Any], now: datetime.datetime) -> Manifest:
    """A Job from ``cronjob``'s template, owned by it, named ``<cronjob>-manual-<unix time>``."""
    meta = cronjob["metadata"]
    template = cronjob["spec"]["jobTemplate"]
    suffix = f"-manual-{int(now.timestamp())}"
    name = meta["name"][: JOB_NAME_MAX - len(suffix)] + suffix
    job_meta: Manifest = {
        "name": name,
        "namespace": meta["namespace"],
        "labels": dict((template.get("metadata") or {}).get("labels") or {}),
        "annotations": {
            **((template.get("metadata") or {}).get("annotations") or {}),
            "cronjob.kubernetes.io/instantiate": "manual",
        },
        "ownerReferences": [
            {
                "apiVersion": "batch/v1",
                "kind": "CronJob",
                "name": meta["name"],
                "uid": meta["uid"],
                "controller": True,
            }
        ],
    }
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": job_meta, "spec": template["spec"]}


def render_object(obj: Mapping[str, Any]) -> str:
    """The children the operator builds for a live KVCache (server-side fields dropped)."""
    from kvcache_operator.render import PLACEHOLDER_TOKEN, dump_manifests
    from kvcache_operator.resources import build_children

    meta = obj["metadata"]
    clean = {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "metadata": {
            k: meta[k]
            for k in ("name", "namespace", "uid", "generation", "labels", "annotations")
            if k in meta
        },
        "spec": obj.get("spec") or {},
    }
    children = build_children(clean, token=PLACEHOLDER_TOKEN)
    return dump_manifests(children)


# --- errors -----------------------------------------------------------------------------------------------

CRD_NAME = f"{api.PLURAL}.{api.GROUP}"


class PluginError(ValueError):
    """What went wrong and how to fix it, in one line (printed after ``kubectl kvcache <cmd>: error:``)."""


def kubeconfig_error(kubeconfig: str | None, detail: str) -> PluginError:
    """No usable kubeconfig: say which file was tried and how to get one."""
    env = os.environ.get("KUBECONFIG")
    where = kubeconfig or env or os.path.expanduser("~/.kube/config")
    source = "--kubeconfig" if kubeconfig else ("$KUBECONFIG" if env else "the default location")
    missing = not any(Path(p).is_file() for p in where.split(os.pathsep) if p)
    detail = " ".join(detail.split())  # one line, whatever the YAML parser said
    problem = (
        f"no kubeconfig at {where} ({source})" if missing else f"cannot use the kubeconfig {where}: {detail}"
    )
    return PluginError(
        f"{problem}; point KUBECONFIG at your cluster's kubeconfig, or start the local one: "
        'eval "$(kvcache-operator dev up)"'
    )


def api_error(exc: Exception, *, what: str, namespace: str, server: str) -> PluginError | None:
    """A one-line error with the fix for a failed API call; None when it is not one we explain.

    Judged by attributes, not types, so the kubernetes client need not be imported to call it."""
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status in (401, 403, 404):
        message = str(_status_message(exc))
        if status == 401:
            return PluginError(
                f"the API server at {server} rejected your credentials (401 Unauthorized): "
                "refresh them, e.g. log in again or pick another context (kubectl config use-context)"
            )
        if status == 403:
            return PluginError(
                f"permission denied: you may not {what} in namespace {namespace} ({message}); ask for a "
                f"Role that allows it (check with: kubectl auth can-i {what} -n {namespace})"
            )
        return PluginError(
            f"this cluster does not serve {CRD_NAME} (the KVCache CRD is not installed): "
            "kubectl apply -f crds/kvcache.dev_kvcaches.yaml, or helm install kvcache-operator "
            "helm/kvcache-operator -n kvcache-system --create-namespace"
        )
    reason = getattr(exc, "reason", None)
    if type(exc).__name__ in ("MaxRetryError", "NewConnectionError", "ProtocolError") or isinstance(
        exc, OSError
    ):
        detail = str(getattr(reason, "args", [reason])[-1] if reason else exc).split(": ")[-1]
        return PluginError(
            f"cannot reach the API server at {server} ({detail}): is the cluster running and the "
            "context right? (kubectl config current-context; the local cluster: kvcache-operator dev status)"
        )
    return None


def _status_message(exc: Exception) -> str:
    try:
        return str(json.loads(getattr(exc, "body", "") or "{}").get("message") or getattr(exc, "reason", ""))
    except ValueError:
        return str(getattr(exc, "reason", ""))


def _object_missing(exc: Exception, name: str) -> bool:
    """A 404 for the object itself (``... "name" not found``), not for the whole resource."""
    return getattr(exc, "status", None) == 404 and f'"{name}" not found' in _status_message(exc)


# --- the API ---------------------------------------------------------------------------------------------


class Cluster:
    """The API calls the plugin makes, through the ``kubernetes`` client and a kubeconfig."""

    def __init__(self, kubeconfig: str | None = None, context: str | None = None) -> None:
        import yaml
        from kubernetes import client, config

        # Raw dicts in and out (no model classes): the client's generated types add nothing here.
        loader: Any = config
        try:
            api_client = loader.new_client_from_config(config_file=kubeconfig, context=context)
            _, active = loader.list_kube_config_contexts(config_file=kubeconfig)
        except (loader.ConfigException, yaml.YAMLError, OSError, TypeError, ValueError) as exc:
            raise kubeconfig_error(kubeconfig, str(exc)) from None
        self._custom: Any = client.CustomObjectsApi(api_client)
        self._batch: Any = client.BatchV1Api(api_client)
        self.server: str = str(api_client.configuration.host)
        self.default_namespace: str = (active.get("context") or {}).get("namespace") or "default"

    @contextlib.contextmanager
    def _calling(self, what: str, namespace: str) -> Iterator[None]:
        try:
            yield
        except PluginError:
            raise
        except Exception as exc:
            error = api_error(exc, what=what, namespace=namespace, server=self.server)
            if error is None:
                raise
            raise error from None

    def get_kvcache(self, namespace: str, name: str) -> Manifest:
        with self._calling("get kvcaches", namespace):
            try:
                obj: Manifest = self._custom.get_namespaced_custom_object(
                    api.GROUP, api.VERSION, namespace, api.PLURAL, name
                )
            except Exception as exc:
                if _object_missing(exc, name):
                    raise PluginError(
                        f"KVCache {namespace}/{name} not found (list them: kubectl get kvc -n {namespace})"
                    ) from None
                raise
        return obj

    def patch_kvcache(self, namespace: str, name: str, patch: Manifest) -> Manifest:
        with self._calling("patch kvcaches", namespace):
            obj: Manifest = self._custom.patch_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name, patch
            )
        return obj

    def get_cronjob(self, namespace: str, name: str) -> Manifest | None:
        with self._calling("get cronjobs", namespace):
            try:
                response = self._batch.read_namespaced_cron_job(name, namespace, _preload_content=False)
            except Exception as exc:
                if _object_missing(exc, name):
                    return None
                raise
        cronjob: Manifest = json.loads(response.data)
        return cronjob

    def create_job(self, namespace: str, job: Manifest) -> str:
        with self._calling("create jobs", namespace):
            response = self._batch.create_namespaced_job(namespace, job, _preload_content=False)
        return str(json.loads(response.data)["metadata"]["name"])


# --- commands -------------------------------------------------------------------------------------------


def cmd_status(cluster: Cluster, args: argparse.Namespace) -> str:
    obj = cluster.get_kvcache(args.namespace, args.name)
    if args.output == "json":
        return json.dumps(obj.get("status") or {}, indent=2, sort_keys=True) + "\n"
    return format_status(obj)


def cmd_render(cluster: Cluster | None, args: argparse.Namespace) -> str:
    if args.filename:
        from kvcache_operator.render import render_file

        return render_file(args.filename, args.namespace)
    assert cluster is not None
    return render_object(cluster.get_kvcache(args.namespace, args.name))


def cmd_backup_now(cluster: Cluster, args: argparse.Namespace) -> str:
    cluster.get_kvcache(args.namespace, args.name)  # a clear error when the cache does not exist
    cronjob = cluster.get_cronjob(args.namespace, backup_cronjob_name(args.name))
    if cronjob is None:
        raise ValueError(
            f"KVCache {args.namespace}/{args.name} has no backup CronJob: "
            "set spec.backup.enabled (with spec.persistence.enabled) first"
        )
    job = manual_job(cronjob, datetime.datetime.now(datetime.UTC))
    return f"job.batch/{cluster.create_job(args.namespace, job)} created\n"


def cmd_restore(cluster: Cluster, args: argparse.Namespace) -> str:
    """A Job that streams backup ``--from`` of each replica into the running engines (no restart)."""
    from kvcache_operator import api, resources

    obj = cluster.get_kvcache(args.namespace, args.name)
    kvc = api.parse_kvcache(obj)
    replicas = int((obj.get("status") or {}).get("replicas") or kvc.spec.replicas)
    now = datetime.datetime.now(datetime.UTC)
    suffix = f"-restore-{int(now.timestamp())}"
    job = resources.build_restore_job(
        kvc, replicas, args.from_backup, args.name[: JOB_NAME_MAX - len(suffix)] + suffix, args.source
    )
    name = cluster.create_job(args.namespace, job)
    source = args.source or args.name
    return (
        f"job.batch/{name} created: restores {args.from_backup} of {source}-0..{replicas - 1} into "
        f"{args.name}'s {replicas} running engines (each replica's result: kubectl logs job/{name})\n"
    )


def cmd_pause(cluster: Cluster, args: argparse.Namespace) -> str:
    cluster.get_kvcache(args.namespace, args.name)
    cluster.patch_kvcache(args.namespace, args.name, pause_patch(True))
    return f"kvcache.kvcache.dev/{args.name} paused (the operator stops changing its children)\n"


def cmd_resume(cluster: Cluster, args: argparse.Namespace) -> str:
    cluster.get_kvcache(args.namespace, args.name)
    cluster.patch_kvcache(args.namespace, args.name, pause_patch(False))
    return f"kvcache.kvcache.dev/{args.name} resumed\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubectl kvcache", description="Inspect and operate KVCaches.")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    parser.add_argument("-n", "--namespace", help="namespace (default: the context's)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = sub.add_parser("status", help="replicas, hit rate, memory pressure, conditions, last decisions")
    status.add_argument("name")
    status.add_argument("-o", "--output", choices=("table", "json"), default="table")
    render = sub.add_parser("render", help="the children the operator builds for a KVCache (YAML)")
    render.add_argument("name", nargs="?", help="a live KVCache")
    render.add_argument("-f", "--filename", help="a KVCache manifest instead of a live object ('-': stdin)")
    validate = sub.add_parser("validate", help="check manifests offline, every problem at once (exit 1)")
    validate.add_argument("-f", "--filename", action="append", required=True, help="manifest; repeatable")
    restore = sub.add_parser("restore", help="stream a backup into the running engines (a Job)")
    restore.add_argument("name")
    restore.add_argument(
        "--from", dest="from_backup", default="latest", help="a backup's name or latest (default)"
    )
    restore.add_argument("--source", help="the KVCache whose backups to read (default: this one)")
    for name, text in (
        ("backup-now", "run the backup CronJob now (a manual Job)"),
        ("pause", "stop the operator from changing the cache's children"),
        ("resume", "let the operator reconcile again"),
    ):
        sub.add_parser(name, help=text).add_argument("name")
    return parser


COMMANDS = {
    "status": cmd_status,
    "backup-now": cmd_backup_now,
    "restore": cmd_restore,
    "pause": cmd_pause,
    "resume": cmd_resume,
}


def run(args: argparse.Namespace, cluster: Cluster | None = None) -> str:
    """Execute one parsed command; ``cluster`` is created from the kubeconfig when not given."""
    if args.command == "validate":
        from kvcache_operator.admission import validate_files

        report, ok = validate_files(args.filename)
        if not ok:
            raise ValueError(report.rstrip("\n"))
        return report
    if args.command == "render" and args.filename:
        return cmd_render(None, args)
    if args.command == "render" and not args.name:
        raise ValueError("render: give a KVCache NAME or -f FILE")
    cluster = cluster or Cluster(args.kubeconfig, args.context)
    args.namespace = args.namespace or cluster.default_namespace
    if args.command == "render":
        return cmd_render(cluster, args)
    return COMMANDS[args.command](cluster, args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sys.stdout.write(run(args))
    except ValueError as exc:
        print(f"kubectl kvcache {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
