"""Every Kopf decorator of the operator, and nothing else: each handler delegates to ``controller``
in a few lines (the control pass, converge, the tuned values and the indexes' shape live there).

* startup/cleanup: clients and metrics in ``memo.runtime``;
* two indexes fed by watches, keyed by ``(namespace, app.kubernetes.io/instance)``: the children
  (every child kind and the backup Jobs) and the engine pods; the control pass reads them instead
  of listing;
* create/update/resume: one converge pass; a KVCache's DELETED event: forget it, end its loop;
* a daemon per KVCache: the scrape timer and control loop (an engine pod's watch event wakes it
  for a membership pass: the warm join, the shard map), **without Kopf's finalizer** (below);
* the validating admission webhook (``admission.review``; served as ``webhook.configure`` says).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf

from kvcache_operator import admission, api, controller, webhook

Logger = logging.Logger | logging.LoggerAdapter[Any]


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Logger, **_: Any) -> None:
    await controller.start(settings, memo, logger)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await controller.stop(memo)


@kopf.index(controller.is_child_resource, labels=controller.MANAGED_LABELS)
async def kvcache_children(body: kopf.Body, resource: kopf.Resource, **_: Any) -> Any:
    return controller.index_entry(body, resource.kind)


@kopf.index("", "v1", "pods", labels=controller.MANAGED_LABELS)
async def kvcache_pods(body: kopf.Body, memo: kopf.Memo, **_: Any) -> Any:
    controller.pod_seen(memo.get("runtime"), body)
    return controller.index_entry(body, "Pod")


@kopf.on.resume(api.GROUP, api.PLURAL)
@kopf.on.create(api.GROUP, api.PLURAL)
@kopf.on.update(api.GROUP, api.PLURAL)
async def reconcile_handler(
    *, body: kopf.Body, memo: kopf.Memo, logger: Logger, diff: kopf.Diff, reason: str, **kwargs: Any
) -> None:
    indexes = controller.Indexes.of(kwargs)
    await controller.reconcile_cache(memo.runtime, body, indexes, logger, diff=diff, reason=reason)


@kopf.on.event(api.GROUP, api.PLURAL, when=lambda type, **_: type == "DELETED")
async def forget(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    controller.forget(memo.runtime, body)


@kopf.daemon(api.GROUP, api.PLURAL, cancellation_timeout=10.0)
async def control_loop(
    *, stopped: kopf.DaemonStopped, body: kopf.Body, memo: kopf.Memo, logger: Logger, **kwargs: Any
) -> None:
    indexes = controller.Indexes.of(kwargs)
    await controller.control_loop(memo.runtime, stopped, body, indexes, logger)


controller.without_finalizer(control_loop)  # see there: the KVCache needs no finalizer


@kopf.on.startup()
def admission_settings(settings: kopf.OperatorSettings, logger: Logger, **_: Any) -> None:
    logger.info(webhook.configure(settings, os.environ))


@kopf.on.validate(
    api.GROUP, api.PLURAL, id=admission.HANDLER_ID, operations=admission.OPERATIONS, ignore_failures=True
)
def validate_kvcache(*, body: kopf.Body, warnings: list[str], **kwargs: Any) -> None:
    verdict = admission.verdict_of(kwargs.get("operation"), body, kwargs.get("old"))
    warnings.extend(verdict.warnings)
    if not verdict.allowed:
        raise kopf.AdmissionError(verdict.message, code=422)
