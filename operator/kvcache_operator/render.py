"""``kvcache-operator render``: every child manifest of the KVCache objects in a YAML file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from kvcache_operator import api
from kvcache_operator.resources import build_children

# A fixed placeholder keeps renders reproducible for reviews: the operator generates the real token.
PLACEHOLDER_TOKEN = "generated-by-the-operator"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (config files, scripts) as literal blocks: readable in reviews."""


def dump_manifests(children: list[dict[str, Any]]) -> str:
    """Manifests as one YAML stream, each document preceded by ``---``."""
    return "".join("---\n" + yaml.dump(c, Dumper=_Dumper, sort_keys=False, width=100) for c in children)


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def load_kvcaches(text: str, source: str) -> list[dict[str, Any]]:
    """The KVCache documents of a YAML stream; any other kind is an error naming the document."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: not valid YAML: {exc}") from exc
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict) or doc.get("kind") != api.KIND:
            raise ValueError(f"{source}: document {i} is not a {api.KIND}")
    if not docs:
        raise ValueError(f"{source}: no {api.KIND} found")
    return docs


def render_file(filename: str, namespace: str | None = None) -> str:
    """The children of every KVCache in ``filename`` as one YAML stream (``-``: stdin)."""
    text = sys.stdin.read() if filename == "-" else Path(filename).read_text()
    out: list[str] = [
        f"# token Secrets below hold the placeholder {PLACEHOLDER_TOKEN!r}: the operator generates\n"
        "# a random token when it creates them (and never overwrites an existing one).\n"
    ]
    for doc in load_kvcaches(text, filename):
        meta = dict(doc.get("metadata") or {})
        meta.setdefault("namespace", namespace or "default")
        out.append(
            dump_manifests(
                build_children(
                    {**doc, "metadata": meta}, token=PLACEHOLDER_TOKEN, admin_token=PLACEHOLDER_TOKEN
                )
            )
        )
    return "".join(out)
