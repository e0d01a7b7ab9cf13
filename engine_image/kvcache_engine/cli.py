"""``kvcache-engine``: the engine's command line (serve, replay, backup, doctor, ...).

Each subcommand is one ``_add_<name>`` function registering its parser and a ``_cmd_<name>``
handler; heavy imports (torch, aiohttp) happen inside the handlers so ``--help`` is instant.
Handlers return a process exit code. Errors on input print one line naming the problem
(no traceback) and exit 2.
"""

from __future__ import annotations

import argparse
import http.client
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kvcache_engine.contract import STAGING_MB_DEFAULT, AdminError, ConfigError
from kvcache_engine.contract.lifecycle import HANDOFF_MIB_S, SHUTDOWN_HANDOFF_S

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvcache-engine",
        description="KV cache engine for LLM inference: serve it, replay traces, back it up, diagnose it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


if TYPE_CHECKING:
    Sub = argparse._SubParsersAction[argparse.ArgumentParser]


def _add_serve(sub: Sub) -> None:
    p = sub.add_parser("serve", help="run the HTTP API (loads the persisted cache, persists on SIGTERM)")
    p.add_argument("--config", help="config file (YAML/JSON); KVCACHE_<FIELD> env vars override")
    p.add_argument("--host", default="0.0.0.0", help="bind address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--token-file", help="API token file (default: $KVCACHE_TOKEN_FILE, then $KVCACHE_TOKEN)")
    p.add_argument(
        "--admin-token-file",
        help="admin token file: /admin/* (default: $KVCACHE_ADMIN_TOKEN_FILE, then $KVCACHE_ADMIN_TOKEN)",
    )
    p.add_argument("--auth-probes", action="store_true", help="token on /healthz, /readyz, /metrics too")
    p.add_argument("--auth-metrics", action="store_true", help="a data or admin token on /metrics")
    p.add_argument("--header-timeout-s", type=float, default=10.0, help="request line+headers timeout (s)")
    p.add_argument("--idle-timeout-s", type=float, default=75.0, help="idle keep-alive timeout (s)")
    p.add_argument("--max-connections", type=int, default=1024, help="open connections cap (default 1024)")
    p.add_argument(
        "--max-json-depth", type=int, default=32, help="deepest JSON nesting accepted (default 32)"
    )
    p.add_argument(
        "--drain-peer",
        action="append",
        help="CIDR or IP a drain may push to (repeatable; default: private and loopback IPs)",
    )
    p.add_argument(
        "--shutdown-handoff-s",
        type=float,
        default=float(SHUTDOWN_HANDOFF_S),
        help="on SIGTERM, copy chains to the peers of the last placement for at most this long "
        f"before the final persist (default {SHUTDOWN_HANDOFF_S}; 0: off)",
    )
    p.add_argument(
        "--handoff-mib-s",
        type=float,
        default=HANDOFF_MIB_S,
        help=(
            "MiB/s cap of each drain, warm-join copy and shutdown hand-off "
            f"(default {HANDOFF_MIB_S:g}; 0: none)"
        ),
    )
    p.add_argument("--max-body-mb", type=int, default=1024, help="largest request body in MiB (default 1024)")
    p.add_argument("--max-blocks", type=int, default=4096, help="most blocks per request (default 4096)")
    p.add_argument("--body-timeout-s", type=float, default=60.0, help="body receive timeout (s)")
    p.add_argument(
        "--staging-mb",
        type=_non_negative_int,
        default=STAGING_MB_DEFAULT,
        help=f"reusable get buffers, MiB (default {STAGING_MB_DEFAULT}; pod memory requests count it)",
    )
    p.set_defaults(handler=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    """Serve; a failure is classified (kvcache_engine.termination), written as the container's
    termination message and printed as one line, exiting non-zero."""
    from kvcache_engine import termination

    try:
        from kvcache_engine.server import cmd_serve

        return cmd_serve(args)
    except Exception as exc:
        failure = termination.classify(exc)
        termination.write(failure.line)
        if not failure.expected:
            raise  # a bug: keep its traceback (the message file already names it)
        print(f"kvcache-engine serve: error: {failure.line}", file=sys.stderr)
        return failure.exit_code


def _add_url_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="engine base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--token-file", help="API token file (default: $KVCACHE_TOKEN_FILE, then $KVCACHE_TOKEN)")


