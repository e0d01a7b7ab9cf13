"""Executable documentation: parse the command blocks of docs/*.md and run them.

The convention (stated at the top of docs/troubleshooting.md and docs/operations.md):

* a ```` ```sh ```` block runs with bash (``set -euo pipefail``) in a scratch directory, against a
  real engine (``kvcache-engine serve`` on localhost); ``$KVCACHE_URL``, ``$KVCACHE_TOKEN`` and
  ``$KVCACHE_DATA`` (its persistence directory) are set, as they are after the doc's setup steps;
* a ```` ```sh cluster ```` block runs against the local cluster (kubectl, ``kubectl kvcache``);
* ``<!-- reproduce: NAME -->`` before a block: that block and the following ones of its section
  (up to the next ``##`` heading) run against an engine put in the state of that symptom first
  (``tests/docs/scenarios.py``); blocks sharing a NAME share one engine and run in document order;
* ``<!-- expect: REGEX -->`` after a block: the block's output (stdout and stderr) must match;
  ``<!-- expect-not: REGEX -->``: must not; ``<!-- expect-exit: N -->``: its exit status (default 0);
* ```` ```yaml ```` blocks are KVCache manifests or ``spec:`` fragments, validated by the CRD model;
  ```` ```promql ```` blocks may name only metrics the engine or operator exports;
  ```` ```text ```` blocks are sample output and are not run.

Any other fence language fails the parse, so a command cannot escape the test.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = (REPO / "docs" / "troubleshooting.md", REPO / "docs" / "operations.md")
LANGUAGES = {"sh", "yaml", "promql", "text"}
BIN = REPO / ".venv" / "bin"
TOOLS = REPO / ".tools" / "bin"  # helm, kubectl (scripts/get_tools.py)
CHECKOUT = ("helm", "crds")
"""Repository folders the docs' commands use, linked into each scratch directory."""

_FENCE = re.compile(r"^```(\S*)\s*(.*)$")
_DIRECTIVE = re.compile(r"^<!--\s*(reproduce|expect|expect-not|expect-exit):\s*(.*?)\s*-->\s*$")


class DocFormatError(ValueError):
    """A doc breaks the executable-docs convention (the message names file and line)."""


@dataclass
class Block:
    """One fenced block and the directives around it."""

    doc: str
    line: int
    lang: str
    tags: tuple[str, ...]
    code: str
    section: str
    reproduce: str | None = None
    expects: list[str] = field(default_factory=list)
    expects_not: list[str] = field(default_factory=list)
    expect_exit: int = 0

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line} ({self.section})"

    @property
    def cluster(self) -> bool:
        return self.lang == "sh" and "cluster" in self.tags


def parse(path: Path) -> list[Block]:
    """Blocks of one markdown file, in order. DocFormatError on a convention violation."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    section, pending, i = "", None, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
            if not line.startswith("###"):
                pending = None  # a reproduce holds until the next section (## heading)
        directive = _DIRECTIVE.match(line)
        if directive and directive.group(1) == "reproduce":
            pending = directive.group(2)
        elif directive:
            raise DocFormatError(f"{path.name}:{i + 1}: {directive.group(1)} must follow a code block")
        fence = _FENCE.match(line)
        if fence:
            lang, tags = fence.group(1), tuple(fence.group(2).split())
            if lang not in LANGUAGES:
                raise DocFormatError(
                    f"{path.name}:{i + 1}: fence language {lang!r}; supported: {', '.join(sorted(LANGUAGES))}"
                )
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                raise DocFormatError(f"{path.name}:{i + 1}: unterminated code block")
            block = Block(
                path.name, i + 1, lang, tags, "\n".join(lines[i + 1 : end]) + "\n", section, pending
            )
            i = _directives_after(lines, end + 1, block)
            blocks.append(block)
            continue
        i += 1
    return blocks


def _directives_after(lines: list[str], i: int, block: Block) -> int:
    """Attach the expect* comments following a block (blank lines allowed between them)."""
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        directive = _DIRECTIVE.match(lines[i])
        if not directive or directive.group(1) == "reproduce":
            break
        kind, value = directive.groups()
        if block.lang != "sh":
            raise DocFormatError(
                f"{block.doc}:{i + 1}: {kind} after a {block.lang} block (only sh blocks run)"
            )
        if kind == "expect":
            re.compile(value)
            block.expects.append(value)
        elif kind == "expect-not":
            re.compile(value)
            block.expects_not.append(value)
        else:
            block.expect_exit = int(value)
        i += 1
    return i


@dataclass
class Result:
    code: int
    output: str


def scratch_checkout(directory: Path) -> Path:
    """A scratch directory that looks like a checkout for the docs' commands (helm/, crds/)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in CHECKOUT:
        link = directory / name
        if not link.exists():
            link.symlink_to(REPO / name)
    return directory


def run_sh(block: Block, cwd: Path, env: dict[str, str], timeout_s: float = 180.0) -> Result:
    """Run one sh block with bash -euo pipefail; output is stdout and stderr interleaved."""
    path = os.pathsep.join([str(BIN), str(TOOLS), os.environ.get("PATH", "")])
    full_env = {**os.environ, **env, "PATH": path}
    full_env.pop("KVCACHE_TOKEN_FILE", None)
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.code],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout_s,
        check=False,
    )
    return Result(proc.returncode, proc.stdout.decode("utf-8", "replace"))


def check(block: Block, result: Result) -> list[str]:
    """What the doc says the block shows and the output does not (empty when it all holds)."""
    problems = []
    if result.code != block.expect_exit:
        problems.append(f"exit status {result.code}, the doc expects {block.expect_exit}")
    for pattern in block.expects:
        if not re.search(pattern, result.output, re.MULTILINE):
            problems.append(f"output does not match expect: {pattern}")
    for pattern in block.expects_not:
        if re.search(pattern, result.output, re.MULTILINE):
            problems.append(f"output matches expect-not: {pattern}")
    return problems


def report(block: Block, result: Result, problems: list[str]) -> str:
    tail = result.output[-3000:]
    return f"{block.where}: " + "; ".join(problems) + f"\n--- command ---\n{block.code}--- output ---\n{tail}"
