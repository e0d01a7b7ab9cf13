"""``kvcache-operator``: run the operator, print the CRD, render a KVCache's children, validate manifests."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def _add_crd(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("crd", help="print the KVCache CustomResourceDefinition (YAML)")
    p.set_defaults(handler=_cmd_crd)


def _cmd_crd(args: argparse.Namespace) -> int:
    from kvcache_operator.crd import render_crd

    sys.stdout.write(render_crd())
    return 0


def _add_render(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("render", help="print every child manifest of a KVCache (YAML stream)")
    p.add_argument("-f", "--filename", required=True, help="KVCache manifest (YAML; '-' for stdin)")
    p.add_argument("-n", "--namespace", help="namespace when the manifest has none (default: default)")
    p.set_defaults(handler=_cmd_render)


def _cmd_render(args: argparse.Namespace) -> int:
    from kvcache_operator.render import render_file

    sys.stdout.write(render_file(args.filename, args.namespace))
    return 0


def _add_validate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "validate",
        help="check KVCache manifests offline as the API server and its webhook would (exit 1: invalid)",
    )
    p.add_argument(
        "-f", "--filename", action="append", required=True, help="manifest (YAML; '-' for stdin); repeatable"
    )
    p.set_defaults(handler=_cmd_validate)


def _cmd_validate(args: argparse.Namespace) -> int:
    from kvcache_operator.admission import validate_files

    report, ok = validate_files(args.filename)
    sys.stdout.write(report)
    return 0 if ok else 1


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from kvcache_operator.run import add_parser

    add_parser(sub)


def _add_simulate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "simulate",
        help="replay a trace against a KVCache's engines and autoscaler, offline (needs the engine package)",
    )
    p.add_argument("-f", "--filename", required=True, help="KVCache manifest (YAML; '-' for stdin)")
    p.add_argument("--trace", required=True, help="Mooncake-format trace (JSON lines, optionally gzipped)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the summary)")
    p.add_argument(
        "--plot", metavar="FILE", help="write a PNG of capacity, hit rate and prediction over time"
    )
    p.add_argument(
        "--curve-rate",
        type=float,
        default=None,
        help="largest sampling rate of the engines' curves (default: the engines' own, 1/64)",
    )
    p.set_defaults(handler=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> int:
    try:
        from kvcache_operator.simulate import run_command  # imports the engine package (torch)
    except ImportError as exc:
        print(
            f"kvcache-operator simulate: error: it replays the engines offline and needs the engine "
            f"extra ({exc}); install it beside the operator: pip install 'kvcache-operator[engine]' "
            "torch==2.13.0",
            file=sys.stderr,
        )
        return 2
    return run_command(args)


def _add_dev(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from kvcache_operator.dev import add_parser

    add_parser(sub)


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_crd,
    _add_render,
    _add_validate,
    _add_run,
    _add_dev,
    _add_simulate,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvcache-operator",
        description="Kubernetes operator for KV cache engines (kvcache.dev/v1alpha1 KVCache).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ValueError as exc:
        print(f"kvcache-operator {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