def _add_stats(sub: Sub) -> None:
    p = sub.add_parser("stats", help="print a running engine's get_stats()")
    _add_url_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_cmd_backup_module("cmd_stats"))


def _add_persist(sub: Sub) -> None:
    p = sub.add_parser("persist", help="ask a running engine to persist now (exit 1 if it could not)")
    _add_url_args(p)
    p.set_defaults(handler=_cmd_backup_module("cmd_persist"))


def _add_validate(sub: Sub) -> None:
    p = sub.add_parser("validate", help="check a persisted cache or backup offline (exit 1 if invalid)")
    p.add_argument("path", help="directory holding manifest.json and segments")
    p.add_argument("--config", help="engine config whose geometry the cache must match")
    p.set_defaults(handler=_cmd_backup_module("cmd_validate"))


def _add_backup(sub: Sub) -> None:
    p = sub.add_parser("backup", help="pull a verified snapshot from a running engine into DEST, keep N")
    _add_url_args(p)
    p.add_argument("--dest", required=True, help="backup root directory (staging with --s3-bucket)")
    p.add_argument("--keep", type=int, default=7, help="backups to keep (default 7)")
    _add_s3_args(p)
    p.set_defaults(handler=_cmd_backup_module("cmd_backup"))


def _add_s3_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "object store (S3 API; credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY[/AWS_SESSION_TOKEN])"
    )
    g.add_argument("--s3-endpoint", help="http(s)://host[:port] of the S3 API, e.g. https://s3.amazonaws.com")
    g.add_argument("--s3-bucket", help="bucket; set to use the object store instead of a directory")
    g.add_argument("--s3-prefix", default="", help="key prefix inside the bucket")
    g.add_argument("--s3-region", default="us-east-1", help="signing region (default us-east-1)")
    g.add_argument("--s3-ca-file", help="PEM CA bundle to verify the endpoint's certificate")
    g.add_argument("--s3-insecure-skip-verify", action="store_true", help="do not verify TLS certificates")
    g.add_argument("--s3-part-size-mb", type=_positive_float, default=64.0, help="multipart part size, MiB")
    g.add_argument("--replica", help="folder of this replica's backups in the store (e.g. cache-0)")


def _add_upload(sub: Sub) -> None:
    p = sub.add_parser("upload", help="upload a local backup directory to the object store (resumable)")
    p.add_argument("--from", required=True, metavar="PATH", help="backup directory")
    p.add_argument("--keep", type=int, default=7, help="backups to keep in the store (default 7)")
    _add_s3_args(p)
    p.set_defaults(handler=_cmd_backup_module("cmd_upload"))


def _add_restore(sub: Sub) -> None:
    p = sub.add_parser(
        "restore", help="validate a backup and stream it into a running engine (or into a data directory)"
    )
    p.add_argument(
        "--from",
        required=True,
        metavar="PATH|NAME",
        help="backup directory; with --s3-bucket or --backup-root a backup name or latest",
    )
    p.add_argument("--backup-root", help="directory of backups (kvcache-backup-*) --from names one of")
    p.add_argument("--staging", help="download directory with --s3-bucket (default: a temporary one)")
    p.add_argument("--url", help="engine base URL, e.g. http://127.0.0.1:8080 (or --to-dir)")
    p.add_argument("--token-file", help="API token file (default: $KVCACHE_TOKEN_FILE, then $KVCACHE_TOKEN)")
    p.add_argument(
        "--to-dir",
        help="write the verified backup as an engine's persisted cache here (before the engine starts)",
    )
    p.add_argument("--if-empty", action="store_true", help="with --to-dir: do nothing if it holds a cache")
    p.add_argument("--report-file", help="also write the JSON result here (e.g. /dev/termination-log)")
    _add_s3_args(p)
    p.set_defaults(handler=_cmd_backup_module("cmd_restore"))


