"""``kvcache-operator run``: start the Kopf operator with our handlers.

Credentials come from KUBECONFIG or the in-cluster service account (Kopf's login). By default the
replicas of one installation peer through a KopfPeering named ``kvcache-operator`` so that only one
is active (HA); ``--standalone`` skips peering. Kopf keeps a peer paused until it sees the peering
object; the startup handler looks for it and says at WARNING what to do when it is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import logging
import os
import socket

import kopf


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("run", help="run the operator (KUBECONFIG or in-cluster config)")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        metavar="NS",
        help="watch this namespace (repeatable; globs allowed)",
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    parser.add_argument(
        "--peering",
        default="kvcache-operator",
        help="KopfPeering name shared by the replicas of one installation",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority, highest is active (default: derived from $POD_ID, distinct per replica)",
    )
    parser.add_argument("--standalone", action="store_true", help="no peering (single replica)")
    parser.add_argument(
        "--liveness", default="http://0.0.0.0:8081/healthz", help="liveness endpoint URL ('' to disable)"
    )
    parser.add_argument("--metrics-port", type=int, default=8082, help="operator metrics port (0: off)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    parser.set_defaults(handler=cmd_run)


def default_priority(pod_id: str | None = None) -> int:
    """A stable priority per replica. Kopf pauses every peer that shares the highest priority, so
    replicas of one Deployment (same args) must differ: hash the pod name (``$POD_ID``, set by the
    chart from metadata.name; the hostname otherwise) into 1..2^31-1."""
    ident = pod_id or os.environ.get("POD_ID") or socket.gethostname()
    digest = hashlib.blake2b(ident.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % (2**31 - 1) + 1


def event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (the operator's CPU per API call and watch event is mostly the event
    loop and HTTP; ``KVCACHE_OPERATOR_UVLOOP=0`` keeps asyncio's own loop)."""
    if os.environ.get("KVCACHE_OPERATOR_UVLOOP", "1") != "0":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


GC_THRESHOLDS = (50_000, 50, 100)
"""Python's cyclic GC thresholds for the operator process (default (700, 10, 10)). The operator's
heap grows with the caches (the indexes hold every child); with the defaults a young collection
runs every 700 allocations and an older one traverses that heap often, so a burst of new caches
cost more CPU per cache the more caches there were. bench.operator_bench, 100 -> 500 caches in
bursts of 200: operator CPU per burst 2.1/3.0/3.0 s with the defaults, 1.9/2.1/1.8 s with these."""


def tune_gc() -> tuple[int, ...]:
    """Set ``GC_THRESHOLDS`` (``KVCACHE_OPERATOR_GC=0`` keeps Python's); returns those in force."""
    if os.environ.get("KVCACHE_OPERATOR_GC", "1") != "0":
        gc.set_threshold(*GC_THRESHOLDS)
    return gc.get_threshold()


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""The operator's log lines. Without ``%(pathname)s``/``%(lineno)d``/``%(funcName)s``, records skip
the stack walk that finds their caller (the logging HOWTO's "Optimization": ``logging._srcfile =
None``), ~3 % of the operator's CPU in a py-spy profile of a burst of new caches."""


def cmd_run(args: argparse.Namespace) -> int:
    if not args.namespace and not args.all_namespaces:
        raise ValueError("run: pass --namespace NS (repeatable) or --all-namespaces")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=LOG_FORMAT,
    )
    logging._srcfile = None  # no caller lookup per record: LOG_FORMAT names no file, line or function
    from kvcache_operator import handlers  # registers the handlers with Kopf's default registry
    from kvcache_operator.controller import Peering

    del handlers
    tune_gc()
    peering = None
    if not args.standalone:
        peering = Peering(args.peering, tuple(args.namespace), clusterwide=args.all_namespaces)
    kopf.run(
        loop=event_loop(),
        clusterwide=args.all_namespaces,
        namespaces=args.namespace,
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        priority=args.priority if args.priority is not None else default_priority(),
        liveness_endpoint=args.liveness or None,
        memo=kopf.Memo(metrics_port=args.metrics_port or None, peering=peering),
    )
    return 0
