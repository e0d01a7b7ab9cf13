"""``kvcache-operator dev up|status|logs|down``: a local Kubernetes to try the operator on.

The local cluster (an emulated API server, the StatefulSet/Job/CronJob controllers and a kubelet
that runs every pod as a process on this machine) lives in the repository's ``e2e/localcluster``,
next to the tests that use it. It is not part of the installed package, and this package does not
depend on it: the parser below is plain argparse, and only when a ``dev`` command runs is the
checkout located and ``e2e.localcluster.dev`` imported, through importlib (so the operator's
import graph, which the import contracts check, has no edge to test code). Installed from a wheel
without a checkout, ``dev`` says so in one line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

CHECKOUT_MARKER = Path("e2e") / "localcluster" / "dev.py"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dev", help="a local Kubernetes with the operator, in the background (source checkout)"
    )
    actions = p.add_subparsers(dest="dev_command", required=True, metavar="ACTION")
    state_help = "state directory (default: $KVCACHE_DEV_STATE, else .localcluster/ in the checkout)"

    up = actions.add_parser("up", help="start it in the background; prints `export KUBECONFIG=...`")
    up.add_argument("--state", help=state_help)
    up.add_argument(
        "--operator",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run kvcache-operator against it (default: yes)",
    )
    up.add_argument("--namespace", default="default", help="the namespace the operator watches")
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it to start")

    status = actions.add_parser("status", help="the API server, the operator, KVCaches and pods")
    status.add_argument("--state", help=state_help)
    status.add_argument("--json", action="store_true", help="machine-readable")

    logs = actions.add_parser("logs", help="operator, cluster or pod logs")
    logs.add_argument(
        "target", nargs="?", default="operator", help="operator (default), cluster, or a pod name"
    )
    logs.add_argument("--state", help=state_help)
    logs.add_argument("-c", "--container", help="the container, for a pod with several")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("--tail", type=int, help="only the last N lines")

    down = actions.add_parser("down", help="stop everything it started; no process is left behind")
    down.add_argument("--state", help=state_help)
    p.set_defaults(handler=run)


def checkout() -> Path:
    """The source checkout holding ``e2e/localcluster`` (ValueError naming where it looked)."""
    here = Path(__file__).resolve().parents[2]
    candidates = [Path(p) for p in (os.environ.get("KVCACHE_CHECKOUT"),) if p] + [here, Path.cwd()]
    for candidate in candidates:
        if (candidate / CHECKOUT_MARKER).is_file():
            return candidate.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise ValueError(
        f"the local cluster needs a source checkout of kvcache-operator ({CHECKOUT_MARKER} not found in "
        f"{looked}): clone the repository, then run `make cluster` there (or set KVCACHE_CHECKOUT)"
    )


def run(args: argparse.Namespace) -> int:
    root = str(checkout())
    if root not in sys.path:
        sys.path.insert(0, root)
    module = importlib.import_module("e2e.localcluster.dev")
    result: int = module.run(args)
    return result