def _cmd_backup_module(name: str) -> Handler:
    def run(args: argparse.Namespace) -> int:
        from kvcache_engine import backup

        handler: Handler = getattr(backup, name)
        try:
            return handler(args)
        except (OSError, http.client.HTTPException) as exc:
            # an unreachable engine, a dropped stream, a full disk: one line, no traceback
            print(f"kvcache-engine {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1

    return run


def _add_replay(sub: Sub) -> None:
    from typing import get_args

    from kvcache_engine.contract import CacheStrategy, Codec

    p = sub.add_parser("replay", help="replay a Mooncake trace through the index and eviction (hit rate)")
    p.add_argument("--trace", help="Mooncake trace (.jsonl or .jsonl.gz); default: the packaged trace")
    p.add_argument(
        "--capacity-blocks", type=_non_negative_int, required=True, help="budget in fp16 blocks (512 tokens)"
    )
    strategies = [s.value.lower() for s in CacheStrategy]
    p.add_argument("--strategy", default="lru", type=str.lower, choices=strategies)
    p.add_argument("--codec", default="none", choices=list(get_args(Codec)))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_cmd_replay)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _cmd_replay(args: argparse.Namespace) -> int:
    from kvcache_engine.replay import run_replay_command

    return run_replay_command(args)


def _add_doctor(sub: Sub) -> None:
    p = sub.add_parser("doctor", help="diagnose a running engine: findings, evidence, config changes")
    _add_url_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request (default 30)")
    p.set_defaults(handler=_cmd_doctor)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from kvcache_engine.analytics import cmd_doctor

    return cmd_doctor(args)


def _add_profile(sub: Sub) -> None:
    p = sub.add_parser("profile", help="record a running engine's next requests with torch.profiler")
    _add_url_args(p)
    p.add_argument("--out", default="trace.json", help="where to write the Chrome trace (default trace.json)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--requests", type=int, default=20, help="data-plane requests to record (default 20)")
    what.add_argument("--seconds", type=float, help="record for this many seconds instead")
    p.add_argument("--timeout", type=float, default=300.0, help="stop after this many seconds (default 300)")
    p.set_defaults(handler=_cmd_profile)


def _cmd_profile(args: argparse.Namespace) -> int:
    from kvcache_engine.debug import cmd_profile

    return cmd_profile(args)


def _add_bench(sub: Sub) -> None:
    p = sub.add_parser("bench", help="replay a trace against a running engine: req/s, latency, hit rate")
    p.add_argument(
        "--url", required=True, action="append",
        help="engine base URL; repeat it for several replicas (the client shards chains over them)",
    )  # fmt: skip
    p.add_argument("--token-file", help="API token file (default: $KVCACHE_TOKEN_FILE, then $KVCACHE_TOKEN)")
    p.add_argument(
        "--route-depth", type=_positive_int,
        help="place chains by their block at this depth (default: the engine's routeDepth)",
    )  # fmt: skip
    p.add_argument("--concurrency", type=_positive_int, default=4, help="worker threads (default 4)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=_positive_float, help="run this long (default 10 s)")
    length.add_argument("--requests", type=_positive_int, help="run exactly this many trace requests")
    p.add_argument("--trace", default="packaged", help="Mooncake trace (.jsonl[.gz]); default: packaged")
    p.add_argument("--timeout", type=_positive_float, default=5.0, help="seconds per lookup (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_cmd_bench)


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _cmd_bench(args: argparse.Namespace) -> int:
    from kvcache_engine.loadgen import cmd_bench

    return cmd_bench(args)


_SUBCOMMANDS: list[Callable[[Sub], None]] = [
    _add_serve, _add_stats, _add_persist, _add_validate, _add_backup, _add_restore, _add_upload, _add_replay,
    _add_doctor, _add_profile, _add_bench,
]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except (ConfigError, ValueError, FileNotFoundError, AdminError) as exc:
        print(f"kvcache-engine {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
