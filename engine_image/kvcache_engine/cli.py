"""``kvcache-engine``: the engine's command line (serve, replay, backup, doctor, ...).

Each subcommand is one ``_add_<name>`` function registering its parser and a ``_cmd_<name>``
handler; heavy imports (torch, aiohttp) happen inside the handlers so ``--help`` is instant.
Handlers return a process exit code. Errors on input print one line naming the problem
(no traceback) and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from kvcache_engine.config import ConfigError

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


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"kvcache-engine {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
